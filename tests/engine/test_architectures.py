"""Every cache strategy on the architectures users run (issue 15 §1), on tiny random models (tests/tiny.py).

Per architecture × strategy: reuse gives the logits of recomputing (fp32, tight tolerance), an edit crops
and continues as a fresh run would (or falls back visibly), a chat of several turns past the model's own
window and the sink window reuses its history every turn (issue 23), a pass failing midway is taken back in
every layer, the sink cache re-positions keys for every RoPE variant (the windowed-recompute oracle),
quantized caches quantize only the full-attention layers, hybrid models keep their state-space states, and
`bytes_for` is what the cache holds.
"""

from __future__ import annotations

import functools

import pytest
import torch

from engine import caches
from engine.caches import CacheSpec
from engine.caches.base import cache_kwargs
from engine.caches.dynamic import WindowLayer
from engine.caches.quantized import QuantizedKVLayer
from engine.caches.shape import WINDOW, layer_kinds
from engine.caches.sink import SinkCache, SinkWindowLayer
from engine.sampling import SamplingSettings
from engine.session import ChatSession, Message, SessionSettings
from tests.tiny import ARCHITECTURES, LLAMA_ROPES, SLIDING, tiny_arch_model

EXACT = ["dynamic", "static", "offloaded"]
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=6, repetition_penalty=1.0)
TOL = 1e-4
SLIDES = {"mistral", "gemma2", "gemma3", "gpt_oss"}  # models with sliding-window layers
HYBRID = {"bamba"}


@functools.cache
def model(arch: str, **overrides):  # noqa: ANN001, ANN201
    return tiny_arch_model(arch, seed=1, **overrides)


def spec_for(strategy: str) -> CacheSpec:
    if strategy == "static":
        return CacheSpec("static", max_cache_len=256)
    if strategy in ("quantized", "sink-quantized"):
        extra = {"sink_tokens": 4, "window": 96} if strategy == "sink-quantized" else {}
        return CacheSpec(strategy, nbits=4, residual=16, q_group_size=16, axis_key=-1, axis_value=0, **extra)
    if strategy == "sink":
        return CacheSpec("sink", sink_tokens=4, window=48)
    return CacheSpec(strategy)


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def recompute(lm, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    """The next-token logits of `ids` computed from scratch, without a cache."""
    return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]


def session_for(lm, strategy: str) -> ChatSession:  # noqa: ANN001
    if strategy == "offloaded" and not torch.cuda.is_available():
        pytest.skip("the offloaded cache needs a CUDA GPU")
    return ChatSession(lm, SessionSettings(cache=spec_for(strategy), sampling=GREEDY, speculative="off"))


@pytest.mark.parametrize("strategy", EXACT)
@pytest.mark.parametrize("arch", ARCHITECTURES + LLAMA_ROPES[1:])
def test_reuse_equals_recompute_and_edits_crop_to_a_fresh_run(arch: str, strategy: str) -> None:
    lm = model(arch)
    session = session_for(lm, strategy)
    ids = ids_of(60, seed=2)
    # Prefill in uneven chunks, then one token at a time, well past the sliding window.
    session.forward_logits(ids[:23])
    session.forward_logits(ids[23:41])
    for k in range(41, 60):
        logits = session.forward_logits([ids[k]])
        assert torch.allclose(logits, recompute(lm, ids[: k + 1]), atol=TOL), (arch, k)
    # An edit: the conversation now diverges after token 30.
    edited = ids[:30] + ids_of(12, seed=5)
    session._crop(30)
    if session.cache_fallback is None:
        assert len(session.cached_ids) == 30
    else:  # a sliding window that slid, or a state-space state, cannot go back: recomputed, and said so
        assert arch in SLIDES | HYBRID, session.cache_fallback
        assert "recomputed" in session.cache_fallback
    rest = edited[len(session.cached_ids):]
    logits = session.forward_logits(rest)
    assert torch.allclose(logits, recompute(lm, edited), atol=TOL)
    if arch not in SLIDES | HYBRID:
        assert session.cache_fallback is None


@pytest.mark.parametrize("strategy", ["dynamic", "static", "quantized"])
@pytest.mark.parametrize("arch", sorted(SLIDES))
def test_sliding_layers_keep_their_native_window(arch: str, strategy: str) -> None:
    """Every strategy keeps a model's own sliding layers as transformers does (the last window - 1 tokens,
    full precision); only full-attention layers follow the strategy."""
    lm = model(arch)
    cache = caches.build_cache(spec_for(strategy), lm.config)
    session = session_for(lm, strategy)
    session.cache = cache
    session.forward_logits(ids_of(80, seed=3))
    kinds = [getattr(layer, "sliding", False) for layer in cache.layers]
    assert kinds == [kind == WINDOW for kind, _ in layer_kinds(lm.config)]
    for layer in cache.kv_layers:
        if layer.sliding:
            assert isinstance(layer, WindowLayer) and layer.keys.shape[-2] == SLIDING - 1
        elif strategy == "quantized":
            assert isinstance(layer, QuantizedKVLayer) and layer._quantized_length > 0


@pytest.mark.parametrize("strategy", ["quantized", "sink-quantized"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantized_strategies_run_every_architecture_with_a_bounded_error(arch: str, strategy: str) -> None:
    """4-bit: the full-attention layers are quantized (sliding layers keep their window, state-space layers
    their states), and the logits stay close to the full cache's."""
    if caches.backend_availability()["quanto"] is not None:
        pytest.skip("optimum-quanto is not installed")
    lm = model(arch)
    ids = ids_of(140, seed=4)
    session = session_for(lm, strategy)
    if strategy == "sink-quantized":  # a window holding everything: only the quantization differs
        session.settings.cache = spec_for(strategy).with_changes(window=400)
    exact = session_for(lm, "dynamic")
    for start in range(0, 130, 26):
        session.forward_logits(ids[start:start + 26])
        exact.forward_logits(ids[start:start + 26])
    got, want = session.forward_logits(ids[130:]), exact.forward_logits(ids[130:])
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.1 * scale, arch
    full = [layer for layer in session.cache.kv_layers if not layer.sliding]
    if arch == "mistral":  # every layer slides: nothing to quantize, nothing lost
        assert not full and torch.allclose(got, want, atol=TOL)
    if arch in HYBRID:
        assert session.cache.state_layers and all(s.holds_state() for s in session.cache.state_layers)


# ----- sinks: the windowed-recompute oracle per RoPE variant --------------------------------------------
# With one layer, a token's keys and values depend only on the token and its position, so a sink cache
# must equal re-encoding exactly the tokens it kept, at positions 0..n-1.
ONE_LAYER = [(arch, {"num_hidden_layers": 1}) for arch in LLAMA_ROPES + ["qwen2", "qwen3", "phi3"]] + [
    ("smollm3", {"num_hidden_layers": 1, "no_rope_layers": [1]}),  # a RoPE layer
    ("smollm3", {"num_hidden_layers": 1, "no_rope_layers": [0]}),  # a NoPE layer: keys never move
    ("gemma2", {"num_hidden_layers": 1, "layer_types": ["full_attention"]}),  # soft-capping
    ("gemma3", {"num_hidden_layers": 1, "layer_types": ["full_attention"]}),  # its global layers' RoPE
    ("gpt_oss", {"num_hidden_layers": 1, "layer_types": ["full_attention"]}),  # learned sinks, YaRN scaling
]


@pytest.mark.parametrize("arch, overrides", ONE_LAYER,
                         ids=[f"{a}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for a, o in ONE_LAYER])
def test_sink_matches_the_windowed_recompute_oracle(arch: str, overrides: dict) -> None:
    lm = tiny_arch_model(arch, seed=1, **overrides)
    spec = CacheSpec("sink", sink_tokens=4, window=48)
    session = ChatSession(lm, SessionSettings(cache=spec, speculative="off"))
    ids = ids_of(200, seed=6)
    for i in range(0, 199, 29):
        session.forward_logits(ids[i: min(i + 29, 199)])
    cache = session.cache
    assert isinstance(cache, SinkCache) and cache.evicted > 0
    logits = session.forward_logits([ids[-1]])
    kept = cache.get_seq_length() - 1
    stream = ids[:-1]
    kept_ids = stream[: spec.sink_tokens] + stream[len(stream) - (kept - spec.sink_tokens):] + [ids[-1]]
    assert torch.allclose(logits, recompute(lm, kept_ids), atol=TOL)


def test_sink_on_a_model_whose_layers_all_slide_is_the_models_own_window() -> None:
    """Mistral-style: no full-attention layer, so nothing to evict; the sink cache is the model's own window."""
    lm = model("mistral")
    session = session_for(lm, "sink")
    ids = ids_of(120, seed=7)
    session.forward_logits(ids[:70])
    for k in range(70, 120):
        logits = session.forward_logits([ids[k]])
    assert torch.allclose(logits, recompute(lm, ids), atol=TOL)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "gpt_oss"])
def test_sink_keeps_a_models_sliding_layers_and_renumbers_them_with_the_slots(arch: str) -> None:
    """Interleaved sliding and global layers: the global layers hold sinks + window, the sliding layers their
    own window, at the same positions (their keys moved by what was evicted, as the model's own rotary
    embedding would have placed them)."""
    lm = model(arch)
    spec = CacheSpec("sink", sink_tokens=4, window=48)
    session = session_for(lm, "sink")
    exact = session_for(lm, "dynamic")
    ids = ids_of(150, seed=8)
    for start in range(0, 150, 25):
        session.forward_logits(ids[start:start + 25])
        exact.forward_logits(ids[start:start + 25])
    cache = session.cache
    assert isinstance(cache, SinkCache) and cache.evicted > 0
    slots = cache.get_seq_length()
    assert slots <= spec.sink_tokens + spec.window
    first_global = min(i for i, layer in enumerate(cache.layers) if not getattr(layer, "sliding", False))
    for i, (layer, reference) in enumerate(zip(cache.layers, exact.cache.layers, strict=True)):
        if isinstance(layer, SinkWindowLayer):
            assert layer.cumulative_length == slots  # numbered like the global layers
        if isinstance(layer, SinkWindowLayer) and i < first_global:  # (later ones read what the sinks kept)
            assert torch.allclose(layer.values, reference.values, atol=TOL)  # the same window, untouched
            moved_back = layer.rotator.shift(layer.keys, cache.evicted)
            assert torch.allclose(moved_back, reference.keys, atol=1e-4)
    # and the chat goes on, at positions inside the window
    session.send("hello")
    assert caches.seq_length(session.cache) <= spec.sink_tokens + spec.window


# ----- a chat of several turns past every window (issue 23 §3) --------------------------------------------
# Each sliding model's own window both shorter than the sink window (SLIDING) and longer than the sink cache keeps
# (WIDE: Gemma 3 slides over 1,024 tokens where a sink window may be 64); in the second case its sliding layers
# hold tokens from before the sink cache's slot 0, the path on which Gemma 3's turn 2 crashed. Qwen2's mixed
# layers slide only from `max_window_layers` on (full attention first, then sliding). Models without a sliding
# layer take the path only with a sink cache (the one window they have).
WIDE = 96
SLIDING_MODELS = ([(arch, {}) for arch in sorted(SLIDES)]
                  + [(arch, {"sliding_window": WIDE}) for arch in sorted(SLIDES - {"mistral"})]
                  + [("qwen2", {"use_sliding_window": True, "sliding_window": SLIDING, "max_window_layers": 1})])
CHAT_CASES = ([(arch, o, strategy) for arch, o in SLIDING_MODELS
               for strategy in ("dynamic", "static", "offloaded", "quantized", "sink", "sink-quantized")]
              + [(arch, {}, strategy) for arch in ARCHITECTURES if arch not in SLIDES
                 for strategy in ("sink", "sink-quantized")])
CHAT = SamplingSettings(temperature=0.0, max_new_tokens=2, min_new_tokens=2, repetition_penalty=1.0)
TURNS = [f"turn {i}: a question long enough to push every window on" for i in range(3)]


def chat_spec(strategy: str) -> CacheSpec:
    """`spec_for`'s settings; a static cache with room for the whole chat."""
    return CacheSpec("static", max_cache_len=512) if strategy == "static" else spec_for(strategy)


def windows_of(lm) -> list[int]:  # noqa: ANN001
    """The model's own sliding windows (none for a model without sliding layers)."""
    return [size for kind, size in layer_kinds(lm.config) if kind == WINDOW]


@pytest.mark.parametrize("arch, overrides, strategy", CHAT_CASES,
                         ids=["-".join([a, *(f"{k}{v}" for k, v in o.items()), st]) for a, o, st in CHAT_CASES])
def test_a_chat_past_every_window_reuses_its_cache_every_turn(arch: str, overrides: dict, strategy: str) -> None:
    """Three turns, together longer than the model's own window and the sink cache: every turn runs and feeds only
    its new tokens; then the logits of a follow-up from the reused cache equal a recompute's (fp32) for an exact
    cache, and stay close for a quantized one; a sink cache stays within its slots and
    keeps the sliding layers before the first full-attention layer exactly as the full cache does (moved back by
    what it evicted), however far their window reaches."""
    if strategy in ("quantized", "sink-quantized") and caches.backend_availability()["quanto"] is not None:
        pytest.skip("optimum-quanto is not installed")
    if strategy == "offloaded" and not torch.cuda.is_available():
        pytest.skip("the offloaded cache needs a CUDA GPU")
    lm = model(arch, **overrides)
    spec = chat_spec(strategy)
    session = ChatSession(lm, SessionSettings(cache=spec, sampling=CHAT, speculative="off"))
    full_layers = [kind for kind, _ in layer_kinds(lm.config) if kind != WINDOW]
    # Nothing lossy happens where every layer slides (no full-attention layer to quantize or evict from).
    exact = strategy in EXACT or not full_layers
    reached_before_slot_0 = False
    for text in TURNS:
        cached = len(session.cached_ids)
        result = session.send(text)
        assert result.stats.finish_reason == "length", result.stats.error
        assert result.stats.reused_tokens == cached and result.stats.cache_fallback is None
        if isinstance(session.cache, SinkCache) and full_layers:
            assert session.cache.get_seq_length() <= spec.sink_tokens + spec.window
            reached_before_slot_0 |= any(w.keys.shape[-2] > w.cumulative_length for w in session.cache.window_layers)
    stream = list(session.cached_ids)
    assert len(stream) > max([*windows_of(lm), spec.sink_tokens + spec.window if spec.bounded_length else 0])

    session.messages.append(Message("user", "and a follow-up"))
    reused, logits = session.next_token_logits()
    assert reused == len(stream)
    want = recompute(lm, session.render_ids())
    if exact:
        assert torch.allclose(logits, want, atol=TOL), (logits - want).abs().max()
    elif strategy == "quantized":
        assert (logits - want).abs().max().item() <= 0.1 * want.abs().max().item()
    cache = session.cache
    if isinstance(cache, SinkCache) and full_layers:
        assert cache.evicted > 0
        if max(windows_of(lm), default=0) > spec.sink_tokens + spec.window:
            assert reached_before_slot_0  # the path this test is for was taken
        reference = ChatSession(lm, SessionSettings(speculative="off"))
        reference.forward_logits(session.cached_ids)
        for layer, full in zip(cache.layers, reference.cache.layers, strict=True):
            if not isinstance(layer, SinkWindowLayer):
                break  # from the first full-attention layer on, what the sinks kept feeds the rest
            assert torch.allclose(layer.values, full.values, atol=TOL)
            assert torch.allclose(layer.rotator.shift(layer.keys, cache.evicted), full.keys, atol=TOL)


@pytest.mark.parametrize("strategy", ["dynamic", "static", "quantized", "sink", "sink-quantized"])
def test_a_pass_failing_midway_is_taken_back_in_every_sliding_layer(strategy: str) -> None:
    """Layers are updated one after the other: when the third of Gemma 3's sliding layers fails, the two before it
    already hold the pass's tokens. Taking the pass back must bring each layer to the same length (a sink cache:
    its window layers to the slots its sink layers keep), or every later pass fails on the attention mask."""
    if strategy in ("quantized", "sink-quantized") and caches.backend_availability()["quanto"] is not None:
        pytest.skip("optimum-quanto is not installed")
    lm = model("gemma3", sliding_window=WIDE)
    attention = lm.model.model.layers[2].self_attn
    original = attention.forward

    def fail(*args, **kwargs):
        raise RuntimeError("simulated out-of-memory in layer 2")

    ids = ids_of(90, seed=10)
    for n in (30, 70):  # before the sink window is full, and after it evicted (the model's window never slid)
        session = session_for(lm, strategy)
        session.forward_logits(ids[:n])
        attention.forward = fail
        try:
            with pytest.raises(RuntimeError, match="simulated"):
                session.forward_logits(ids[n:n + 1])
            session._resync()
        finally:
            attention.forward = original
        assert len(session.cached_ids) == n, n  # taken back, not rebuilt
        cache = session.cache
        lengths = {int(layer.get_seq_length()) for layer in cache.kv_layers}
        assert lengths == {int(cache.get_seq_length())}, (n, lengths)
        logits = session.forward_logits(ids[n:n + 2])  # and the chat goes on
        if strategy in EXACT:
            assert torch.allclose(logits, recompute(lm, ids[:n + 2]), atol=TOL), n


# ----- hybrid models: state-space states kept; what cannot be cut back is recomputed, visibly ------------
@pytest.mark.parametrize("strategy", ["dynamic", "static", "quantized", "sink"])
def test_a_hybrid_model_regenerates_from_its_checkpoint_and_recomputes_edits_visibly(strategy: str) -> None:
    lm = model("bamba")
    session = session_for(lm, strategy)
    session.send("the first question " * 3)
    second = session.send("a second question")
    assert second.stats.reused_tokens > 0 and second.stats.cache_fallback is None
    assert all(s.holds_state() and s.nbytes() > 0 for s in session.cache.state_layers)
    again = session.regenerate()
    if strategy == "sink":  # a sink cache keeps no checkpoints: recomputed from the start, and said so
        assert again.stats.reused_tokens == 0 and "state-space" in again.stats.cache_fallback
    else:  # back to the checkpoint taken before the prompt's last token: nothing lost
        assert again.stats.reused_tokens == again.stats.prompt_tokens - 1
        assert again.stats.cache_fallback is None
    assert again.reply == second.reply  # greedy: the same reply
    edited = session.edit(len(session.messages) - 2, "an edited second question")
    assert edited.stats.cache_fallback is not None and "state-space" in edited.stats.cache_fallback
    if strategy != "sink":
        assert "turn boundary" in edited.stats.cache_fallback and edited.stats.reused_tokens > 0
    fresh = session_for(lm, strategy)
    fresh.messages = [m for m in session.messages[:-1]]
    assert fresh.generate().reply == edited.reply


def test_speculative_decoding_never_drafts_into_a_state_space_cache() -> None:
    lm = model("bamba")
    session = ChatSession(lm, SessionSettings(sampling=GREEDY, speculative="prompt-lookup"))
    session.send("repeat repeat repeat repeat repeat repeat")
    result = session.send("repeat repeat repeat repeat repeat repeat")
    assert result.stats.finish_reason in ("stop", "length")
    assert not session.cache.rewindable(2)


# ----- the advisor's byte counts are the bytes held -------------------------------------------------------
@pytest.mark.parametrize("strategy", ["dynamic", "static", "quantized", "sink", "sink-quantized"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bytes_for_is_what_the_cache_holds(arch: str, strategy: str) -> None:
    if strategy in ("quantized", "sink-quantized") and caches.backend_availability()["quanto"] is not None:
        pytest.skip("optimum-quanto is not installed")
    lm = model(arch)
    spec = spec_for(strategy)
    cache = caches.build_cache(spec, lm.config)
    ids = ids_of(200, seed=9)
    fed = 0
    with torch.inference_mode():
        for n in (7, 30, 1, 1, 64, 97):
            lm.model(input_ids=torch.tensor([ids[fed:fed + n]]), **cache_kwargs(lm.model, cache), use_cache=True,
                     position_ids=torch.arange(cache.get_seq_length(), cache.get_seq_length() + n)[None])
            fed += n
            estimate, held = caches.bytes_for(spec, fed, lm.config), caches.cache_bytes(cache)
            if strategy == "sink" and cache.evicted:  # evicts in batches: the estimate is its ceiling
                assert held <= estimate, (fed, strategy)
            else:
                assert estimate == held, (fed, strategy)
    states = [s.nbytes() for s in cache.state_layers]
    assert len(set(states)) <= 1  # constant, whatever the length
