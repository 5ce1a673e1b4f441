"""Attention sinks: constant memory, correct re-positioning, endless chats (tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine import caches
from engine.caches import CacheConfigError, CacheSpec
from engine.caches.base import cache_kwargs
from engine.caches.sink import RopeRotator, SinkCache, evict_batch_for
from engine.perplexity import perplexity
from engine.sampling import SamplingSettings
from engine.session import ChatSession, SessionSettings
from tests.tiny import tiny_loaded_model

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=16, repetition_penalty=1.0)
TEXT = "Attention sinks let a model read far past its context. " * 40


@pytest.fixture(scope="module")
def one_layer_lm():
    # With one layer, a token's keys and values depend only on the token and its position, so a
    # sink cache must equal re-encoding exactly the tokens it kept.
    return tiny_loaded_model(seed=3, layers=1)


def test_rotator_moves_keys_like_the_models_own_rotary_embedding(tiny_lm) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = tiny_lm.model.model.rotary_emb
    k = torch.randn(1, 2, 5, 16)
    def rotated_at(start: int) -> torch.Tensor:
        pos = torch.arange(start, start + 5)[None]
        cos, sin = rotary(k, pos)
        return apply_rotary_pos_emb(k, k, cos, sin)[1]
    rotator = RopeRotator(tiny_lm.config)
    assert torch.allclose(rotator.shift(rotated_at(40), -33), rotated_at(7), atol=1e-5)
    assert torch.allclose(rotator.rotate_positions(k, 12), rotated_at(12), atol=1e-5)
    assert torch.allclose(rotator.rotate_positions(rotated_at(12), 12, sign=-1), k, atol=1e-5)


def test_window_holding_the_whole_text_equals_dynamic(tiny_lm) -> None:
    dynamic = perplexity(tiny_lm, TEXT, CacheSpec())
    sink = perplexity(tiny_lm, TEXT, CacheSpec("sink", sink_tokens=4, window=4000))
    assert round(sink.ppl, 4) == round(dynamic.ppl, 4)


def test_after_eviction_attention_sees_sinks_and_window_at_contiguous_positions(one_layer_lm) -> None:
    lm = one_layer_lm
    spec = CacheSpec("sink", sink_tokens=4, window=64)
    session = ChatSession(lm, SessionSettings(cache=spec))
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:300]
    for i in range(0, len(ids) - 1, 37):
        session.forward_logits(ids[i : min(i + 37, len(ids) - 1)])
    cache = session.cache
    assert isinstance(cache, SinkCache) and cache.evicted > 0
    kept = cache.get_seq_length()
    assert spec.window - evict_batch_for(spec.window) <= kept - spec.sink_tokens <= spec.window
    logits = session.forward_logits([ids[-1]])
    # Re-encode exactly the kept tokens (sinks + recent) from scratch at positions 0..n-1.
    stream = ids[:-1]
    kept_ids = stream[: spec.sink_tokens] + stream[len(stream) - (kept - spec.sink_tokens) :] + [ids[-1]]
    fresh = lm.model(input_ids=torch.tensor([kept_ids])).logits[0, -1]
    assert torch.max(torch.abs(logits - fresh)).item() < 1e-4


def test_memory_stays_flat_far_beyond_the_context(tiny_lm) -> None:
    # 20k tokens through a model whose context is 1,024.
    spec = CacheSpec("sink", sink_tokens=4, window=256)
    text = ("Endless chats need constant memory. " * 600)[:20_000]
    session = ChatSession(tiny_lm, SessionSettings(cache=spec))
    ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 20_000 > tiny_lm.context_length
    sizes = []
    for i in range(0, len(ids), 500):
        session.forward_logits(ids[i : i + 500])
        assert caches.seq_length(session.cache) <= spec.sink_tokens + spec.window
        sizes.append(caches.cache_bytes(session.cache))
    assert max(sizes[2:]) == min(sizes[2:])
    assert max(sizes) <= caches.bytes_for(spec, len(ids), tiny_lm.config)
    assert caches.bytes_for(spec, len(ids), tiny_lm.config) == caches.bytes_for(spec, 10**6, tiny_lm.config)


def test_chat_beyond_the_window_prefills_only_new_tokens(tiny_lm) -> None:
    spec = CacheSpec("sink", sink_tokens=4, window=128)
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
    previous = 0
    for i in range(8):
        result = session.send(f"message number {i}: " + "words " * 10)
        assert result.stats.reused_tokens == previous
        assert result.stats.cache_tokens <= spec.sink_tokens + spec.window
        previous = len(session.cached_ids)
    assert session.cache.evicted > 0


def test_long_first_prompt_keeps_its_tail(tiny_lm) -> None:
    spec = CacheSpec("sink", sink_tokens=4, window=64)
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
    result = session.send("a long opening message " * 50)  # ~1,200 tokens, longer than context
    assert result.stats.prompt_tokens > tiny_lm.context_length
    assert result.stats.finish_reason in ("stop", "length")
    assert result.stats.cache_tokens <= 68


def test_editing_an_evicted_message_recomputes_from_the_kept_text(tiny_lm) -> None:
    spec = CacheSpec("sink", sink_tokens=4, window=96)
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
    for i in range(5):
        session.send(f"turn {i} " + "filler " * 12)
    assert session.cache.evicted > 0
    result = session.edit(0, "the first message, edited")
    assert result.stats.reused_tokens == 0  # its tokens were evicted: recomputed
    fresh = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
    fresh.messages = copy.deepcopy(session.messages[:-1])
    assert fresh.generate().reply == result.reply


def test_regenerate_inside_the_window_reuses_the_cache(tiny_lm) -> None:
    spec = CacheSpec("sink", sink_tokens=4, window=96)
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
    for i in range(5):
        session.send(f"turn {i} " + "filler " * 12)
    result = session.regenerate()
    assert result.stats.reused_tokens == result.stats.prompt_tokens - 1


@pytest.mark.parametrize("evicting", [False, True])
def test_sink_quantized_takes_back_a_reply_longer_than_its_residual(tiny_lm, evicting) -> None:
    """Regenerating (or asking something else instead) crops the last reply away; a reply longer than
    the full-precision residual reaches into quantized blocks, which go back into the residual instead
    of the whole cache being recomputed."""
    spec = CacheSpec("sink-quantized", sink_tokens=4, window=160 if evicting else 900, nbits=4, residual=32,
                     q_group_size=32, axis_key=-1)
    long = SamplingSettings(temperature=0.0, max_new_tokens=80, min_new_tokens=80, repetition_penalty=1.0)
    session = ChatSession(tiny_lm, SessionSettings(sampling=long, cache=spec, speculative="off"))
    for i in range(4):
        session.send(f"turn {i} " + "filler " * 12)
    assert session.cache.sink_layers[0].blocks  # part of the last reply is quantized
    assert (session.cache.evicted > 0) == evicting
    result = session.regenerate()
    assert result.stats.finish_reason == "length", result.stats.error
    assert result.stats.reused_tokens == result.stats.prompt_tokens - 1  # only the last prompt token fed again


@pytest.mark.parametrize("kwargs, message", [
    ({"sink_tokens": 4, "window": 4}, "larger than the sink"),
    ({"sink_tokens": -1, "window": 64}, "0 or more"),
])
def test_invalid_sink_settings_are_explained(kwargs, message) -> None:
    with pytest.raises(CacheConfigError, match=message):
        CacheSpec("sink", **kwargs).validate()


def test_a_sink_quantized_residual_must_fit_in_its_window(tiny_lm) -> None:
    with pytest.raises(CacheConfigError, match="smaller than the window"):
        CacheSpec("sink-quantized", sink_tokens=4, window=600, residual=640).validate()
    # 40 tokens, in groups of 32 tokens per channel, make blocks of 64: more than a window of 48
    spec = CacheSpec("sink-quantized", sink_tokens=4, window=48, residual=40, q_group_size=32, axis_key=-1)
    with pytest.raises(CacheConfigError, match="smaller than one quantized block"):
        caches.build_cache(spec.validate(), tiny_lm.config)


def test_window_must_fit_the_context(tiny_lm) -> None:
    session = ChatSession(tiny_lm, SessionSettings(cache=CacheSpec("sink", sink_tokens=4, window=2000)))
    with pytest.raises(CacheConfigError, match="context"):
        session.send("hi")


@pytest.mark.parametrize("backend, residual", [("quanto", 64), ("hqq", 64), ("quanto", 40), ("hqq", 0)])
def test_sink_quantized_bytes_for_is_what_it_holds_and_stays_flat(tiny_lm, backend, residual) -> None:
    """The estimate the advisor and the settings panel show is exactly the bytes held, up to and
    far past the window; the memory stops growing once the window is full. A residual that is
    not a whole number of groups (or 0) is rounded up to one."""
    if caches.backend_availability()[backend] is not None:
        pytest.skip(caches.backend_availability()[backend])
    spec = CacheSpec("sink-quantized", sink_tokens=4, window=256, nbits=4, residual=residual, q_group_size=32,
                     axis_key=-1, axis_value=0, backend=backend)
    cache = caches.build_cache(spec, tiny_lm.config)
    ids = torch.randint(0, 250, (1, 1200), generator=torch.Generator().manual_seed(7))
    fed, held = 0, []
    with torch.inference_mode():
        for n in (100, 64, 1, 1, 200, 300, 64, 470):
            positions = torch.arange(fed, fed + n).unsqueeze(0)
            tiny_lm.model(input_ids=ids[:, fed : fed + n], **cache_kwargs(tiny_lm.model, cache), position_ids=positions,
                          use_cache=True)
            fed += n
            real = caches.cache_bytes(cache)
            estimate = caches.bytes_for(spec, fed, tiny_lm.config)
            assert estimate == real, (fed, estimate, real)
            held.append(real)
    assert max(held[-3:]) <= max(caches.bytes_for(spec, n, tiny_lm.config) for n in range(10**6, 10**6 + 256))
    assert max(held) < caches.bytes_for(CacheSpec("sink", sink_tokens=4, window=256), 10**6, tiny_lm.config) * 0.5


@pytest.mark.parametrize("strategy", ["sink", "sink-quantized"])
def test_a_forward_pass_failing_midway_never_leaves_layers_that_disagree(tiny_lm, strategy) -> None:
    """Layers are updated one after the other: if a later layer fails after an earlier one has
    evicted (or quantized a block), the cache cannot be cropped back consistently and is rebuilt."""
    attention = tiny_lm.model.model.layers[1].self_attn
    original = attention.forward

    def fail(*args, **kwargs):
        raise RuntimeError("simulated out-of-memory in layer 1")

    spec = CacheSpec(strategy=strategy, sink_tokens=4, window=40, residual=8, q_group_size=16)
    for n in range(20, 90, 3):
        session = ChatSession(tiny_lm, SessionSettings(cache=spec))
        session.forward_logits([10 + i % 200 for i in range(n)])
        attention.forward = fail
        try:
            with pytest.raises(RuntimeError):
                session.forward_logits([7])
            session._resync()
        finally:
            attention.forward = original
        if session.cache is not None:
            layers = session.cache.sink_layers
            assert len({layer.get_seq_length() for layer in layers}) == 1, n
            assert len({layer.evicted for layer in layers}) == 1, n
            assert len({layer.fed for layer in layers}) == 1 and layers[0].fed == len(session.cached_ids), n
        session.forward_logits([8, 9, 10])  # and the chat goes on
