"""Loading the weights at the precision and GPU/CPU split the advisor plans (issue 15 §3): int8/int4 weights with
optimum-quanto, quantized once and kept on disk with recorded checksums; the layer split's device map; the checks
that refuse what cannot be done before anything is loaded. Tiny random models; the split itself needs CUDA, so
here the map is checked, the loader is shown to hand it to accelerate, and accelerate's hooks run on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine import cli, layer_split, memory, models
from engine import quantized_weights as qw
from engine.session import ChatSession, Message, SessionSettings
from engine.specs import SamplingSettings
from tests.tiny import save_tiny_folder, tiny_config

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)
QUANTIZED = ("int8", "int4")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own, so the first load really quantizes."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CACHET_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny", seed=1)


def load(folder: Path, weights: str, messages: list[str] | None = None, **kw) -> models.LoadedModel:
    report = messages.append if messages is not None else None
    return models.load(str(folder), device="cpu", dtype="float32", weights=weights, progress=report, **kw)


def logits(lm: models.LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids).logits[0].float()


def weight_error(quantized: models.LoadedModel, full: models.LoadedModel) -> float:
    """The largest relative (Frobenius) error of a quantized linear's weight, de-quantized, against fp32's."""
    from optimum.quanto import QModuleMixin

    originals = dict(full.model.named_modules())
    errors = []
    for name, module in quantized.model.named_modules():
        if isinstance(module, QModuleMixin):
            w = originals[name].weight
            errors.append(((module.weight.dequantize().float() - w).norm() / w.norm()).item())
    assert errors, "no layer was quantized"
    return max(errors)


@pytest.mark.parametrize("precision", QUANTIZED)
def test_quantized_weights_give_logits_close_to_fp32(tiny_folder, fresh_cache, precision) -> None:
    """The bound: rounding a row of 64 Gaussian weights (|w| ≲ 4σ) to int8's 255 levels leaves a relative RMS error
    of at most 4/127/√12 ≈ 0.9%, to int4's 16 levels over the row's range (≈ 8σ) 8/15/√12 ≈ 15%. Independent
    relative errors ε in the ~7 matrices a token's path crosses add to first order as √7·ε ≈ 2.6ε, so the
    logits may move by at most 3ε (ε measured on the loaded weights), and greedy tokens mostly agree."""
    full = load(tiny_folder, "fp32")
    quantized = load(tiny_folder, precision)
    assert quantized.weights == precision and qw.is_quantized(quantized.model)
    assert quantized.precision_label == f"{precision} weights over float32"
    eps = weight_error(quantized, full)
    assert eps < (0.0091 if precision == "int8" else 0.154)
    torch.manual_seed(0)
    ids = torch.randint(0, 250, (1, 64))
    ref, out = logits(full, ids), logits(quantized, ids)
    relative = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert 0 < relative <= 3 * eps
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= (0.9 if precision == "int8" else 0.75)


@pytest.mark.parametrize("precision", QUANTIZED)
def test_reuse_equals_recompute_with_quantized_weights(tiny_folder, fresh_cache, precision) -> None:
    """A follow-up turn that reuses the kept cache gives the logits of recomputing the whole chat, and the same
    greedy replies, with the same int8/int4 weights both ways."""
    lm = load(tiny_folder, precision)
    session = ChatSession(lm, SessionSettings(sampling=GREEDY))
    session.send("First question about caches?")
    session.send("A second, longer question about reuse?")
    session.messages.append(Message("user", "And a third one."))
    reused, with_cache = session.next_token_logits()
    assert reused > 0
    fresh = ChatSession(lm, SessionSettings(sampling=GREEDY))
    fresh.messages = copy.deepcopy(session.messages)
    reused_fresh, recomputed = fresh.next_token_logits()
    assert reused_fresh == 0
    assert torch.max(torch.abs(with_cache - recomputed)).item() < 1e-4

    baseline = ChatSession(lm, SessionSettings(sampling=GREEDY, reuse=False))
    again = ChatSession(lm, SessionSettings(sampling=GREEDY))
    for text in ("one", "two two", "three three three"):
        assert again.send(text).reply == baseline.send(text).reply


@pytest.mark.parametrize("precision", QUANTIZED)
def test_the_quantized_copy_is_reused_then_rebuilt_when_damaged(tiny_folder, fresh_cache, precision,
                                                                 monkeypatch) -> None:
    first_messages: list[str] = []
    first = load(tiny_folder, precision, first_messages)
    assert any("Quantizing" in m for m in first_messages)
    copies = list((fresh_cache / "models").glob(f"*-{precision}-fp32-q{qw.QUANTIZED_FORMAT}"))
    assert len(copies) == 1 and (copies[0] / qw.RECORD).is_file()
    torch.manual_seed(0)
    ids = torch.randint(0, 250, (1, 40))

    def refuse(*_args, **_kw):
        raise AssertionError("quantized again although the copy is sound")

    with monkeypatch.context() as m:
        m.setattr(qw, "quantize", refuse)
        again_messages: list[str] = []
        second = load(tiny_folder, precision, again_messages)
    assert not any("Quantizing" in msg for msg in again_messages)
    assert torch.equal(logits(second, ids), logits(first, ids))  # the same weights, read back exactly
    assert second.identity == first.identity and second.weights_bytes == first.weights_bytes

    weights = copies[0] / qw.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the tensors, same size
    weights.write_bytes(bytes(data))
    repaired_messages: list[str] = []
    repaired = load(tiny_folder, precision, repaired_messages)
    assert any("damaged" in m and "checksum" in m for m in repaired_messages)
    assert any("Quantizing" in m for m in repaired_messages)
    assert torch.equal(logits(repaired, ids), logits(first, ids))
    assert models.verify_recorded(copies[0], qw.RECORD) is None


def test_a_quantized_copy_that_fails_to_load_is_made_again(tiny_folder, fresh_cache) -> None:
    load(tiny_folder, "int8")
    folder = next((fresh_cache / "models").glob("*-int8-fp32-*"))
    (folder / qw.QMAP_FILE).write_text("{}")  # consistent with its record once recorded again, but wrong
    record = folder / qw.RECORD
    facts = __import__("json").loads(record.read_text())
    facts["files"] = models._record_files(folder, qw.RECORD)
    record.write_text(__import__("json").dumps(facts))
    messages: list[str] = []
    lm = load(tiny_folder, "int8", messages)
    assert any("could not be loaded" in m for m in messages)
    assert qw.is_quantized(lm.model)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("precision", QUANTIZED)
def test_the_advisor_counts_the_loaded_quantized_tensors(tmp_path, fresh_cache, precision, tied) -> None:
    """The advisor's bytes for int8/int4 weights are the tensors the loader really holds (quanto's data, scales
    and shifts, the two scalar buffers of each QLinear, and every unquantized parameter, tied ones once)."""
    from optimum.quanto import QModuleMixin

    from tests.tiny import tiny_loaded_model

    lm = tiny_loaded_model(seed=2, tie_word_embeddings=tied, hidden_size=256, intermediate_size=320)
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m", precision)
    model = loaded.model
    real = sum(qw.tensor_bytes(p.data) for p in model.parameters())
    real += sum(qw.tensor_bytes(m.input_scale) + qw.tensor_bytes(m.output_scale)
                for m in model.modules() if isinstance(m, QModuleMixin))
    assert real == memory.inventory_of(model.config).bytes(precision, 4).total
    for _ in range(2):  # read back from the kept copy: the same tensors
        again = load(tmp_path / "m", precision).model
        assert sum(qw.tensor_bytes(p.data) for p in again.parameters()) == sum(
            qw.tensor_bytes(p.data) for p in model.parameters())
        assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied


# --- the layer split -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("gpu_layers", [0, 1, 3, 4])
def test_the_device_map_puts_the_last_layers_and_the_head_on_the_gpu(gpu_layers, tied) -> None:
    """As the advisor's WeightBytes.split counts them: the last N decoder layers (next to the head) on the GPU, the
    first ones in RAM, the head, final norm and rotary embedding on the GPU, the input embedding in RAM unless tied
    to the head; and the bytes the map puts on the GPU are the advisor's GPU bytes."""
    config = tiny_config(96, layers=4, tie_word_embeddings=tied)
    device_map = layer_split.device_map_for(config, gpu_layers, "cuda:0")
    layers = [device_map[f"model.layers.{i}"] for i in range(4)]
    assert layers == ["cpu"] * (4 - gpu_layers) + ["cuda:0"] * gpu_layers
    assert device_map["lm_head"] == device_map["model.norm"] == device_map["model.rotary_emb"] == "cuda:0"
    assert device_map["model.embed_tokens"] == ("cuda:0" if tied or gpu_layers == 4 else "cpu")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)  # fp32, real tensors
    on_gpu = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        module = max((m for m in device_map if name.startswith(m + ".")), key=len)
        on_gpu += p.numel() * p.element_size() if device_map[module] == "cuda:0" else 0
    gpu_bytes, _ram = memory.inventory_of(config).bytes("fp32").split(gpu_layers)
    assert on_gpu == gpu_bytes


def test_the_device_map_refuses_impossible_layer_counts() -> None:
    with pytest.raises(layer_split.SplitError, match="0 to 2"):
        layer_split.device_map_for(tiny_config(96), 3)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_loader_hands_the_planned_split_to_accelerate(tiny_folder, fresh_cache, monkeypatch, precision) -> None:
    """On a (simulated) CUDA machine `gpu_layers` < all builds the map and dispatches the model with it; run here with
    the map's GPU entries pointed at the CPU, accelerate's hooks move the hidden states between the modules and leave
    the cache alone: the chat gives the logits of the undivided model (int4: quantized, then its weights laid out
    for their devices after the move, the first time and from the kept copy)."""
    handed: list[dict[str, str]] = []
    real_dispatch = layer_split.dispatch

    def dispatch_on_cpu(model, device_map):
        handed.append(dict(device_map))
        return real_dispatch(model, {name: "cpu" for name in device_map})

    monkeypatch.setattr(models, "pick_device", lambda _device=None: torch.device("cuda"))
    monkeypatch.setattr(layer_split, "dispatch", dispatch_on_cpu)
    for _ in range(2 if precision == "int4" else 1):
        split = models.load(str(tiny_folder), device="cuda", dtype="float32", weights=precision, gpu_layers=1)
    monkeypatch.undo()
    assert handed[-1] == layer_split.device_map_for(split.model.config, 1, "cuda:0")
    assert split.gpu_layers == 1 and split.layers == 2 and split.device.type == "cpu"
    assert "1 of 2 layers" in split.split_label
    assert hasattr(split.model.model.layers[0], "_hf_hook")  # accelerate's hooks are on

    whole = load(tiny_folder, precision)
    sessions = [ChatSession(lm, SessionSettings(sampling=GREEDY)) for lm in (split, whole)]
    for text in ("Hello there.", "And again?"):
        replies = [s.send(text).reply for s in sessions]
        assert replies[0] == replies[1]
    for s in sessions:
        s.messages.append(Message("user", "last"))
    (_, a), (_, b) = (s.next_token_logits() for s in sessions)
    assert torch.max(torch.abs(a - b)).item() < 1e-5


def test_a_machine_without_cuda_refuses_gpu_layers(tiny_folder, fresh_cache) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(models.ModelLoadError, match="CUDA GPU"):
        load(tiny_folder, "fp32", gpu_layers=1)


@pytest.mark.parametrize("argv, says", [
    (["--gpu-layers", "2", "--device", "cpu"], "--device is cpu"),
    (["--gpu-layers", "-1"], "0 or more"),
    (["--weights", "bf16", "--dtype", "float32"], "disagree"),
])
def test_the_cli_refuses_impossible_weight_settings_before_loading(argv, says, capsys, monkeypatch) -> None:
    def never(*_args, **_kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", never)
    for command in (["perplexity", "--text", __file__], ["chat"], ["serve"], ["bench", "--quick"]):
        assert cli.main([*command, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and says in err and "\n" not in err


def test_gpu_layers_without_cuda_is_refused_by_the_cli(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["chat", "--gpu-layers", "4"]) == 2
    assert "sees none" in capsys.readouterr().err


def test_weights_and_split_reach_the_model_info(tiny_folder, fresh_cache) -> None:
    from engine.service import ChatService

    service = ChatService()
    try:
        info = service.load_model(lambda: load(tiny_folder, "int8"))
    finally:
        service.close(save=False)
    assert info.weights == "int8" and info.dtype == "int8 weights over float32"
    assert info.gpu_layers is None and info.split == "" and info.layers == 2


def test_int4_weights_go_plain_for_a_move_and_back_to_their_kernels_layout() -> None:
    """bf16 int4 weights on the CPU use tinygemm's CPU layout, which a CUDA kernel cannot read: a split moves them in
    quanto's plain packing and lays them out again where they land: the same weights, the same logits."""
    from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(96, hidden_size=256, intermediate_size=256))
    qw.quantize(model.to(torch.bfloat16).eval(), "int4")
    x = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        before = model(x).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    kernel_layout = type(q_proj.weight)
    assert kernel_layout is not WeightQBitsTensor  # tinygemm, for groups of 128 over bf16
    values = q_proj.weight.dequantize()
    qw.to_plain(model)
    assert type(q_proj.weight) is WeightQBitsTensor
    assert torch.equal(q_proj.weight.dequantize(), values)  # the same weights, in the portable packing
    qw.relayout(model)
    assert type(q_proj.weight) is kernel_layout
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"


@pytest.mark.parametrize("name, vram, precision, gpu_layers", [
    ("gemma-3-12b", 8, "int4", 31),  # README's table: int4, 31 of 48 layers on the GPU
    ("llama-3.1-8b", 8, "int4", None),  # int4, all 32 layers
    ("llama-3.1-8b", 24, "bf16", None),
])
def test_the_loader_follows_the_advisors_plan_on_a_gpu(name, vram, precision, gpu_layers) -> None:
    """What `load` would do on a (simulated) GPU machine: the advisor's precision and layer split, unless given."""
    config = models.load_config(str(CONFIGS / name))
    hardware = memory.simulated_hardware(vram, 64)
    cuda = torch.device("cuda")
    plan = models.plan_weights(config, cuda, torch.bfloat16, None, "auto", None, hardware)
    assert plan is not None and (plan.precision, plan.gpu_layers) == (precision, gpu_layers)
    assert plan.dtype == torch.bfloat16 and "advisor" in plan.reason
    fixed = models.plan_weights(config, cuda, torch.bfloat16, None, "int8", 10, hardware)
    assert fixed is not None and (fixed.precision, fixed.gpu_layers, fixed.chosen) == ("int8", 10, True)
    every = models.plan_weights(config, cuda, torch.bfloat16, None, "int4", 999, hardware)
    assert every is not None and every.gpu_layers is None  # as llama.cpp's -ngl 999: all of them


def test_the_loader_follows_the_advisors_plan_on_a_cpu() -> None:
    """Without a GPU every layer is in RAM; auto takes the advisor's precision (fp32 lets the CPU probe choose)."""
    config = models.load_config(str(CONFIGS / "llama-3.1-8b"))
    cpu = torch.device("cpu")
    for ram, precision in ((256, "fp32"), (24, "bf16"), (20, "int8"), (16, "int4")):
        hardware = memory.simulated_hardware(None, ram)
        plan = models.plan_weights(config, cpu, torch.float32, None, "auto", None, hardware)
        expected = memory.recommend_weights(config, hardware, "auto", dtype=torch.float32).weight_plan
        assert plan is not None and expected is not None
        assert plan.precision == expected.precision == precision and plan.gpu_layers is None
        assert plan.probe == (precision == "fp32")
    assert models.plan_weights(config, cpu, torch.float32, None, None, None) is None  # weights=None: as dtype says


@pytest.mark.parametrize("precision", QUANTIZED)
def test_the_first_quantizing_load_for_a_gpu_quantizes_in_ram_then_moves_the_quantized_weights(
        tiny_folder, fresh_cache, monkeypatch, precision) -> None:
    """int8/int4 are planned when the float weights do not fit on the GPU, so the first load must not put them
    there: it quantizes in RAM, keeps the copy, and moves only the quantized weights (in quanto's portable
    packing, laid out for the GPU's kernels where they land). No GPU here: the move is recorded, not made."""
    seen: dict[str, object] = {}
    real_quantize, real_to_plain = qw.quantize, qw.to_plain

    def quantize(model, p):  # noqa: ANN001, ANN202
        seen["quantized on"] = {t.device.type for t in model.parameters()}
        return real_quantize(model, p)

    class Moved:
        def __init__(self, model) -> None:  # noqa: ANN001
            self.model = model

        def to(self, device):  # noqa: ANN001, ANN202
            seen["moved to"] = str(device)
            return self.model

    def to_plain(model):  # noqa: ANN001, ANN202
        seen["plain before the move"] = True
        return Moved(real_to_plain(model))

    monkeypatch.setattr(qw, "quantize", quantize)
    monkeypatch.setattr(qw, "to_plain", to_plain)
    monkeypatch.setattr(qw, "relayout", lambda model: seen.setdefault("relaid", model))
    plan = models.LoadPlan(precision, torch.float32, None, "test")
    messages: list[str] = []
    model = models._load_quantized(str(tiny_folder), "tiny-test", plan, False, {}, messages.append,
                                   torch.device("cuda:0"))
    assert seen["quantized on"] == {"cpu"}
    assert seen["plain before the move"] and seen["moved to"] == "cuda:0" and seen["relaid"] is model
    assert qw.is_quantized(model)
    assert any("Moving the" in m for m in messages)
    assert (models._quantized_folder("tiny-test", plan) / qw.RECORD).is_file()  # the copy was kept
