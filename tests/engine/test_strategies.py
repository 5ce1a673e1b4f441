"""Every strategy keeps the engine-core promises: follow-up turns prefill only new tokens, and
switching strategy mid-chat keeps the conversation (tiny random model)."""

from __future__ import annotations

import pytest

from engine import caches
from engine.caches import CacheSpec
from engine.sampling import SamplingSettings
from engine.session import ChatSession, SessionSettings

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)
CPU = __import__("torch").device("cpu")
USABLE = [s for s, reason in caches.availability(CPU).items() if reason is None]
SPECS = {
    "dynamic": CacheSpec(),
    "sink": CacheSpec("sink", sink_tokens=4, window=96),
    "quantized": CacheSpec("quantized", nbits=4, residual=32, q_group_size=32, axis_key=-1),
    "sink-quantized": CacheSpec("sink-quantized", sink_tokens=4, window=96, nbits=4, residual=32,
                                q_group_size=32, axis_key=-1),
    "static": CacheSpec("static", max_cache_len=1024),
}
if caches.backend_availability()["hqq"] is None:
    SPECS["quantized-hqq"] = SPECS["quantized"].with_changes(backend="hqq")
    SPECS["sink-quantized-hqq"] = SPECS["sink-quantized"].with_changes(backend="hqq")
USABLE += [name for name, spec in SPECS.items() if name not in USABLE and spec.strategy in USABLE]


@pytest.mark.parametrize("strategy", [s for s in SPECS if s in USABLE])
def test_follow_up_turns_prefill_only_new_tokens(tiny_lm, strategy) -> None:
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=SPECS[strategy]))
    previous = 0
    for i in range(6):
        result = session.send(f"turn {i}: " + "some words " * 6)
        assert result.stats.finish_reason in ("stop", "length"), result.stats.error
        assert result.stats.reused_tokens == previous
        previous = len(session.cached_ids)


@pytest.mark.parametrize("target", [s for s in SPECS if s in USABLE and s != "dynamic"])
def test_switching_from_dynamic_mid_chat_keeps_the_conversation(tiny_lm, target) -> None:
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY))
    session.send("hello")
    session.send("how are you")
    cached = len(session.cached_ids)
    assert session.set_cache_spec(SPECS[target]) == "converted"  # nothing evicted or quantized yet
    result = session.send("still here?")
    assert result.stats.finish_reason in ("stop", "length"), result.stats.error
    assert result.stats.reused_tokens == cached  # the converted cache serves the whole history
    assert len(session.messages) == 6


def test_offloaded_is_explained_on_a_cpu_only_machine() -> None:
    reason = caches.availability(CPU)["offloaded"]
    assert reason and "GPU" in reason


def test_static_cache_overflow_is_refused_or_handled_never_truncated(tiny_lm) -> None:
    from engine.session import ContextOverflowError

    spec = CacheSpec("static", max_cache_len=128)
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
    with pytest.raises(ContextOverflowError, match="128 tokens"):
        session.send("w" * 200)
    session.messages.clear()
    result = session.send("short")
    assert result.stats.prompt_tokens + result.stats.generated_tokens <= 128
    session.settings.overflow = "sink"
    result = session.send("x" * 150)  # migrated to the sink strategy, keeping the chat
    assert session.settings.cache.strategy == "sink"
    assert result.stats.finish_reason in ("stop", "length")


@pytest.mark.parametrize("source", [s for s in ("quantized", "sink-quantized") if s in USABLE])
def test_leaving_a_quantized_cache_for_an_exact_one_recomputes_it(tiny_lm, source) -> None:
    """Dynamic promises the logits of a recompute: a de-quantized history would break that."""
    import torch

    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=SPECS[source]))
    for text in ("hello there " * 6, "and more words " * 6, "again " * 6):
        session.send(text)
    assert session.set_cache_spec(CacheSpec()) == "recompute"
    fresh = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY))
    fresh.messages = list(session.messages)
    torch.testing.assert_close(session.next_token_logits(), fresh.next_token_logits(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", [s for s in SPECS if s in USABLE])
def test_every_cache_keeps_the_contract_the_session_pool_and_snapshots_rely_on(tiny_lm, strategy) -> None:
    """Whatever the strategy: it says how long it is, gives its content back in full precision,
    counts its bytes, crops back (or refuses without changing anything) and moves."""
    import torch

    from engine.caches.base import KVCache, KVLayer

    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=SPECS[strategy]))
    session.send("words to fill the cache " * 3)
    cache = session.cache
    assert isinstance(cache, KVCache) and all(isinstance(layer, KVLayer) for layer in cache.layers)
    held = int(cache.get_seq_length())  # (a static cache answers with its live 0-d tensor)
    content = cache.full_kv()
    assert all(kv is not None and kv[0].shape[-2] == kv[1].shape[-2] == held for kv in content)
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.kv_layers) > 0
    stream = len(session.cached_ids)
    assert not cache.crop_to(stream + 1) and cache.get_seq_length() == held
    cut = 1 if SPECS[strategy].is_quantized and SPECS[strategy].bounded_length else 3  # inside the fp residual
    assert cache.crop_to(stream - cut) and len({int(layer.get_seq_length()) for layer in cache.kv_layers}) == 1
    assert cache.get_seq_length() == held - cut
    cache.to(torch.device("cpu"))
    del session.cached_ids[stream - cut:]
    assert session.send("and on").stats.reused_tokens > 0


@pytest.mark.parametrize("strategy", [s for s in SPECS if s in USABLE])
def test_a_turn_failing_in_its_prefill_reports_the_cache_it_reused_and_the_chat_goes_on(tiny_lm, strategy,
                                                                                        monkeypatch) -> None:
    """A turn whose prefill fails (out of memory, say) still reports the history its cache held (issue 23: Gemma 3's
    failing turn 2 said `reused_tokens: 0` though its cache held all 72 tokens of turn 1); the failed pass is taken
    back, and the next try reuses that history again."""
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=SPECS[strategy], speculative="off"))
    session.send("a first question")
    cached = len(session.cached_ids)
    attention = tiny_lm.model.model.layers[1].self_attn
    original = attention.forward

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(attention, "forward", original)
        raise RuntimeError("simulated out-of-memory in layer 1")

    monkeypatch.setattr(attention, "forward", fail_once)
    failed = session.send("a second question")
    assert failed.stats.finish_reason == "error" and "simulated" in failed.stats.error
    assert failed.stats.reused_tokens == cached
    assert failed.stats.prefilled_tokens == failed.stats.prompt_tokens - cached
    kept = len(session.cached_ids)
    if SPECS[strategy].strategy == "sink-quantized":  # layer 0 quantized a block in the failed pass: rebuilt
        assert kept in (cached, 0)
    else:
        assert kept == cached
    again = session.generate()
    assert again.stats.finish_reason in ("stop", "length"), again.stats.error
    assert again.stats.reused_tokens == kept
