"""The quantized KV cache: faithful enough to chat with, as small as promised, croppable anywhere."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig

from engine import caches
from engine.bench.workload import LONG_TEXT_PATH
from engine.caches import CacheConfigError, CacheSpec, hqq_blocks, quantizers
from engine.caches import quantized as quantized_cache
from engine.caches.base import cache_kwargs
from engine.caches.quantizers import HQQQuantizer, QuantoQuantizer
from engine.perplexity import perplexity
from engine.sampling import SamplingSettings
from engine.session import ChatSession, SessionSettings

ALICE = LONG_TEXT_PATH
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=24, repetition_penalty=1.0)
FOUR_BIT = CacheSpec(strategy="quantized", **caches.quantization_defaults(4))
TWO_BIT = CacheSpec(strategy="quantized", **caches.quantization_defaults(2))
# SmolLM2-135M's KV shape per layer (3 KV heads of 64), in 2 layers instead of 30 to stay fast.
SMOLLM2_SHAPE = LlamaConfig(num_hidden_layers=2, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                            head_dim=64, intermediate_size=1536, vocab_size=256)

SETTINGS = [
    CacheSpec(strategy="quantized", nbits=nbits, axis_key=axis_key, axis_value=axis_value, q_group_size=group,
              residual=residual)
    for nbits, axis_key, axis_value, group, residual in [
        (4, -1, 0, 64, 128), (2, -1, 0, 32, 128), (4, 0, 0, 64, 0), (2, -1, -1, 128, 32), (4, 0, -1, 16, 256),
        (2, 0, 0, 128, 64),
    ]
] + [
    CacheSpec(strategy="quantized", nbits=nbits, axis_key=axis_key, axis_value=axis_value, q_group_size=group,
              residual=residual, backend="hqq")
    for nbits, axis_key, axis_value, group, residual in [(4, -1, 0, 64, 128), (2, -1, 0, 32, 128), (2, 0, -1, 128, 32)]
]
FOUR_BIT_HQQ = FOUR_BIT.with_changes(backend="hqq")
TWO_BIT_HQQ = TWO_BIT.with_changes(backend="hqq")
BOTH_BACKENDS = pytest.mark.parametrize("spec", [FOUR_BIT, TWO_BIT, FOUR_BIT_HQQ, TWO_BIT_HQQ],
                                        ids=["4-bit", "2-bit", "4-bit-hqq", "2-bit-hqq"])


def feed(lm, cache, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Feed `ids` in chunks through `cache` as the session does; the logits of every position."""
    out = []
    start = caches.seq_length(cache)
    pos = 0
    with torch.inference_mode():
        for n in chunks:
            piece = torch.tensor([ids[pos : pos + n]])
            positions = torch.arange(start + pos, start + pos + n).unsqueeze(0)
            out.append(lm.model(input_ids=piece, **cache_kwargs(lm.model, cache), position_ids=positions,
                                use_cache=True).logits[0])
            pos += n
    return torch.cat(out)


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def spec_id(spec: CacheSpec) -> str:
    return f"{spec.backend}-{spec.nbits}b-k{spec.axis_key}v{spec.axis_value}g{spec.q_group_size}r{spec.residual}"


@pytest.mark.parametrize("spec", SETTINGS, ids=spec_id)
def test_bytes_for_is_what_the_cache_holds_at_any_length_and_after_crops(tiny_lm, spec) -> None:
    """The memory estimate the UI shows is the memory the cache really takes, however the chat was fed."""
    cache = caches.build_cache(spec, tiny_lm.config)
    ids = random_ids(400)
    fed = 0
    for n in (100, 37, 1, 1, 64, 197):
        feed(tiny_lm, cache, ids[fed : fed + n], [n])
        fed += n
        assert cache.get_seq_length() == fed
        assert caches.cache_bytes(cache) == caches.bytes_for(spec, fed, tiny_lm.config)
    for length in (390, 250, 130, 5, 0):
        assert cache.crop_to(length)
        assert caches.cache_bytes(cache) == caches.bytes_for(spec, length, tiny_lm.config)
    assert not cache.crop_to(1), "cannot grow by cropping"


@BOTH_BACKENDS
def test_bytes_for_matches_the_real_model_shapes(spec) -> None:
    """On SmolLM2's layer shape (3 KV heads of 64) the estimate is exact at chat-like lengths."""
    cache = caches.build_cache(spec, SMOLLM2_SHAPE)
    generator = torch.Generator().manual_seed(0)
    fed = 0
    for n in (700, 1, 1, 300, 3000):
        for layer_idx in range(2):
            kv = torch.randn(1, 3, n, 64, generator=generator)
            cache.update(kv, kv, layer_idx)
        fed += n
        assert caches.cache_bytes(cache) == caches.bytes_for(spec, fed, SMOLLM2_SHAPE)


def test_four_bit_cache_is_at_most_35_percent_of_the_full_cache_at_4000_tokens() -> None:
    dynamic = caches.bytes_for(CacheSpec(), 4000, SMOLLM2_SHAPE)
    assert caches.bytes_for(FOUR_BIT, 4000, SMOLLM2_SHAPE) <= 0.35 * dynamic
    assert caches.bytes_for(TWO_BIT, 4000, SMOLLM2_SHAPE) < caches.bytes_for(FOUR_BIT, 4000, SMOLLM2_SHAPE)


def test_requantizing_dequantized_values_gives_back_the_same_integers() -> None:
    """Why a crop or a flush, which re-quantize the history, lose nothing more."""
    quanto = QuantoQuantizer(2, 32)
    x = torch.randn(1, 3, 256, 64, generator=torch.Generator().manual_seed(1))
    for axis in (0, -1):
        q = quanto.quantize(x, axis)
        again = quanto.quantize(quanto.dequantize(q), axis)
        assert torch.equal(again._data._data, q._data._data)
        torch.testing.assert_close(quanto.dequantize(again), quanto.dequantize(q), rtol=0, atol=1e-5)


@pytest.mark.parametrize("nbits", [2, 4])
def test_unpacking_reads_quantos_layout(nbits) -> None:
    """Our pure-torch unpacking (which needs no compiled kernel) reads quanto's packed layout exactly."""
    quanto = QuantoQuantizer(nbits, 64)
    x = torch.randn(1, 2, 128, 64, generator=torch.Generator().manual_seed(2))
    for axis in (0, -1):
        q = quanto.quantize(x, axis)
        rows = q._data.shape[0]
        expected = _reference_unpack(q._data._data, nbits)[:rows]
        assert torch.equal(quantizers._unpack(q._data._data, nbits, rows), expected)


def _reference_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    # quanto's own "default" (pure Python) implementation, copied from optimum/quanto/library/unpack.py
    unpacked = []
    for i in range(8 // bits):
        mask = 2 ** (bits * (i + 1)) - 1
        unpacked.append((packed & mask) >> (bits * i))
    return torch.cat(unpacked).to(torch.uint8)


@BOTH_BACKENDS
def test_crop_then_continue_matches_a_fresh_run(tiny_lm, spec) -> None:
    """Editing or regenerating crops the cache back into its quantized part; what follows is
    what a cache that never saw the dropped tokens gives."""
    ids = random_ids(420, seed=3)
    cache = caches.build_cache(spec, tiny_lm.config)
    feed(tiny_lm, cache, ids[:400], [64] * 6 + [16])
    assert cache.crop_to(200)  # 400 → 200: well into the quantized part
    continued = feed(tiny_lm, cache, ids[200:260], [60])

    fresh_cache = caches.build_cache(spec, tiny_lm.config)
    fresh = feed(tiny_lm, fresh_cache, ids[:260], [64, 64, 72, 60])[200:]
    dynamic = feed(tiny_lm, caches.build_cache(CacheSpec(), tiny_lm.config), ids[:260], [260])[200:]

    # The dropped tokens had pushed part of the kept history into the quantized part, which stays
    # quantized: the gap is of the order of the quantization error itself, not more.
    gap = (continued - fresh).abs().max()
    quantization_error = (fresh - dynamic).abs().max()
    assert gap <= 2 * quantization_error + 1e-4
    assert caches.cache_bytes(cache) == caches.cache_bytes(fresh_cache)


def test_cropping_within_the_residual_is_exact(tiny_lm) -> None:
    ids = random_ids(300, seed=4)
    cache = caches.build_cache(FOUR_BIT, tiny_lm.config)
    feed(tiny_lm, cache, ids[:250], [250])
    assert cache.crop_to(240)
    continued = feed(tiny_lm, cache, ids[240:300], [60])
    fresh_cache = caches.build_cache(FOUR_BIT, tiny_lm.config)
    fresh = feed(tiny_lm, fresh_cache, ids[:300], [240, 60])[240:]
    torch.testing.assert_close(continued, fresh, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", [TWO_BIT, TWO_BIT_HQQ], ids=["quanto", "hqq"])
def test_a_chat_reuses_the_quantized_cache_across_turns(tiny_lm, spec) -> None:
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
    previous = 0
    for text in ("Hello there, how are you today?", "Tell me about caches, at some length please.",
                 "And what about quantization?", "Thanks!"):
        stats = session.send(text).stats
        assert stats.error is None
        assert stats.reused_tokens == previous
        assert stats.cache_bytes == caches.bytes_for(spec, stats.cache_tokens, tiny_lm.config)
        previous = stats.cache_tokens
    assert previous > 200, "long enough that part of the history is quantized"
    regenerated = session.regenerate().stats  # crops back to before the last reply
    assert regenerated.error is None and regenerated.reused_tokens > 0


@pytest.mark.parametrize("strategy", ["quantized", "sink-quantized"])
def test_a_missing_backend_is_explained(tiny_lm, monkeypatch, strategy) -> None:
    monkeypatch.setattr(caches, "backend_availability",
                        lambda: {"quanto": None, "hqq": "HQQ is not installed (pip install hqq)."})
    with pytest.raises(CacheConfigError, match="pip install hqq"):
        caches.build_cache(CacheSpec(strategy=strategy, backend="hqq", window=256), tiny_lm.config)
    assert caches.build_cache(CacheSpec(strategy=strategy, window=256), tiny_lm.config) is not None


def test_hqq_appends_and_crops_without_requantizing() -> None:
    """HQQ's optimised scales would not come back from de-quantized values, so its blocks are
    stored as groups that a crop slices and a flush appends to: a crop keeps the very same bytes."""
    layer = quantized_cache.QuantizedKVLayer(HQQQuantizer(2, 32), axis_key=-1, axis_value=0, residual_length=0,
                                             block=64)
    x = torch.randn(1, 3, 256, 64, generator=torch.Generator().manual_seed(5))
    for n in (64, 64, 128):
        start = layer.get_seq_length()
        layer.update(x[..., start : start + n, :], x[..., start : start + n, :])
    first = hqq_blocks.quantize(x[..., :64, :].contiguous(), -1, 2, 32)
    whole = layer._quantized_keys
    assert whole.tokens == 256
    assert torch.equal(whole.head(64).packed, first.packed) and torch.equal(whole.head(64).scale, first.scale)
    assert layer.crop_to(128)
    assert torch.equal(layer._quantized_keys.packed, whole.head(128).packed)
    error = (layer.full_kv()[0] - x[..., :128, :]).abs().mean()
    assert 0 < error < 0.5  # 2 bits: lossy, but close


@pytest.mark.parametrize("nbits", [2, 4])
def test_hqq_packing_round_trips(nbits) -> None:
    ints = torch.randint(0, 2**nbits, (5, 7, 32), generator=torch.Generator().manual_seed(nbits))
    packed = hqq_blocks._pack(ints, nbits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, 32 * nbits // 8)
    assert torch.equal(hqq_blocks._unpack(packed, nbits), ints.to(torch.uint8))


def test_hqq_fits_two_bits_better_than_min_max() -> None:
    """What the backend is for: at 2 bits its solver's error is below quanto's min/max rounding."""
    x = torch.randn(1, 3, 256, 64, generator=torch.Generator().manual_seed(6))
    quanto = QuantoQuantizer(2, 32)
    quanto_error = (quanto.dequantize(quanto.quantize(x, -1)) - x).pow(2).mean()
    hqq_error = (hqq_blocks.quantize(x, -1, 2, 32).dequantize() - x).pow(2).mean()
    assert hqq_error < quanto_error


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_warm_up_is_done_once_even_from_two_threads(backend, monkeypatch) -> None:
    """As in a fresh run (an earlier test may have warmed the library up in this process)."""
    monkeypatch.setattr(quantized_cache, "_warmed", set())
    made: list[str] = []
    real = quantized_cache.make_quantizer
    monkeypatch.setattr(quantized_cache, "make_quantizer", lambda spec: made.append(spec.backend) or real(spec))
    said: list[str] = []
    threads = [threading.Thread(target=quantized_cache.warm_up, args=(backend, said.append)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [backend] and len(said) == 1  # one thread did the work and said so; the other waited
    assert quantized_cache.warm_up(backend) == 0.0 and made == [backend]


def test_no_compiled_kernel_is_needed(tiny_lm) -> None:
    """quanto compiles a C++ unpacking kernel on first use (33 s–2 min, and a compiler); we never call it."""
    from optimum.quanto.library.extensions import cpp

    cache = caches.build_cache(FOUR_BIT, tiny_lm.config)
    feed(tiny_lm, cache, random_ids(300), [300])
    feed(tiny_lm, cache, random_ids(1), [1])
    assert cpp.ext._lib is None


@pytest.mark.real_model
def test_four_bit_perplexity_is_within_5_percent_of_the_full_cache(real_lm) -> None:
    text = ALICE.read_text(encoding="utf-8")
    full = perplexity(real_lm, text, CacheSpec(), max_tokens=512, chunk=64)
    four = perplexity(real_lm, text, FOUR_BIT, max_tokens=512, chunk=64)
    assert four.ppl <= 1.05 * full.ppl
    assert four.cache_bytes == caches.bytes_for(FOUR_BIT, 512, real_lm.config)
    assert four.cache_bytes < 0.5 * full.cache_bytes
