"""Graph-captured decoding (engine/graphs.py): one-token steps over KV buffers grown in buckets give what the
plain path gives, token for token, across buckets, edits and speculation; where a strategy cannot, it says why.

On a CPU the runner runs the same static-shaped step with the capture skipped; the CUDA tests at the end
capture and replay it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import graphs
from engine.caches import CacheSpec
from engine.graphs import GraphSettingError, bucket_for
from engine.session import ChatSession, SessionSettings
from engine.specs import SamplingSettings
from tests.tiny import tiny_loaded_model

BUCKET = 64  # small first bucket so that short tiny-model chats cross several


@pytest.fixture(scope="module")
def lm() -> Any:
    return tiny_loaded_model(seed=3, max_position_embeddings=4096)


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphs, "FIRST_BUCKET", BUCKET)


def _session(lm: Any, graphs_mode: str, cache: CacheSpec | None = None, speculative: str = "off",
             max_new: int = 90) -> ChatSession:
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=max_new, min_new_tokens=max_new)
    return ChatSession(lm, SessionSettings(sampling=sampling, cache=cache or CacheSpec(), speculative=speculative,
                                           graphs=graphs_mode))


def _chat(session: ChatSession) -> list[list[int]]:
    """Three turns, an edit of the first, and a regenerate: every reply's ids."""
    replies = []
    for text in ("hello there, tell me a story", "and another one, longer", "repeat the story"):
        session.send(text)
        replies.append(session.messages[-1].token_ids or [])
    session.edit(0, "hello there, tell me a different story")
    replies.append(session.messages[-1].token_ids or [])
    session.regenerate()
    replies.append(session.messages[-1].token_ids or [])
    return replies


def test_buckets_double_from_the_first_up_to_the_context() -> None:
    assert [bucket_for(n, 8192, 1024) for n in (1, 1024, 1025, 3000, 8192)] == [1024, 1024, 2048, 4096, 8192]
    assert bucket_for(5000, 4096, 1024) == 5000  # never less than what must be held
    assert bucket_for(100, 6000, 1024) == 1024 and bucket_for(5000, 6000, 1024) == 6000  # capped at the context


def test_greedy_replies_are_the_plain_paths_across_buckets_edits_and_regenerates(lm) -> None:
    plain, graphed = _session(lm, "off"), _session(lm, "on")
    assert _chat(graphed) == _chat(plain)
    runner = graphed._runner
    assert runner is not None and runner.steps > 0 and not runner.capture  # CPU: the static step, uncaptured
    assert runner.buckets[:3] == [BUCKET, BUCKET * 2, BUCKET * 4]  # each bucket twice the last
    assert runner.buckets == sorted(runner.buckets)  # edits crop within the bucket: it never shrinks back
    assert graphed.cache is not None and len(graphed.cached_ids) == int(graphed.cache.get_seq_length())


def test_turn_stats_count_the_graph_steps(lm) -> None:
    session = _session(lm, "on", max_new=20)
    stats = session.send("hi").stats
    assert stats.graph_steps == stats.generated_tokens - 1 and stats.graph_fallback is None
    assert _session(lm, "off", max_new=5).send("hi").stats.graph_steps == 0


def test_logits_at_every_step_match_the_plain_path(lm) -> None:
    plain, graphed = _session(lm, "off"), _session(lm, "on")
    prompt = [t % 250 for t in range(50)]
    graphed._decode_runner()  # the graph's buckets apply from the prefill on
    torch.testing.assert_close(graphed.forward_logits(prompt), plain.forward_logits(prompt))
    token = 7
    for _ in range(200):  # 50 → 250 tokens: buckets of 64, 128, 256
        expected = plain.decode_step(token)
        got = graphed.decode_step(token)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        token = int(expected.argmax())
    assert graphed._runner is not None and graphed._runner.steps == 200


def test_a_bucket_is_allocated_once_and_reused_until_full(lm) -> None:
    session = _session(lm, "on")
    session._decode_runner()
    session.forward_logits([t % 250 for t in range(70)])
    layer = session.cache.layers[0]  # type: ignore[union-attr]
    buffer = layer._kbuf
    assert buffer.shape[-2] == 2 * BUCKET  # the prefill grew in buckets too
    for token in range(2 * BUCKET - 70):
        session.decode_step(token)
    assert layer._kbuf is buffer and session._runner.buckets == [2 * BUCKET]  # type: ignore[union-attr]
    session.decode_step(1)  # the 129th token: one move to the next bucket
    assert layer._kbuf is not buffer and layer._kbuf.shape[-2] == 4 * BUCKET
    moved = layer._kbuf
    assert session.cache.crop_to(100)  # an edit: the bucket stays, and is written again from there
    for token in range(10):
        session.decode_step(token)
    assert layer._kbuf is moved and session._runner.buckets == [2 * BUCKET, 4 * BUCKET]  # type: ignore[union-attr]


def test_speculation_with_graphs_gives_the_replies_of_plain_decoding(lm) -> None:
    plain = _session(lm, "off", speculative="off")
    graphed = _session(lm, "on", speculative="prompt-lookup")
    assert _chat(graphed) == _chat(plain)


@pytest.mark.parametrize("spec", [CacheSpec(strategy="sink", sink_tokens=4, window=60),
                                  CacheSpec(strategy="static", max_cache_len=1024)], ids=["sink", "static"])
def test_sink_and_static_caches_decode_with_graphs_token_for_token(lm, spec: CacheSpec) -> None:
    plain, graphed = _session(lm, "off", cache=spec), _session(lm, "on", cache=spec)
    assert _chat(graphed) == _chat(plain)
    assert graphed._runner is not None and graphed._runner.steps > 0
    if spec.strategy == "sink":
        assert graphed.cache.evicted > 0  # type: ignore[union-attr]  # evicting steps ran eagerly in between
        # evictions put the window back into the same buffer: bound again per bucket (or new cache after the edit
        # the sink cannot crop back to), not per eviction
        evictions = graphed.cache.evicted // graphed.cache.layers[0].evict_batch  # type: ignore[union-attr]
        assert len(graphed._runner.buckets) < evictions / 4


def test_a_cache_moved_off_and_back_is_bound_again_and_decodes_the_same(lm) -> None:
    plain, graphed = _session(lm, "off", max_new=30), _session(lm, "on", max_new=30)
    for s in (plain, graphed):
        s.send("first question")
    graphed.cache.to(torch.device("cpu"))  # type: ignore[union-attr]  # what the pool does (buffers dropped)
    graphed.release_graphs()
    assert graphed.cache.layers[0]._kbuf is None  # type: ignore[union-attr]
    binds = len(graphed._runner.buckets)  # type: ignore[union-attr]
    for s in (plain, graphed):
        s.send("second question")
    assert graphed.messages[-1].token_ids == plain.messages[-1].token_ids
    assert len(graphed._runner.buckets) == binds + 1  # type: ignore[union-attr]


def test_a_strategy_without_graph_support_decodes_eagerly_and_says_why(lm) -> None:
    from engine import caches

    spec = CacheSpec(strategy="quantized", nbits=4, residual=32, backend="quanto")
    if caches.backend_availability().get("quanto") is not None:
        pytest.skip("optimum-quanto is not installed")
    plain, graphed = _session(lm, "off", cache=spec, max_new=20), _session(lm, "on", cache=spec, max_new=20)
    stats = graphed.send("hello").stats
    plain.send("hello")
    assert graphed.messages[-1].token_ids == plain.messages[-1].token_ids
    assert stats.graph_steps == 0
    assert stats.graph_fallback is not None and "quantized" in stats.graph_fallback


def test_graphs_auto_is_off_on_a_cpu_and_a_bad_mode_is_refused(lm) -> None:
    session = _session(lm, "auto", max_new=5)
    stats = session.send("hi").stats
    assert session._runner is None and stats.graph_steps == 0 and stats.graph_fallback is None
    with pytest.raises(GraphSettingError, match="auto, on or off"):
        SessionSettings(graphs="always").validate()


def test_the_chat_command_line_takes_graphs(capsys) -> None:
    from engine.cli import build_parser

    assert build_parser().parse_args(["chat", "--graphs", "on"]).graphs == "on"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--graphs", "sometimes"])
    assert "--graphs" in capsys.readouterr().err


# ----- on a GPU ------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_capture_replays_the_eager_steps_token_for_token() -> None:
    lm = tiny_loaded_model(seed=3, max_position_embeddings=4096)
    lm.model.to("cuda")
    lm.device = torch.device("cuda")
    told: list[str] = []
    plain, graphed = _session(lm, "off"), _session(lm, "on")
    graphed.on_progress = told.append
    assert _chat(graphed) == _chat(plain)
    runner = graphed._runner
    assert runner is not None and runner.capture and runner.captures >= 2 and runner.steps > 0
    assert any("Capturing the decode step for" in t for t in told)
    # logits of a replayed step against the eager one, at the same cache contents
    token = 5
    plain_logits = plain.decode_step(token)
    graphed_logits = graphed.decode_step(token)
    torch.testing.assert_close(graphed_logits, plain_logits, rtol=1e-4, atol=1e-4)


@cuda
def test_cuda_bench_decode_with_graphs_reports_a_share_of_the_bandwidth_limit(tmp_path) -> None:
    from engine.cli import main

    code = main(["bench", "--quick", "--model", "shape:llama-3.2-1b", "--dtype", "bfloat16", "--cache", "dynamic",
                 "--only", "decode", "--no-peers", "--speculative", "off", "--graphs", "on", "--no-plots",
                 "--out", str(tmp_path)])
    assert code == 0
    import json

    record = json.loads((tmp_path / "bench.json").read_text())
    share = record["summary"]["strategies"]["dynamic"]["decode_share_of_limit"]
    assert share is not None and share > 0
    assert all(r["graphs"] == "captured" for r in record["results"]["decode"] if r["system"] == "cachet")
