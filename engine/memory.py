"""The memory advisor: what each cache strategy costs for a model, and which one fits.

Every figure comes from the strategies' own `bytes_for` estimates (the same functions their
tests check against real allocations), the model's weights and the hardware's free memory.
A hardware profile can be read from the machine or simulated (`--vram-gib`, `--ram-gib`), so
advice for a 24 GiB GPU can be checked on a laptop without one.

With a weight precision to choose (`advise(..., weights="auto")`), the advisor also decides how
the weights are stored (bf16/fp16/fp32, or optimum-quanto's int8/int4, counted by
`engine.weights`) and, when they do not fit the GPU, how many decoder layers go there (the rest
in RAM, as llama.cpp's `n_gpu_layers`), together with the KV strategy: the result is a
`WeightPlan` the loader can follow, and the number of tokens that fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from engine import caches
from engine.caches import CacheSpec
from engine.caches.shape import KVShape, text_config
from engine.reports import GIB, MAX_TOKENS  # noqa: F401  (GIB re-exported; MAX_TOKENS bounds the search)
from engine.weights import FLOAT_SIZES, PRECISIONS, TensorInfo, WeightBytes, WeightInventory, check_precision


@dataclass(frozen=True)
class HardwareProfile:
    """Memory the KV caches and weights can use. On a CPU-only machine `vram_*` are 0."""

    device: str  # "cuda", "mps" or "cpu"
    vram_total: int
    vram_free: int
    ram_total: int
    ram_free: int
    simulated: bool = False

    @property
    def has_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def accelerator_free(self) -> int:
        """Free memory on the device the model runs on."""
        return self.vram_free if self.has_gpu else self.ram_free

    @property
    def accelerator_total(self) -> int:
        return self.vram_total if self.has_gpu else self.ram_total


def read_hardware(device: torch.device | None = None) -> HardwareProfile:
    """The machine's memory now: CUDA free/total (NVML's view when installed), and system RAM."""
    vm = psutil.virtual_memory()
    dev = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    vram_total = vram_free = 0
    if dev.type == "cuda":
        vram_free, vram_total = torch.cuda.mem_get_info(dev)
        try:  # NVML also sees other processes' allocations; take the smaller free figure
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(dev.index or 0)
            vram_free = min(vram_free, int(pynvml.nvmlDeviceGetMemoryInfo(handle).free))
        except Exception:  # nvidia-ml-py is optional
            pass
    return HardwareProfile(dev.type, int(vram_total), int(vram_free), int(vm.total), int(vm.available))


def simulated_hardware(vram_gib: float | None, ram_gib: float | None) -> HardwareProfile:
    """A profile of a machine with `vram_gib` of GPU memory (None: no GPU) and `ram_gib` of RAM, all free."""
    ram = int((ram_gib if ram_gib is not None else psutil.virtual_memory().total / GIB) * GIB)
    if vram_gib is None:
        return HardwareProfile("cpu", 0, 0, ram, ram, simulated=True)
    vram = int(vram_gib * GIB)
    return HardwareProfile("cuda", vram, vram, ram, ram, simulated=True)


DTYPE_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
PRECISION_DTYPE = {name: dtype for dtype, name in DTYPE_PRECISION.items()}


def inventory_of(config: Any) -> WeightInventory:
    """Every weight of the model `config` describes, built on the meta device (nothing allocated).

    A tensor is `linear` exactly when transformers' quanto integration converts it: the weight of
    an `nn.Linear` not matched by `get_keys_to_not_convert` (the output head, anything tied to it,
    the last module). Decoder layers are the ModuleList of `num_hidden_layers` blocks inside the
    model's decoder (`get_decoder()`), so a vision tower's layers count as outside.
    """
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    text = text_config(config)
    n_layers = int(text.num_hidden_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    names_by_id = {id(m): n for n, m in modules.items()}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = next((m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers), None)
    prefix = names_by_id.get(id(blocks)) if blocks is not None else None
    skip = get_keys_to_not_convert(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embed is not None and head is not None and getattr(head, "weight", None) is embed.weight

    tensors = []
    for name, param in model.named_parameters():  # tied parameters are listed once
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        layer = None
        if prefix is not None and name.startswith(prefix + "."):
            layer = int(name[len(prefix) + 1:].split(".", 1)[0])
        linear = isinstance(module, torch.nn.Linear) and attr == "weight" and should_convert_module(module_name, skip)
        tensors.append(TensorInfo(name, tuple(param.shape), layer, linear, embedding=module is embed and not tied))
    return WeightInventory(tuple(tensors), n_layers)


def weights_bytes_for(config: Any, dtype: torch.dtype) -> int:
    """Bytes the model's weights take in `dtype`, counted on a meta-device model (nothing allocated)."""
    return inventory_of(config).bytes(DTYPE_PRECISION[dtype]).total


@dataclass(frozen=True)
class WeightPlan:
    """How the weights are stored and where they go: what the loader is to follow.

    precision: bf16 | fp16 | fp32 | int8 | int4 (int8/int4: optimum-quanto weight quantization).
    base_dtype: bf16 | fp16 | fp32 — the dtype of everything not quantized (embeddings, norms,
        quanto's scales), of the activations and of the KV cache.
    gpu_layers: decoder layers on the GPU (`n_gpu_layers`): the last ones, next to the output
        head; the others run from RAM, each with its KV cache. Equal to `layers` when all fit;
        on a machine without a CUDA GPU every layer is on `device` and nothing is split.
    """

    precision: str
    base_dtype: str
    device: str  # cuda | mps | cpu
    layers: int
    gpu_layers: int
    gpu_bytes: int  # weights on the device (all of them when nothing is split)
    ram_bytes: int  # weights held in RAM by a split

    @property
    def total_bytes(self) -> int:
        return self.gpu_bytes + self.ram_bytes

    @property
    def split(self) -> bool:
        return self.device == "cuda" and self.gpu_layers < self.layers

    @property
    def torch_dtype(self) -> torch.dtype:
        return PRECISION_DTYPE[self.base_dtype]

    def describe(self) -> str:
        weights = f"{self.precision} weights ({self.total_bytes / GIB:.2f} GiB)"
        if self.device != "cuda":
            return f"{weights} in {'unified memory' if self.device == 'mps' else 'RAM'}"
        if not self.split:
            return f"{weights}, all {self.layers} layers on the GPU"
        return (f"{weights}, {self.gpu_layers} of {self.layers} layers on the GPU ({self.gpu_bytes / GIB:.2f} GiB), "
                f"{self.layers - self.gpu_layers} in RAM ({self.ram_bytes / GIB:.2f} GiB)")

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "base_dtype": self.base_dtype, "device": self.device,
                "layers": self.layers, "gpu_layers": self.gpu_layers, "gpu_bytes": self.gpu_bytes,
                "ram_bytes": self.ram_bytes}


@dataclass(frozen=True)
class StrategyEstimate:
    """What one strategy costs for this model on this hardware."""

    label: str
    spec: CacheSpec
    bytes_per_token: float  # marginal bytes per token (0 for a bounded cache once full)
    bytes_at_context: int  # bytes after the wanted context
    tokens_fit: int | None  # tokens that fit in the KV budget; None: any length (bounded cache)
    available: bool
    reason: str | None = None

    def describe(self) -> str:
        if not self.available:
            return f"{self.label}: not available here"
        if self.tokens_fit is None:
            return f"{self.label} keeps any length in {self.bytes_at_context / GIB:.2f} GiB"
        return f"{self.label} fits {_tokens(self.tokens_fit)} tokens"


@dataclass(frozen=True)
class Advice:
    """The advisor's answer: what each strategy costs, and the recommendation with its reason.

    With a weight precision to choose (`weights=` given to `advise`), `weight_plan` says how the
    weights are stored and placed, `recommended` is the KV strategy that goes with it, and
    `tokens_fit` how long a chat that combination holds (None: any length, a bounded cache).
    `weights_bytes` is then the plan's total and `kv_budget` what it leaves on the device.
    """

    hardware: HardwareProfile
    weights_bytes: int
    kv_budget: int
    context: int
    estimates: list[StrategyEstimate] = field(default_factory=list)
    recommended: StrategyEstimate | None = None
    explanation: str = ""
    weight_plan: WeightPlan | None = None
    tokens_fit: int | None = None

    def summary(self) -> str:
        return "; ".join(e.describe() for e in self.estimates if e.available)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.hardware.device, "simulated": self.hardware.simulated,
            "weights_bytes": self.weights_bytes, "kv_budget_bytes": self.kv_budget, "context": self.context,
            "strategies": [
                {"label": e.label, "spec": e.spec.to_dict(), "bytes_per_token": e.bytes_per_token,
                 "bytes_at_context": e.bytes_at_context, "tokens_fit": e.tokens_fit, "available": e.available,
                 "reason": e.reason} for e in self.estimates
            ],
            "recommended": None if self.recommended is None else self.recommended.spec.to_dict(),
            "explanation": self.explanation,
            "weight_plan": None if self.weight_plan is None else self.weight_plan.to_dict(),
            "tokens_fit": self.tokens_fit,
        }


def _tokens(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else f"{n:,}"


def tokens_that_fit(spec: CacheSpec, config: Any, dtype: torch.dtype, budget: int) -> int | None:
    """Most tokens whose cache fits in `budget` bytes; None when the cache is bounded and fits at any length."""
    if budget <= 0:
        return 0
    if spec.bounded_length or spec.strategy == "static":
        full = caches.bytes_for(spec, MAX_TOKENS, config, dtype)
        if spec.bounded_length:
            return None if full <= budget else 0
        return spec.max_cache_len if full <= budget else 0
    lo, hi = 0, MAX_TOKENS
    if caches.bytes_for(spec, hi, config, dtype) <= budget:
        return hi
    while lo < hi:  # bytes_for is monotonic in tokens
        mid = (lo + hi + 1) // 2
        if caches.bytes_for(spec, mid, config, dtype) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class LadderRung:
    """One step of `auto`'s KV ladder: a `candidate_specs` name, how much it costs in quality, and why it is chosen."""

    name: str
    tier: str  # lossless (exact, or +0.2% perplexity for 4-bit) | lossy (+18% at 2-bit) | bounded (forgets the middle)
    note: str

    @property
    def bounded(self) -> bool:
        return self.tier == "bounded"


# What `auto` means for the KV cache: the first rung that holds the planned chat, quality first. The one
# ladder: the live advisor of a loaded model (`advise`: the app's and the service's `auto`) walks it as it
# stands; the load-time plan (`recommend_weights`) walks the lossless rungs for each weight precision, then
# splits the layers between GPU and RAM (a CUDA GPU), then the lossy and bounded rungs. So lossless offloading
# always comes before 2-bit KV, and 2-bit before attention sinks.
AUTO_KV_LADDER = (
    LadderRung("dynamic", "lossless", "the full cache fits"),
    LadderRung("quantized-4", "lossless", "the full cache does not fit, 4-bit KV does (+0.2% perplexity)"),
    LadderRung("offloaded", "lossless", "the KV cache fits in RAM and is streamed to the GPU"),
    LadderRung("quantized-2", "lossy", "only 2-bit KV fits (it costs some accuracy)"),
    LadderRung("sink", "bounded", "no cache holds the whole chat: attention sinks keep it going"),
    LadderRung("sink-quantized", "bounded", "no cache holds the whole chat: 4-bit attention sinks keep it going"),
)


def candidate_specs(config: Any, context: int) -> list[tuple[str, CacheSpec]]:
    """The strategies the advisor compares, each with its measured default parameters."""
    q4 = CacheSpec(strategy="quantized", **caches.quantization_defaults(4))
    q2 = CacheSpec(strategy="quantized", **caches.quantization_defaults(2))
    window = max(min(4096, context // 2), 64)
    sink = CacheSpec(strategy="sink", sink_tokens=4, window=window)
    return [
        ("dynamic", CacheSpec()),
        ("quantized-4", q4),
        ("quantized-2", q2),
        ("offloaded", CacheSpec(strategy="offloaded")),
        (f"sink (window {window})", sink),
        (f"sink-quantized (window {window})",
         sink.with_changes(strategy="sink-quantized", **caches.quantization_defaults(4))),
    ]


def kv_tokens_that_fit(spec: CacheSpec, config: Any, dtype: torch.dtype, device_free: int, ram_free: int, *,
                       gpu_layers: int | None = None) -> int | None:
    """Tokens whose KV cache fits when `gpu_layers` of the layers keep theirs in `device_free` bytes and the
    others in `ram_free` (a GPU/CPU split; None: every layer on the device). None: any length (bounded).

    The offloaded cache keeps every layer's KV in RAM and two layers' worth on the GPU while it runs.
    """
    layers = KVShape.of(config).layers
    on_device = layers if gpu_layers is None else gpu_layers
    if spec.strategy == "offloaded":
        if on_device < layers:
            return 0
        resident = min(offloaded_gpu_layers(), layers)
        return _least(tokens_that_fit(spec, config, dtype, ram_free),
                      tokens_that_fit(spec, config, dtype, device_free * layers // resident))
    limits = []
    if on_device > 0:  # the layers' caches are the same size: the device holds on_device / layers of the whole
        limits.append(tokens_that_fit(spec, config, dtype, device_free * layers // on_device))
    if on_device < layers:
        limits.append(tokens_that_fit(spec, config, dtype, ram_free * layers // (layers - on_device)))
    return _least(*limits)


def offloaded_gpu_layers() -> int:
    from engine.caches.offloaded import GPU_RESIDENT_LAYERS

    return GPU_RESIDENT_LAYERS


def _least(*fits: int | None) -> int | None:
    bounded = [f for f in fits if f is not None]
    return min(bounded) if bounded else None


def _estimate(label: str, spec: CacheSpec, config: Any, dt: torch.dtype, ctx: int, reason: str | None,
              device_free: int, ram_free: int, gpu_layers: int | None = None) -> StrategyEstimate:
    fit = kv_tokens_that_fit(spec, config, dt, device_free, ram_free, gpu_layers=gpu_layers) if reason is None else 0
    at_ctx = caches.bytes_for(spec, ctx, config, dt)
    bpt = 0.0 if spec.bounded_length else at_ctx / max(ctx, 1)
    if spec.strategy == "dynamic":
        bpt = float(KVShape.of(config).bytes_per_token(dt))
    return StrategyEstimate(label, spec, bpt, at_ctx, fit, reason is None, reason)


def _context_of(config: Any, context: int | None) -> int:
    text = text_config(config)
    return int(context or getattr(text, "max_position_embeddings", None) or 4096)


def advise(
    config: Any,
    hardware: HardwareProfile,
    *,
    context: int | None = None,
    dtype: torch.dtype | None = None,
    weights_bytes: int | None = None,
    weights_loaded: bool = False,
    safety_fraction: float = 0.10,
    weights: str | None = None,
    inventory: WeightInventory | None = None,
    gpu_layers: int | None = None,
) -> Advice:
    """Compare the strategies for `config` on `hardware` and recommend one for `context` tokens.

    Args:
        config: the model's config.
        hardware: read_hardware() or simulated_hardware().
        context: the conversation length to plan for (default: the model's context length).
        dtype: the KV dtype (default: bf16 on a GPU, fp32 on the CPU, as the loader picks); with
            `weights`, the base dtype of int8/int4 weights.
        weights_bytes: the weights' size (default: counted from the config).
        weights_loaded: the weights are already in the free figure (a running app), so not subtracted.
        safety_fraction: share of the device kept free for activations and fragmentation.
        weights: None — the weights are as given (`dtype`, all on the device: a loaded model);
            "auto" or a precision (bf16, fp16, fp32, int8, int4) — choose the weight precision (auto),
            the layers on the GPU and the KV strategy together (see `recommend_weights`).
        inventory: the model's weights (default: `inventory_of(config)`), e.g. read from a GGUF header.
        gpu_layers: a loaded model split between GPU and CPU: the decoder layers on the GPU, whose KV counts
            against the GPU's free memory; the other layers' KV against RAM's (None: every layer on the device).
    """
    if weights is not None:
        return recommend_weights(config, hardware, weights, context=context, dtype=dtype,
                                 inventory=inventory, safety_fraction=safety_fraction)
    ctx = _context_of(config, context)
    dt = dtype or (torch.bfloat16 if hardware.has_gpu else torch.float32)
    if weights_bytes is None:
        weights_bytes = (inventory or inventory_of(config)).bytes(DTYPE_PRECISION[dt]).total
    free = hardware.accelerator_free - (0 if weights_loaded else weights_bytes)
    budget = int(free - safety_fraction * hardware.accelerator_total)
    host_budget = int(hardware.ram_free * (1 - safety_fraction))
    reasons = caches.availability(torch.device(hardware.device))
    estimates = [_estimate(label, spec, config, dt, ctx, reasons.get(spec.strategy), budget, host_budget,
                           gpu_layers=gpu_layers)
                 for label, spec in candidate_specs(config, ctx)]
    recommended, why = _choose(estimates, ctx, budget, weights_bytes, hardware)
    return Advice(hardware, weights_bytes, budget, ctx, estimates, recommended, why)


def _choose(estimates: list[StrategyEstimate], ctx: int, budget: int, weights: int,
            hw: HardwareProfile) -> tuple[StrategyEstimate | None, str]:
    """auto for a loaded model (its weights fixed): the first rung of `AUTO_KV_LADDER` that holds `ctx` tokens."""
    where = "GPU memory" if hw.has_gpu else "RAM"
    if budget <= 0:
        return None, (f"The model's weights ({weights / GIB:.1f} GiB) leave no room for a KV cache in "
                      f"{hw.accelerator_total / GIB:.0f} GiB of {where}: choose a smaller model or quantized weights.")
    by_label = {e.label.split(" ")[0]: e for e in estimates}
    for rung in AUTO_KV_LADDER:
        e = by_label.get(rung.name)
        if e is None or not e.available:
            continue
        if rung.bounded and e.tokens_fit is None:
            return e, (f"{e.label}: no full cache fits {_tokens(ctx)} tokens in {max(budget, 0) / GIB:.1f} GiB; "
                       f"attention sinks keep the chat going at a constant {e.bytes_at_context / GIB:.2f} GiB.")
        if not rung.bounded and e.tokens_fit is not None and e.tokens_fit >= ctx:
            return e, f"{rung.name}: {rung.note} — {_tokens(ctx)} tokens need {e.bytes_at_context / GIB:.2f} GiB of " \
                      f"{max(budget, 0) / GIB:.1f} GiB free for KV."
    return None, f"No strategy fits in {max(budget, 0) / GIB:.2f} GiB free for KV."


# --- weights × layers on the GPU × KV strategy ---------------------------------------------------

WEIGHT_CHOICES = ("auto", *PRECISIONS)
LOSSLESS_KV = tuple(r.name for r in AUTO_KV_LADDER if r.tier == "lossless")
LOSSY_KV = tuple(r.name for r in AUTO_KV_LADDER if r.tier == "lossy")
BOUNDED_KV = tuple(r.name for r in AUTO_KV_LADDER if r.bounded)
SPLIT_KV = ("dynamic", "quantized-4")  # a split's layers keep their KV where they run: offloading has no place there


def precision_ladder(weights: str, hardware: HardwareProfile,
                     dtype: torch.dtype | None = None) -> list[tuple[str, str]]:
    """(weight precision, base dtype) pairs to try, most faithful first.

    auto: the loader's dtype (bf16 on a GPU, fp32 on the CPU, or `dtype`), then bf16 when that was
    fp32 (half the memory, the precision most checkpoints are published in), then int8, then int4.
    """
    base = DTYPE_PRECISION[dtype] if dtype is not None else ("bf16" if hardware.has_gpu else "fp32")
    if weights == "auto":
        ladder = [(base, base)]
        if base == "fp32":
            ladder.append(("bf16", "bf16"))
        return [*ladder, ("int8", base), ("int4", base)]
    check_precision(weights)
    return [(weights, weights if weights in FLOAT_SIZES else base)]


def _plan(wb: WeightBytes, base: str, hw: HardwareProfile, gpu_layers: int) -> WeightPlan:
    layers = len(wb.per_layer)
    if not hw.has_gpu:
        return WeightPlan(wb.precision, base, hw.device, layers, layers, wb.total, 0)
    gpu, ram = wb.split(gpu_layers)
    return WeightPlan(wb.precision, base, hw.device, layers, gpu_layers, gpu, ram)


def recommend_weights(config: Any, hardware: HardwareProfile, weights: str = "auto", *, context: int | None = None,
                      dtype: torch.dtype | None = None, inventory: WeightInventory | None = None,
                      safety_fraction: float = 0.10) -> Advice:
    """Choose weight precision × layers on the GPU × KV strategy for a chat of `context` tokens.

    Quality first, then speed. In order, the first combination that holds the planned length:
    1. every layer on the device, for each precision of the ladder (full, int8, int4): dynamic KV,
       then 4-bit KV, then offloaded KV (all lossless or +0.2% perplexity, see README);
    2. on a CUDA GPU, a layer split at the ladder's last precision: as many layers on the GPU as
       fit with their KV (dynamic or 4-bit, whichever puts more layers there), the rest in RAM —
       quantizing comes before splitting because a layer run from RAM is bound by RAM bandwidth;
    3. 2-bit KV, every layer on the device (+18% perplexity on the bundled model);
    4. attention sinks (a bounded cache that forgets the middle of the chat).
    A `safety_fraction` of the device (and of the RAM) is kept for activations and fragmentation.
    """
    ctx = _context_of(config, context)
    ladder = precision_ladder(weights, hardware, dtype)
    inv = inventory or inventory_of(config)
    device_budget = int(hardware.accelerator_free - safety_fraction * hardware.accelerator_total)
    ram_budget = int(hardware.ram_free * (1 - safety_fraction)) if hardware.has_gpu else 0
    reasons = caches.availability(torch.device(hardware.device))
    specs = {label.split(" ")[0]: (label, spec) for label, spec in candidate_specs(config, ctx)}
    plans = {p: (inv.bytes(p, FLOAT_SIZES[base]), base) for p, base in ladder}

    def fit(plan: WeightPlan, name: str) -> int | None:
        spec = specs[name][1]
        if reasons.get(spec.strategy) is not None or plan.gpu_bytes > device_budget or plan.ram_bytes > ram_budget:
            return 0
        return kv_tokens_that_fit(spec, config, PRECISION_DTYPE[plan.base_dtype], device_budget - plan.gpu_bytes,
                                  ram_budget - plan.ram_bytes, gpu_layers=plan.gpu_layers)

    def full(p: str) -> WeightPlan:
        wb, base = plans[p]
        return _plan(wb, base, hardware, len(wb.per_layer))

    def done(plan: WeightPlan, name: str, tokens: int | None, why: str) -> Advice:
        return _weights_advice(config, hardware, ctx, plan, specs, name, tokens, why, device_budget, ram_budget,
                               reasons)

    tried: list[WeightPlan] = []
    for p, _base in ladder:  # 1. everything on the device, lossless KV
        plan = full(p)
        for name in LOSSLESS_KV:
            tokens = fit(plan, name)
            if tokens is not None and tokens >= ctx:
                return done(plan, name, tokens, _why_not(tried, ctx) + f"{plan.describe()}; {name} KV holds "
                            f"{_tokens(ctx)} tokens ({_tokens(tokens)} fit).")
        tried.append(plan)
    last = ladder[-1][0]
    if hardware.has_gpu:  # 2. split the layers between GPU and RAM
        best: tuple[int, str, int, WeightPlan] | None = None
        wb, base = plans[last]
        for name in SPLIT_KV:
            for g in range(len(wb.per_layer) - 1, -1, -1):
                plan = _plan(wb, base, hardware, g)
                tokens = fit(plan, name)
                if tokens is not None and tokens >= ctx:
                    if best is None or g > best[0]:
                        best = (g, name, tokens, plan)
                    break
        if best is not None:
            g, name, tokens, plan = best
            return done(plan, name, tokens, f"The weights do not fit the GPU with {_tokens(ctx)} tokens of KV even in "
                        f"{last}: {plan.describe()}; {name} KV, each layer's where the layer runs "
                        f"({_tokens(tokens)} tokens fit).")
    for p, _base in ladder:  # 3. 2-bit KV
        plan = full(p)
        for name in LOSSY_KV:
            tokens = fit(plan, name)
            if tokens is not None and tokens >= ctx:
                return done(plan, name, tokens, f"{plan.describe()}; only 2-bit KV holds {_tokens(ctx)} tokens "
                            f"(it costs some accuracy; {_tokens(tokens)} fit).")
    for p, _base in ladder:  # 4. a bounded cache
        plan = full(p)
        for name in BOUNDED_KV:
            if fit(plan, name) is None:
                label, spec = specs[name]
                held = caches.bytes_for(spec, ctx, config, plan.torch_dtype)
                return done(plan, name, None, f"{plan.describe()}; no cache holds {_tokens(ctx)} tokens: {label} keeps "
                            f"the chat going in a constant {held / GIB:.2f} GiB.")
    smallest = full(last)
    where = "GPU memory and RAM" if hardware.has_gpu else "RAM"
    return Advice(hardware, smallest.total_bytes, device_budget - smallest.gpu_bytes, ctx, [], None,
                  f"The model does not fit in this machine's {where} even with {last} weights "
                  f"({smallest.total_bytes / GIB:.2f} GiB): choose a smaller model.", smallest, 0)


def _why_not(tried: list[WeightPlan], ctx: int) -> str:
    if not tried:
        return ""
    listed = " and ".join(f"{p.precision} ({p.total_bytes / GIB:.2f} GiB)" for p in tried)
    return f"Weights in {listed} leave too little room for {_tokens(ctx)} tokens of KV; "


def _weights_advice(config: Any, hw: HardwareProfile, ctx: int, plan: WeightPlan,
                    specs: dict[str, tuple[str, CacheSpec]], chosen: str, tokens: int | None, why: str,
                    device_budget: int, ram_budget: int, reasons: dict[str, str | None]) -> Advice:
    dt = plan.torch_dtype
    device_free, ram_free = device_budget - plan.gpu_bytes, ram_budget - plan.ram_bytes
    gpu_layers = plan.gpu_layers if plan.split else None
    estimates = [_estimate(label, spec, config, dt, ctx, reasons.get(spec.strategy), device_free, ram_free, gpu_layers)
                 for label, spec in specs.values()]
    recommended = next(e for e, name in zip(estimates, specs, strict=True) if name == chosen)
    return Advice(hw, plan.total_bytes, device_free, ctx, estimates, recommended, why, plan, tokens)


def fits_by_precision(model: Any, hardware: HardwareProfile, ladder: list[str] | None = None,
                      context: int | None = None) -> dict[str, dict[str, Any]]:
    """For each weight precision: does a model found on disk fit `hardware`, and how.

    `model` is an `engine.discovery.DiscoveredModel` (a GGUF file is planned from its header's tensor
    list, a model folder from its config). `ladder`: the precisions to try (default: auto's ladder on
    `hardware`, e.g. fp32, bf16, int8, int4 on a CPU). Each value holds `cell` — "yes", "N/L" (N of
    its L layers on the GPU, the rest in RAM), "sink" (only with attention sinks), "no", or "?" with
    `error` when its config cannot be read — and the advisor's `plan`, `kv`, `tokens_fit`, `context`.
    This is what `python -m engine models` prints and the window's model picker shows.
    """
    ladder = [p for p, _ in precision_ladder("auto", hardware)] if ladder is None else ladder
    try:
        inventory = model.weight_inventory()
        if inventory is not None:
            config = model.shape.as_config()
        else:
            from engine import models  # loads a config with transformers; memory.py needs no loader otherwise

            config = models.load_config(model.path)
            inventory = inventory_of(config)
    except Exception as exc:  # a config this transformers cannot build: say so in the cell
        return {p: {"cell": "?", "error": f"{type(exc).__name__}: {exc}"} for p in ladder}
    result = {}
    for precision in ladder:
        advice = advise(config, hardware, context=context, weights=precision, inventory=inventory)
        plan, chosen = advice.weight_plan, advice.recommended
        if chosen is None or plan is None:
            cell = "no"
        elif plan.split:
            cell = f"{plan.gpu_layers}/{plan.layers}"
        elif chosen.spec.bounded_length:
            cell = "sink"
        else:
            cell = "yes"
        result[precision] = {"cell": cell, "plan": None if plan is None else plan.to_dict(),
                             "kv": None if chosen is None else chosen.label, "tokens_fit": advice.tokens_fit,
                             "context": advice.context}
    return result
