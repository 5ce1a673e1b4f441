"""The memory advisor, checked against byte counts computed by hand for real model shapes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from engine import caches, cli, memory
from engine.caches import CacheSpec

GIB = 1024**3
BF16 = torch.bfloat16

LLAMA_1B = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                       tie_word_embeddings=True)
LLAMA_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                       tie_word_embeddings=False)
QWEN_7B = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                      tie_word_embeddings=False)


def llama_params(h: int, inter: int, layers: int, heads: int, kv: int, hd: int, vocab: int, tied: bool,
                 qkv_bias: bool = False) -> int:
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + (heads * hd + 2 * kv * hd if qkv_bias else 0)
    per_layer = attn + 3 * h * inter + 2 * h
    return vocab * h * (1 if tied else 2) + layers * per_layer + h


@pytest.mark.parametrize("config, kv_bytes_per_token, params", [
    (LLAMA_1B, 2 * 16 * 8 * 64 * 2, llama_params(2048, 8192, 16, 32, 8, 64, 128256, True)),
    (LLAMA_8B, 2 * 32 * 8 * 128 * 2, llama_params(4096, 14336, 32, 32, 8, 128, 128256, False)),
    (QWEN_7B, 2 * 28 * 4 * 128 * 2, llama_params(3584, 18944, 28, 28, 4, 128, 152064, False, qkv_bias=True)),
])
def test_kv_and_weight_bytes_match_hand_counts(config, kv_bytes_per_token, params) -> None:
    assert caches.bytes_for(CacheSpec(), 1000, config, BF16) == 1000 * kv_bytes_per_token
    assert memory.weights_bytes_for(config, BF16) == 2 * params


def test_known_per_token_figures() -> None:
    # 2 (K and V) × layers × KV heads × head dim × 2 bytes: 2·16·8·64·2 = 32 KiB for the 1B shape,
    # 2·32·8·128·2 = 128 KiB for the 8B shape, 2·28·4·128·2 = 56 KiB for Qwen2.5-7B.
    assert caches.bytes_for(CacheSpec(), 1, LLAMA_1B, BF16) == 32 * 1024
    assert caches.bytes_for(CacheSpec(), 1, LLAMA_8B, BF16) == 128 * 1024
    assert caches.bytes_for(CacheSpec(), 1, QWEN_7B, BF16) == 56 * 1024


@pytest.mark.parametrize("config, gib, context, expected", [
    (LLAMA_1B, 8, 131072, "dynamic"),      # 4 GiB of KV beside 2.3 GiB of weights
    (LLAMA_1B, 12, 131072, "dynamic"),
    (LLAMA_8B, 8, 131072, None),           # 15 GiB of weights do not fit
    (LLAMA_8B, 12, 131072, None),
    (LLAMA_8B, 24, 131072, "quantized"),   # 16 GiB of KV do not fit in ~6.6 GiB; 4-bit does
    (LLAMA_8B, 24, 16384, "dynamic"),      # 2 GiB of KV fit
    (LLAMA_8B, 80, 131072, "dynamic"),
    (QWEN_7B, 24, 32768, "dynamic"),       # 1.75 GiB of KV
    (QWEN_7B, 12, 32768, None),
    (QWEN_7B, 80, 32768, "dynamic"),
])
def test_recommendations_for_real_shapes(config, gib, context, expected) -> None:
    hw = memory.simulated_hardware(gib, 64)
    advice = memory.advise(config, hw, context=context, dtype=BF16)
    chosen = advice.recommended.spec.strategy if advice.recommended else None
    assert chosen == expected, advice.explanation
    assert advice.explanation
    weights = memory.weights_bytes_for(config, BF16)
    assert advice.kv_budget == int(gib * GIB - weights - 0.10 * gib * GIB)
    dyn = advice.estimates[0]
    if advice.kv_budget > 0:
        assert dyn.tokens_fit == advice.kv_budget // caches.bytes_for(CacheSpec(), 1, config, BF16)


def test_sink_is_recommended_when_nothing_else_holds_the_context() -> None:
    hw = memory.simulated_hardware(18, 20)
    advice = memory.advise(LLAMA_8B, hw, context=1_000_000, dtype=BF16)
    assert advice.recommended is not None and advice.recommended.spec.bounded_length
    assert "attention sinks" in advice.explanation


def test_bounded_strategies_fit_any_length() -> None:
    spec = CacheSpec("sink", sink_tokens=4, window=4096)
    assert memory.tokens_that_fit(spec, LLAMA_8B, BF16, 1 * GIB) is None
    assert memory.tokens_that_fit(spec, LLAMA_8B, BF16, 1024) == 0


def test_offloaded_uses_host_ram_and_needs_a_gpu() -> None:
    gpu = memory.advise(LLAMA_8B, memory.simulated_hardware(24, 64), context=131072, dtype=BF16)
    off = next(e for e in gpu.estimates if e.spec.strategy == "offloaded")
    assert off.available and off.tokens_fit and off.tokens_fit > 131072
    cpu = memory.advise(LLAMA_1B, memory.simulated_hardware(None, 32), context=8192)
    assert not next(e for e in cpu.estimates if e.spec.strategy == "offloaded").available


def test_advise_command_prints_json(tmp_path, capsys) -> None:
    folder = tmp_path / "cfg"
    LLAMA_8B.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")  # config-only use: weights are never read
    assert cli.main(["advise", "--model", str(folder), "--vram-gib", "24", "--ram-gib", "64", "--context", "131072",
                     "--dtype", "bfloat16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommended"]["strategy"] == "quantized"
    assert data["simulated"] is True


def test_a_loaded_split_model_counts_the_gpu_layers_kv_on_the_gpu_and_the_rest_in_ram() -> None:
    """A loaded Llama-3.1-8B with 16 of its 32 layers on an 8 GiB GPU: the GPU holds half of each token's KV, so
    twice the tokens fit there than if every layer's KV were on the GPU; RAM (64 GiB) holds the other half."""
    hardware = memory.simulated_hardware(8, 64)
    weights = 6 * GIB  # the GPU's half of the weights, already loaded (not in its free figure): as a running app
    whole = memory.advise(LLAMA_8B, hardware, dtype=BF16, weights_bytes=weights, weights_loaded=True)
    split = memory.advise(LLAMA_8B, hardware, dtype=BF16, weights_bytes=weights, weights_loaded=True, gpu_layers=16)
    dyn_whole, dyn_split = (next(e for e in a.estimates if e.spec.strategy == "dynamic") for a in (whole, split))
    per_token = 32 * 2 * 8 * 128 * 2  # layers × (K, V) × KV heads × head dim × bf16 bytes: 128 KiB
    assert dyn_whole.tokens_fit == whole.kv_budget // per_token
    assert dyn_split.tokens_fit == whole.kv_budget * 32 // 16 // per_token  # half of each token on the GPU
    off = next(e for e in split.estimates if e.spec.strategy == "offloaded")
    assert off.tokens_fit == 0  # the offloaded cache streams every layer through the GPU: not with a split


def _rung(spec: CacheSpec) -> str:
    if spec.strategy == "quantized":
        return f"quantized-{spec.nbits}"
    return spec.strategy


@pytest.mark.parametrize("context", [8_192, 40_000, 100_000, 250_000, 420_000, 2_000_000])
def test_one_auto_ladder_for_a_loaded_model_and_for_the_load_time_plan(context: int) -> None:
    """The app's `auto` (a loaded model: `advise` with its weights) and the load-time plan (`advise(weights=...)`)
    walk one ladder: dynamic → 4-bit → offloaded → 2-bit → sinks. With the weights fixed to bf16 on a 24 GiB GPU
    (no split possible: the plan's only precision), both choose the same rung at every length; at 250k tokens
    neither the full nor the 4-bit cache fits, and lossless offloading comes before 2-bit KV (+18% perplexity)."""
    hardware = memory.simulated_hardware(24, 64)
    loaded = memory.advise(LLAMA_8B, hardware, context=context, dtype=BF16)
    planned = memory.advise(LLAMA_8B, hardware, context=context, dtype=BF16, weights="bf16")
    assert planned.weight_plan is not None and not planned.weight_plan.split
    assert loaded.recommended is not None and planned.recommended is not None
    assert _rung(loaded.recommended.spec) == _rung(planned.recommended.spec), (loaded.explanation,
                                                                               planned.explanation)
    expected = {8_192: "dynamic", 40_000: "dynamic", 100_000: "quantized-4", 250_000: "offloaded",
                420_000: "offloaded", 2_000_000: "sink"}[context]
    assert _rung(loaded.recommended.spec) == expected, loaded.explanation


def test_two_bit_kv_only_where_nothing_lossless_fits() -> None:
    """On a CPU (no offloading) the ladder goes from 4-bit straight to 2-bit, then sinks."""
    hardware = memory.simulated_hardware(None, 24)
    names = [_rung(memory.advise(LLAMA_8B, hardware, context=c, dtype=BF16).recommended.spec)  # type: ignore[union-attr]
             for c in (8_192, 100_000, 250_000, 5_000_000)]
    assert names == ["dynamic", "quantized-4", "quantized-2", "sink"]
    assert [r.name for r in memory.AUTO_KV_LADDER] == ["dynamic", "quantized-4", "offloaded", "quantized-2", "sink",
                                                       "sink-quantized"]
