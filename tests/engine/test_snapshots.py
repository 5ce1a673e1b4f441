"""KV snapshots: a chat resumes from disk only when everything matches; bad files are dropped safely."""

from __future__ import annotations

import copy

import pytest

from engine.caches import CacheSpec
from engine.sampling import SamplingSettings
from engine.session import ChatSession, SessionSettings
from engine.snapshots import SnapshotStore, checksum
from tests.tiny import tiny_loaded_model

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)


def chat(lm, spec: CacheSpec | None = None) -> ChatSession:
    session = ChatSession(lm, SessionSettings(sampling=GREEDY, cache=spec or CacheSpec()))
    for text in ["first message", "second message", "third"]:
        session.send(text)
    return session


def restarted(lm, old: ChatSession) -> ChatSession:
    """What the app holds after a restart: the messages (from its database), no cache."""
    session = ChatSession(lm, SessionSettings(sampling=GREEDY, cache=old.settings.cache))
    session.messages = copy.deepcopy(old.messages)
    return session


@pytest.mark.parametrize("spec", [CacheSpec(), CacheSpec("sink", sink_tokens=4, window=64),
                                  CacheSpec("quantized", nbits=4, residual=32, q_group_size=32, axis_key=-1),
                                  CacheSpec("quantized", nbits=4, residual=32, q_group_size=32, axis_key=-1,
                                            backend="hqq"),
                                  CacheSpec("sink-quantized", sink_tokens=4, window=64, residual=32,
                                            q_group_size=32, backend="hqq")])
def test_resume_from_snapshot_reuses_everything_and_answers_the_same(tiny_lm, tmp_path, spec) -> None:
    store = SnapshotStore(tmp_path)
    before = chat(tiny_lm, spec)
    assert store.save("chat-1", before) is not None
    after = restarted(tiny_lm, before)
    result = store.load("chat-1", after)
    assert result.ok and result.tokens == len(before.cached_ids)
    a = before.send("after the restart")
    b = after.send("after the restart")
    assert b.stats.reused_tokens == a.stats.reused_tokens > 0
    assert a.reply == b.reply


def test_missing_snapshot_is_reported(tiny_lm, tmp_path) -> None:
    assert SnapshotStore(tmp_path).load("nothing", chat(tiny_lm)).reason == "missing"


def test_corrupt_and_truncated_snapshots_are_ignored_and_deleted(tiny_lm, tmp_path) -> None:
    store = SnapshotStore(tmp_path)
    session = chat(tiny_lm)
    path = store.save("c", session)
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"\x00" * 64, data[:8] + b"{not json" + data[17:]):
        path.write_bytes(damaged)
        fresh = restarted(tiny_lm, session)
        result = store.load("c", fresh)
        assert not result.ok and result.reason.startswith("corrupt")
        assert not path.exists() and fresh.cache is None
        assert fresh.send("works anyway").stats.finish_reason in ("stop", "length")


def test_snapshot_of_another_model_or_strategy_is_not_used(tiny_lm, tmp_path) -> None:
    store = SnapshotStore(tmp_path)
    session = chat(tiny_lm)
    store.save("c", session)
    other = tiny_loaded_model(seed=7)
    result = store.load("c", restarted(other, session))
    assert not result.ok and result.reason == "model changed"
    store.save("c", session)
    moved = restarted(tiny_lm, session)
    moved.settings.cache = CacheSpec("sink", sink_tokens=4, window=64)
    assert store.load("c", moved).reason == "strategy changed"


def test_disk_budget_evicts_least_recently_used(tiny_lm, tmp_path) -> None:
    session = chat(tiny_lm)
    one = SnapshotStore(tmp_path).save("probe", session).stat().st_size
    store = SnapshotStore(tmp_path / "b", budget_bytes=int(2.5 * one))
    for key in ("a", "b", "c"):
        store.save(key, session)
    names = {p.stem for p in store.files()}
    assert names == {"b", "c"} and store.total_bytes() <= store.budget_bytes


def test_a_snapshot_whose_ids_and_tensors_disagree_is_not_used(tiny_lm, tmp_path) -> None:
    """Well-formed files that do not add up (ids cut short, one layer shorter) are refused too."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    store = SnapshotStore(tmp_path)
    session = chat(tiny_lm)
    path = store.save("c", session)
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(path))
    ids = json.loads(meta["token_ids"])
    cases = [
        (tensors, {**meta, "token_ids": json.dumps(ids[:-5])}),
        ({**tensors, "k.1": tensors["k.1"][..., :-3, :].contiguous(), "v.1": tensors["v.1"][..., :-3, :].contiguous()},
         meta),
    ]
    for content, metadata in cases:
        save_file(content, str(path), metadata=metadata)
        fresh = restarted(tiny_lm, session)
        result = store.load("c", fresh)
        assert not result.ok and not path.exists() and fresh.cache is None
        assert fresh.send("works anyway").stats.reused_tokens == 0


@pytest.mark.parametrize("spec", [CacheSpec(), CacheSpec("static", max_cache_len=256),
                                  CacheSpec("sink", sink_tokens=4, window=64),
                                  CacheSpec("quantized", nbits=4, residual=32, q_group_size=32)])
def test_a_snapshot_of_another_shape_is_deleted_as_not_fitting_never_raised(tiny_lm, tmp_path, spec) -> None:
    """Same model identity and settings, tensors of another shape (a hand-made or foreign file):
    filling a cache with them must not raise from the cache's update before the shapes are checked."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    store = SnapshotStore(tmp_path)
    session = chat(tiny_lm, spec)
    path = store.save("c", session)
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(path))
    layers = int(meta["layers"])
    cases = [  # one layer more than the model has; half the KV heads; half the head size
        ({**tensors, f"k.{layers}": tensors["k.0"].clone(), f"v.{layers}": tensors["v.0"].clone()},
         {**meta, "layers": str(layers + 1)}),
        ({name: t[:, :1].contiguous() for name, t in tensors.items()}, meta),
        ({name: t[..., :8].contiguous() for name, t in tensors.items()}, meta),
    ]
    for content, metadata in cases:
        # a well-formed file: its checksum matches its tensors, so the shape check is what refuses it
        count = int(metadata["layers"])
        metadata = {**metadata, "checksum": checksum(content[f"{kv}.{i}"] for i in range(count) for kv in "kv")}
        save_file(content, str(path), metadata=metadata)
        fresh = restarted(tiny_lm, session)
        result = store.load("c", fresh)
        assert not result.ok and result.reason == "does not fit this cache"
        assert not path.exists() and fresh.cache is None
        assert fresh.send("works anyway").stats.finish_reason in ("stop", "length")
