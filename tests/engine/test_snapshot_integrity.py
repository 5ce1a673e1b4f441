"""A snapshot whose tensor data is damaged is never used (issue 12 item 8): its checksum, computed
while writing, is checked while reading; non-finite values are refused; either way the file is deleted
and the chat recomputes its cache, answering as if no snapshot had existed."""

from __future__ import annotations

import copy

from safetensors import safe_open
from safetensors.torch import save_file

from engine.caches import CacheSpec
from engine.sampling import SamplingSettings
from engine.session import ChatSession, SessionSettings
from engine.snapshots import SnapshotStore, checksum

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)


def _chat(lm) -> ChatSession:
    session = ChatSession(lm, SessionSettings(sampling=GREEDY, cache=CacheSpec()))
    for text in ["first message", "second message"]:
        session.send(text)
    return session


def _restarted(lm, old: ChatSession) -> ChatSession:
    session = ChatSession(lm, SessionSettings(sampling=GREEDY, cache=old.settings.cache))
    session.messages = copy.deepcopy(old.messages)
    return session


def test_flipped_bytes_in_the_tensor_data_are_caught_and_the_chat_recomputes(tiny_lm, tmp_path) -> None:
    store = SnapshotStore(tmp_path)
    before = _chat(tiny_lm)
    path = store.save("c", before)
    assert path is not None
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 400, len(data) - 300):  # inside the last tensor: the header still parses
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    after = _restarted(tiny_lm, before)

    result = store.load("c", after)  # before the fix: "loaded", and a garbage reply

    assert not result.ok and result.reason == "corrupt (checksum)"
    assert not path.exists()
    expected = before.send("and now?")
    got = after.send("and now?")
    assert got.stats.reused_tokens == 0  # recomputed from the messages
    assert got.reply == expected.reply


def test_non_finite_values_are_refused_even_with_a_matching_checksum(tiny_lm, tmp_path) -> None:
    store = SnapshotStore(tmp_path)
    before = _chat(tiny_lm)
    path = store.save("c", before)
    assert path is not None
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    tensors["k.1"][0, 0, 0, 0] = float("nan")
    layers = int(meta["layers"])
    meta["checksum"] = checksum(tensors[f"{kv}.{i}"] for i in range(layers) for kv in "kv")
    save_file(tensors, str(path), metadata=meta)
    after = _restarted(tiny_lm, before)

    result = store.load("c", after)

    assert not result.ok and result.reason == "corrupt (non-finite values)"
    assert not path.exists()
    assert after.send("and now?").reply == before.send("and now?").reply


def test_a_snapshot_without_a_checksum_is_not_trusted(tiny_lm, tmp_path) -> None:
    store = SnapshotStore(tmp_path)
    before = _chat(tiny_lm)
    path = store.save("c", before)
    assert path is not None
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    meta.pop("checksum")
    meta["format"] = "cachet-kv-1"  # what the previous version wrote
    save_file(tensors, str(path), metadata=meta)
    result = store.load("c", _restarted(tiny_lm, before))
    assert not result.ok and not path.exists()
