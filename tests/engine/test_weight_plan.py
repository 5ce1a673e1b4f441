"""Weights by precision and the advisor's weight plan: byte counts checked against optimum-quanto's
real quantized tensors and against hand counts for Llama-3.1-8B, Qwen2.5-7B and Gemma-3-12B
(their published config.json, in tests/data/configs), on simulated 8, 12 and 24 GiB GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from engine import caches, cli, memory, models
from engine.caches import CacheSpec
from engine.weights import PrecisionError, quantized_linear_bytes, quanto_group_size

GIB = 1024**3
CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"
RAM_GIB = 64


def config_of(name: str):
    return models.load_config(str(CONFIGS / name))


def real_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds, through quanto's wrapper subclasses down to their storage."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = flatten()
        return sum(real_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quanto_model_bytes(model: torch.nn.Module) -> int:
    """Every parameter (tied ones once) and every quanto QLinear scale buffer of a quantized model."""
    from optimum.quanto import QModuleMixin

    total = sum(real_nbytes(p.data if type(p) is torch.nn.Parameter else p) for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QModuleMixin):
            total += real_nbytes(module.input_scale) + real_nbytes(module.output_scale)
    return total


# --- optimum-quanto's storage, counted --------------------------------------------------------------

@pytest.mark.parametrize("in_features, group", [(64, None), (128, None), (160, 32), (192, 96), (320, 64), (256, 128),
                                                (288, 96), (384, 128), (130, None), (4304, None), (14336, 128)])
def test_int4_group_size_follows_quanto(in_features, group) -> None:
    assert quanto_group_size(in_features) == group


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_features, in_features", [(64, 64), (65, 160), (256, 256), (96, 384), (33, 100),
                                                       (48, 130)])
def test_quantized_linear_bytes_match_quanto(out_features, in_features, bits, dtype) -> None:
    """The formula equals what quanto allocates, in its plain, tinygemm (bf16, group 128) and per-row layouts."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)).to(dtype)
    quantize(layer, weights=qint4 if bits == 4 else qint8)
    freeze(layer)
    size = torch.empty((), dtype=dtype).element_size()
    assert quanto_model_bytes(layer) == quantized_linear_bytes(out_features, in_features, bits, size)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("precision, dtype", [("int8", torch.float32), ("int4", torch.float32),
                                              ("int8", torch.bfloat16), ("int4", torch.bfloat16)])
def test_inventory_matches_a_model_quantized_as_transformers_does(precision, dtype, tied) -> None:
    """Every Linear but the head (transformers' get_keys_to_not_convert) quantized with quanto: the real bytes
    equal the inventory's count, biases, norms and embeddings included."""
    from optimum.quanto import freeze, qint4, qint8, quantize
    from transformers.quantizers.base import get_keys_to_not_convert

    config = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=288, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         tie_word_embeddings=tied, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    quantize(model, weights=qint4 if precision == "int4" else qint8, exclude=get_keys_to_not_convert(model))
    freeze(model)
    size = torch.empty((), dtype=dtype).element_size()
    assert quanto_model_bytes(model) == memory.inventory_of(config).bytes(precision, size).total


def test_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(PrecisionError, match="int4"):
        memory.inventory_of(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                                        num_attention_heads=2, vocab_size=32)).bytes("int3")


# --- hand counts for three published models ---------------------------------------------------------

def int4(out: int, inp: int) -> int:
    """quanto int4 with groups of 128 in bf16: packed values, a scale and a shift per group, two scalars."""
    assert inp % 128 == 0
    return out * inp // 2 + 2 * (out * inp // 128) * 2 + 2 * 2


def int8(out: int, inp: int) -> int:
    return out * inp + out * 2 + 2 * 2


def decoder_linears(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> list[tuple[int, int]]:
    """(out, in) of q, k, v, o, gate, up, down."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]


LLAMA = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, layers=32, vocab=128256)
QWEN = dict(hidden=3584, heads=28, kv_heads=4, head_dim=128, inter=18944, layers=28, vocab=152064)
GEMMA = dict(hidden=3840, heads=16, kv_heads=8, head_dim=256, inter=15360, layers=48, vocab=262208)
SIGLIP = dict(hidden=1152, inter=4304, layers=27, patches=(896 // 14) ** 2, patch=14)


def hand_count(m: dict[str, int], precision: str, *, qkv_bias: bool = False, norms_per_layer: int = 2,
               qk_norm: bool = False, tied: bool = False) -> tuple[int, int]:
    """(parameters, bf16/int8/int4 bytes) of a Llama-style decoder: linears, norms, embeddings, head."""
    linears = decoder_linears(m["hidden"], m["heads"], m["kv_heads"], m["head_dim"], m["inter"])
    linear_params = sum(o * i for o, i in linears)
    other = norms_per_layer * m["hidden"] + (2 * m["head_dim"] if qk_norm else 0)
    other += (m["heads"] + 2 * m["kv_heads"]) * m["head_dim"] if qkv_bias else 0
    per_layer_params = linear_params + other
    embed = m["vocab"] * m["hidden"]
    outside_params = embed * (1 if tied else 2) + m["hidden"]  # embeddings, head, final norm
    params = m["layers"] * per_layer_params + outside_params
    if precision == "bf16":
        return params, 2 * params
    quant = int4 if precision == "int4" else int8
    per_layer = sum(quant(o, i) for o, i in linears) + 2 * other
    return params, m["layers"] * per_layer + 2 * outside_params


def siglip_count(precision: str) -> tuple[int, int]:
    """Gemma 3's SigLIP vision tower (27 layers, no head) and its projector to the text width."""
    h, inter, layers = SIGLIP["hidden"], SIGLIP["inter"], SIGLIP["layers"]
    linears = [(h, h)] * 4 + [(inter, h), (h, inter)]  # q, k, v, o, fc1, fc2 (all with biases)
    biases = 4 * h + inter + h
    layer_norms = 2 * 2 * h
    per_layer_other = biases + layer_norms
    embeddings = h * 3 * SIGLIP["patch"] ** 2 + h + SIGLIP["patches"] * h  # patch conv + bias, positions
    outside = embeddings + 2 * h  # post layer norm
    projector = h * GEMMA["hidden"] + h  # mm_input_projection_weight, mm_soft_emb_norm
    params = layers * (sum(o * i for o, i in linears) + per_layer_other) + outside + projector
    if precision == "bf16":
        return params, 2 * params
    if precision == "int8":
        quantized = sum(int8(o, i) for o, i in linears)
    else:  # fc2's 4304 inputs divide by none of 128/96/64/32: one group per output row
        fc2 = (h + 1) // 2 * inter + 2 * h * 2 + 2 * 2
        quantized = sum(int4(o, i) for o, i in linears[:5]) + fc2
    return params, layers * (quantized + 2 * per_layer_other) + 2 * (outside + projector)


def gemma_count(precision: str) -> tuple[int, int]:
    text_params, text_bytes = hand_count(GEMMA, precision, norms_per_layer=4, qk_norm=True, tied=True)
    vision_params, vision_bytes = siglip_count(precision)
    return text_params + vision_params, text_bytes + vision_bytes


HAND = {
    "llama-3.1-8b": lambda p: hand_count(LLAMA, p),
    "qwen2.5-7b": lambda p: hand_count(QWEN, p, qkv_bias=True),
    "gemma-3-12b": gemma_count,
}


@pytest.mark.parametrize("name, params", [("llama-3.1-8b", 8_030_261_248), ("qwen2.5-7b", 7_615_616_512),
                                          ("gemma-3-12b", 12_187_325_040)])
@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_weight_bytes_match_hand_counts(name, params, precision) -> None:
    hand_params, hand_bytes = HAND[name](precision)
    assert hand_params == params  # the published sizes: 8.03B, 7.62B, 12.2B
    inventory = memory.inventory_of(config_of(name))
    assert inventory.params == params
    assert inventory.bytes(precision).total == hand_bytes


def test_fp16_and_fp32_are_two_and_four_bytes_a_parameter() -> None:
    inventory = memory.inventory_of(config_of("qwen2.5-7b"))
    assert inventory.bytes("fp16").total == 2 * inventory.params
    assert inventory.bytes("fp32").total == 4 * inventory.params
    assert memory.weights_bytes_for(config_of("qwen2.5-7b"), torch.float32) == 4 * inventory.params


def test_a_split_keeps_the_untied_embedding_in_ram_and_the_head_on_the_gpu() -> None:
    inventory = memory.inventory_of(config_of("llama-3.1-8b"))
    wb = inventory.bytes("bf16")
    per_layer, embed = wb.per_layer[0], 2 * LLAMA["vocab"] * LLAMA["hidden"]
    assert wb.embedding == embed and wb.outside == embed + 2 * LLAMA["hidden"]
    assert set(wb.per_layer) == {per_layer}
    assert wb.split(32) == (wb.total, 0)
    assert wb.split(10) == (10 * per_layer + wb.outside, 22 * per_layer + embed)
    assert wb.split(0) == (wb.outside, wb.total - wb.outside)
    tied = memory.inventory_of(config_of("gemma-3-12b")).bytes("int4")
    assert tied.embedding == 0  # tied to the head: it stays with it on the GPU


# --- the recommendation: weights × layers on the GPU × KV ---------------------------------------------

EXPECTED = {  # at each model's full context (131,072 / 32,768 / 131,072 tokens), 64 GiB of RAM
    ("llama-3.1-8b", 8): ("int4", "all", "offloaded"),
    ("llama-3.1-8b", 12): ("int8", "all", "offloaded"),
    ("llama-3.1-8b", 24): ("bf16", "all", "quantized-4"),
    ("qwen2.5-7b", 8): ("int4", "all", "dynamic"),
    ("qwen2.5-7b", 12): ("int8", "all", "dynamic"),
    ("qwen2.5-7b", 24): ("bf16", "all", "dynamic"),
    ("gemma-3-12b", 8): ("int4", "split", "quantized-4"),
    ("gemma-3-12b", 12): ("int4", "all", "quantized-4"),  # its 40 sliding layers hold 1,023 tokens each
    ("gemma-3-12b", 24): ("int8", "all", "dynamic"),
}


@pytest.mark.parametrize("name, gib", list(EXPECTED))
def test_recommendations_for_published_models(name, gib) -> None:
    config = config_of(name)
    hw = memory.simulated_hardware(gib, RAM_GIB)
    advice = memory.advise(config, hw, weights="auto")
    precision, placement, kv = EXPECTED[(name, gib)]
    plan = advice.weight_plan
    assert plan is not None and advice.recommended is not None, advice.explanation
    assert (plan.precision, "split" if plan.split else "all", advice.recommended.label) == (precision, placement, kv)
    assert advice.tokens_fit is not None and advice.tokens_fit >= advice.context

    device_budget = int(gib * GIB * 0.9)
    ram_budget = int(RAM_GIB * GIB * 0.9)
    wb = memory.inventory_of(config).bytes(precision)
    assert plan.total_bytes == wb.total == HAND[name](precision)[1]
    spec = advice.recommended.spec
    kv_at_context = caches.bytes_for(spec, advice.context, config, torch.bfloat16)
    gpu_share = plan.gpu_layers / plan.layers
    if kv == "offloaded":  # all KV in RAM, two layers' worth on the GPU while they run
        assert kv_at_context <= ram_budget
        assert plan.gpu_bytes + kv_at_context * 2 // plan.layers <= device_budget
    else:
        assert plan.gpu_bytes + kv_at_context * gpu_share <= device_budget
        assert plan.ram_bytes + kv_at_context * (1 - gpu_share) <= ram_budget
    # nothing more faithful fits: each precision before it needs a split, lossy KV, or does not fit at all
    ladder = ["bf16", "int8", "int4"]
    for better in ladder[:ladder.index(precision)]:
        other = memory.advise(config, hw, weights=better)
        assert other.recommended is None or other.weight_plan.split or \
            other.recommended.label not in memory.LOSSLESS_KV
    if plan.split:  # one more layer on the GPU would not fit with either lossless KV
        bigger = memory.WeightPlan(precision, "bf16", "cuda", plan.layers, plan.gpu_layers + 1,
                                   *wb.split(plan.gpu_layers + 1))
        specs = {label.split(" ")[0]: s for label, s in memory.candidate_specs(config, advice.context)}
        for name_kv in memory.SPLIT_KV:
            fit = memory.kv_tokens_that_fit(specs[name_kv], config, torch.bfloat16,
                                            device_budget - bigger.gpu_bytes, ram_budget - bigger.ram_bytes,
                                            gpu_layers=bigger.gpu_layers)
            assert fit is not None and fit < advice.context


def test_tokens_that_fit_are_hand_counted_for_qwen_on_24_gib() -> None:
    """bf16 weights on the GPU; the rest of 90% of 24 GiB holds dynamic KV of 56 KiB a token."""
    advice = memory.advise(config_of("qwen2.5-7b"), memory.simulated_hardware(24, RAM_GIB), weights="auto")
    weights = HAND["qwen2.5-7b"]("bf16")[1]
    per_token = 2 * QWEN["layers"] * QWEN["kv_heads"] * QWEN["head_dim"] * 2
    assert per_token == 56 * 1024
    assert advice.tokens_fit == (int(24 * GIB * 0.9) - weights) // per_token


def test_bf16_weights_larger_than_the_gpu_are_split_by_hand_count() -> None:
    """Llama-3.1-8B in bf16 on 8 GiB at 8,192 tokens: the head and final norm on the GPU, the embedding
    in RAM, and as many 416 MiB layers (with their 4 KiB-a-token KV) as the rest of 90% of 8 GiB holds."""
    config = config_of("llama-3.1-8b")
    advice = memory.advise(config, memory.simulated_hardware(8, RAM_GIB), weights="bf16", context=8192)
    plan = advice.weight_plan
    layer = 2 * sum(o * i for o, i in decoder_linears(4096, 32, 8, 128, 14336)) + 2 * 2 * 4096
    head = 2 * LLAMA["vocab"] * LLAMA["hidden"] + 2 * 4096
    kv_layer = 8192 * 2 * 8 * 128 * 2
    expected = (int(8 * GIB * 0.9) - head) // (layer + kv_layer)
    assert plan.split and plan.gpu_layers == expected == 14
    assert advice.recommended.label == "dynamic"
    assert plan.gpu_bytes == head + expected * layer


def test_a_cpu_machine_never_splits_and_tries_bf16_after_fp32() -> None:
    hw = memory.simulated_hardware(None, 24)
    assert [p for p, _ in memory.precision_ladder("auto", hw)] == ["fp32", "bf16", "int8", "int4"]
    advice = memory.advise(config_of("llama-3.1-8b"), hw, weights="auto", context=8192)
    assert advice.weight_plan.precision == "bf16" and not advice.weight_plan.split
    assert advice.weight_plan.device == "cpu" and advice.weight_plan.ram_bytes == 0
    assert advice.weight_plan.base_dtype == "bf16"


def test_a_model_too_large_for_the_machine_says_so() -> None:
    advice = memory.advise(config_of("gemma-3-12b"), memory.simulated_hardware(4, 4), weights="auto")
    assert advice.recommended is None
    assert "does not fit" in advice.explanation and "int4" in advice.explanation


def test_int8_and_int4_keep_their_scales_in_the_base_dtype() -> None:
    hw = memory.simulated_hardware(None, 64)
    fp32 = memory.advise(config_of("qwen2.5-7b"), hw, weights="int4", context=4096).weight_plan
    bf16 = memory.advise(config_of("qwen2.5-7b"), hw, weights="int4", context=4096, dtype=torch.bfloat16).weight_plan
    assert fp32.base_dtype == "fp32" and bf16.base_dtype == "bf16"
    assert fp32.total_bytes > bf16.total_bytes  # fp32 embeddings, head, norms and scales


def test_the_loaded_weights_path_is_unchanged() -> None:
    """Without `weights`, the advisor plans around the weights as they are (the running app's case)."""
    config = config_of("llama-3.1-8b")
    advice = memory.advise(config, memory.simulated_hardware(8, RAM_GIB), dtype=torch.bfloat16)
    assert advice.weight_plan is None and advice.recommended is None  # 15 GiB of bf16 weights, 8 GiB GPU


def test_advise_command_recommends_weights(capsys) -> None:
    model = str(CONFIGS / "llama-3.1-8b")
    assert cli.main(["advise", "--model", model, "--vram-gib", "8", "--ram-gib", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weight_plan"]["precision"] == "int4" and data["weight_plan"]["gpu_layers"] == 32
    assert data["recommended"]["strategy"] == "offloaded" and data["tokens_fit"] >= 131072
    assert cli.main(["advise", "--model", model, "--vram-gib", "8", "--ram-gib", "64", "--weights", "bf16",
                     "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "Recommended: bf16 weights" in out and "14 of 32 layers on the GPU" in out


def test_offloaded_needs_its_two_resident_layers_on_the_gpu() -> None:
    config = config_of("llama-3.1-8b")
    spec = CacheSpec(strategy="offloaded")
    per_token = 128 * 1024
    fit = memory.kv_tokens_that_fit(spec, config, torch.bfloat16, device_free=2 * per_token * 1000 // 32,
                                    ram_free=10**12)
    assert fit == 1000
