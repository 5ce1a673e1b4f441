"""The memory advisor: what each cache strategy costs for a model, and which one fits.

Every figure comes from the strategies' own `bytes_for` estimates (the same functions their
tests check against real allocations), the model's weights and the hardware's free memory.
A hardware profile can be read from the machine or simulated (`--vram-gib`, `--ram-gib`), so
advice for a 24 GiB GPU can be checked on a laptop without one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from engine import caches
from engine.caches import CacheSpec
from engine.caches.shape import KVShape, dtype_size, text_config
from engine.reports import GIB, MAX_TOKENS  # noqa: F401  (GIB re-exported; MAX_TOKENS bounds the search)


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


def weights_bytes_for(config: Any, dtype: torch.dtype) -> int:
    """Bytes the model's weights take in `dtype`, counted on a meta-device model (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    size = dtype_size(dtype)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * size
    return total


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
    hardware: HardwareProfile
    weights_bytes: int
    kv_budget: int
    context: int
    estimates: list[StrategyEstimate] = field(default_factory=list)
    recommended: StrategyEstimate | None = None
    explanation: str = ""

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


def advise(
    config: Any,
    hardware: HardwareProfile,
    *,
    context: int | None = None,
    dtype: torch.dtype | None = None,
    weights_bytes: int | None = None,
    weights_loaded: bool = False,
    safety_fraction: float = 0.10,
) -> Advice:
    """Compare the strategies for `config` on `hardware` and recommend one for `context` tokens.

    Args:
        config: the model's config.
        hardware: read_hardware() or simulated_hardware().
        context: the conversation length to plan for (default: the model's context length).
        dtype: the KV dtype (default: bf16 on a GPU, fp32 on the CPU, as the loader picks).
        weights_bytes: the weights' size (default: counted from the config).
        weights_loaded: the weights are already in the free figure (a running app), so not subtracted.
        safety_fraction: share of the device kept free for activations and fragmentation.
    """
    text = text_config(config)
    ctx = int(context or getattr(text, "max_position_embeddings", None) or 4096)
    dt = dtype or (torch.bfloat16 if hardware.has_gpu else torch.float32)
    weights = weights_bytes if weights_bytes is not None else weights_bytes_for(config, dt)
    free = hardware.accelerator_free - (0 if weights_loaded else weights)
    budget = int(free - safety_fraction * hardware.accelerator_total)
    host_budget = int(hardware.ram_free * (1 - safety_fraction))
    reasons = caches.availability(torch.device(hardware.device))
    per_token = KVShape.of(config).bytes_per_token(dt)

    estimates = []
    for label, spec in candidate_specs(config, ctx):
        reason = reasons.get(spec.strategy)
        kv_budget = host_budget if spec.strategy == "offloaded" else budget
        fit = tokens_that_fit(spec, config, dt, kv_budget) if reason is None else 0
        at_ctx = caches.bytes_for(spec, ctx, config, dt)
        bpt = 0.0 if spec.bounded_length else caches.bytes_for(spec, ctx, config, dt) / max(ctx, 1)
        if spec.strategy == "dynamic":
            bpt = float(per_token)
        estimates.append(StrategyEstimate(label, spec, bpt, at_ctx, fit, reason is None, reason))

    recommended, why = _choose(estimates, ctx, budget, weights, hardware)
    return Advice(hardware, weights, budget, ctx, estimates, recommended, why)


def _choose(estimates: list[StrategyEstimate], ctx: int, budget: int, weights: int,
            hw: HardwareProfile) -> tuple[StrategyEstimate | None, str]:
    """auto: dynamic while it fits, then quantized (4-bit, then 2-bit), then offloaded, then sink."""
    where = "GPU memory" if hw.has_gpu else "RAM"
    if budget <= 0:
        return None, (f"The model's weights ({weights / GIB:.1f} GiB) leave no room for a KV cache in "
                      f"{hw.accelerator_total / GIB:.0f} GiB of {where}: choose a smaller model or quantized weights.")
    by_label = {e.label.split(" ")[0]: e for e in estimates}
    ladder = (("dynamic", "the full cache fits"),
              ("quantized-4", "the full cache does not fit, 4-bit KV does"),
              ("quantized-2", "only 2-bit KV fits (it costs some accuracy)"),
              ("offloaded", "the KV cache fits in RAM and is streamed to the GPU"))
    for name, note in ladder:
        e = by_label.get(name)
        if e is not None and e.available and e.tokens_fit is not None and e.tokens_fit >= ctx:
            return e, f"{name}: {note} — {_tokens(ctx)} tokens need {e.bytes_at_context / GIB:.2f} GiB of " \
                      f"{max(budget, 0) / GIB:.1f} GiB free for KV."
    for e in estimates:
        if e.spec.bounded_length and e.available and e.tokens_fit is None:
            return e, (f"{e.label}: no full cache fits {_tokens(ctx)} tokens in {max(budget, 0) / GIB:.1f} GiB; "
                       f"attention sinks keep the chat going at a constant {e.bytes_at_context / GIB:.2f} GiB.")
    return None, f"No strategy fits in {max(budget, 0) / GIB:.2f} GiB free for KV."
