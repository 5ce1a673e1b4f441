"""Which precision runs a model fastest on this CPU, and what a decoding step of n tokens costs.

On a CPU a decoding step reads every weight once, so it is bound by memory bandwidth: bf16 weights
halve the bytes and decode faster even without native bf16 arithmetic (measured on a 2-core AVX2
machine: 1.7–1.8× for SmolLM2-135M). Prefill is bound by arithmetic, where bf16 without native
support is slower (2.8× for a 40-token follow-up there), and so is attention over a long bf16 cache.
Three candidates are weighed:

* `float32` — everything in fp32;
* `bfloat16` — the whole model in bf16 (what suits CPUs with native bf16 arithmetic);
* `bf16-weights` — fp32, plus a bf16 copy of the linear layers' weights that products of at most
  `kernel_max_tokens` rows (decoding steps) read instead (engine/half_weights.py: +50% weight memory,
  chosen only where that fits easily); the probe measures where the two kernels cross.

`--dtype auto` on a CPU measures, once per machine and model, what one decoder layer and the output
head cost in each for a decoding step and for a prefill chunk, and picks the one that makes a
typical turn (`TYPICAL_PROMPT` new tokens, then `TYPICAL_REPLY` decoded) fastest. The result is kept
in the cache folder (`precision.json`), keyed by the CPU, the torch version, the thread count and
the model, so later starts do not measure again.

The same probe measures how the cost of one step grows with the tokens it scores (1, 2, 4, 8),
which is what speculative decoding's `auto` mode weighs guesses against (engine/speculative.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine import paths

TYPICAL_PROMPT = 64  # new tokens of a follow-up (the user's message and the template around it)
TYPICAL_REPLY = 256  # tokens of a reply
STEP_SIZES = (1, 2, 4, 8)
PROBE_VERSION = 5  # 5: candidates timed in turns, a busy machine's probe taken again
FP32, BF16, HALF_WEIGHTS = "float32", "bfloat16", "bf16-weights"
CANDIDATES = (FP32, BF16, HALF_WEIGHTS)
STEADY_SPREAD = 1.3  # a probe's typical timing within this factor of its fastest (see _steady)
UNSTEADY_TRIES = 3  # probes kept from a busy machine are taken again at the next starts, this many times in all
PROBE_STREAM_BYTES = 96 << 20  # fp32 weights the probe streams per step: more than a CPU's last-level cache
NEVER = 1 << 30  # kernel_max_tokens meaning "always the bf16 kernel" (engine.half_weights.NEVER)


@dataclass(frozen=True)
class PrecisionProbe:
    """What the model's steps cost, per precision (seconds, estimated from one decoder layer times
    the number of layers, plus the output head; medians)."""

    step_s: dict[str, dict[int, float]]  # candidate -> tokens per step -> seconds
    prefill_s: dict[str, float]  # candidate -> seconds for a TYPICAL_PROMPT-token chunk
    kernel_max_tokens: int = 0  # bf16-weights: the most rows a product runs in bf16's own kernel
    steady: bool = True  # False: the machine was busy while measuring (timings disagreed)
    tries: int = 1  # probes taken so far on this machine for this model (see measured_probe)

    def turn_seconds(self, dtype: str) -> float:
        """A typical turn's estimated time in `dtype`."""
        return self.prefill_s[dtype] + TYPICAL_REPLY * self.step_s[dtype][1]

    def best(self) -> str:
        return min(self.prefill_s, key=self.turn_seconds)

    def step_costs(self, dtype: str) -> dict[int, float]:
        """A step of n tokens relative to a step of one, in `dtype`."""
        one = self.step_s[dtype][1]
        return {n: s / one for n, s in self.step_s[dtype].items()}

    def describe(self, dtype: str) -> str:
        other = FP32 if dtype != FP32 and FP32 in self.prefill_s else min(
            (d for d in self.prefill_s if d != dtype), key=self.turn_seconds)
        speed = self.turn_seconds(other) / self.turn_seconds(dtype)
        decode = self.step_s[other][1] / self.step_s[dtype][1]
        prefill = self.prefill_s[other] / self.prefill_s[dtype]
        label = "float32 with bf16 weights for decoding" if dtype == HALF_WEIGHTS else dtype
        busy = ("; the machine was busy while measuring, so it is measured again at the next start"
                if not self.steady and self.tries < UNSTEADY_TRIES else "")
        return (f"{label}: measured fastest on this CPU (a typical turn {speed:.2f}× {other}'s speed; "
                f"decoding {decode:.2f}×, prefill {prefill:.2f}×{busy})")


@dataclass
class PrecisionChoice:
    """The precision a model runs in, why, and its step costs (for speculative decoding)."""

    dtype: torch.dtype  # the arithmetic's (and the KV cache's) dtype
    reason: str
    step_costs: dict[int, float] = field(default_factory=dict)  # tokens per step -> cost relative to one
    half_weights: bool = False  # linear weights stored in bf16 (engine/half_weights.py)
    kernel_max_tokens: int = 0

    @property
    def name(self) -> str:
        return HALF_WEIGHTS if self.half_weights else str(self.dtype).removeprefix("torch.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _interleaved_seconds(fns: dict[str, dict[Any, Callable[[], None]]], runs: int) -> dict[str, dict[Any, list[float]]]:
    """Each candidate's functions timed `runs` times, the candidates taking turns (in a rotating order) in
    every round, so that a burst of other work on the machine slows each of them alike instead of
    deciding the comparison; the first call of each is a warm-up (allocation, kernel choice)."""
    names = list(fns)
    for timed in fns.values():
        for fn in timed.values():
            fn()
    samples: dict[str, dict[Any, list[float]]] = {name: {label: [] for label in fns[name]} for name in names}
    for round_ in range(runs):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            for label, fn in fns[name].items():
                started = time.perf_counter()
                fn()
                samples[name][label].append(time.perf_counter() - started)
    return samples


def _steady(times: list[float]) -> bool:
    """Whether repeated timings of the same work agree well enough to keep: the typical one (the median)
    within `STEADY_SPREAD` of the fastest. On a quiet machine they are within 2–10% (one slow run is
    normal); on one busy with other work most runs are slowed, and by different amounts."""
    return len(times) < 2 or statistics.median(times) <= STEADY_SPREAD * min(times)


@torch.inference_mode()
def probe(model: Any, runs: int = 5) -> PrecisionProbe:
    """Time one decoder layer and the output head of `model` (an fp32 model on the CPU) as each candidate.

    Copies of a layer (enough to outgrow the CPU's cache, `PROBE_STREAM_BYTES`) and of the head are timed,
    never the model itself, so the model is untouched. The three candidates' copies take about three times
    those fp32 bytes (~0.4 GB for SmolLM2-135M, ~9 GB for an 8B model's 2 GB head); they are held at once,
    and timed in turns, when that is within a quarter of the free RAM, else built and timed one candidate
    at a time. A step of n tokens attends over 256 cached tokens and scores all n (as a step checking
    guesses does); a prefill chunk scores its last token only.
    """
    import psutil
    from transformers.cache_utils import DynamicCache

    from engine import half_weights
    from engine.caches.base import cache_kwargs

    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layer0 = inner.layers[0]
    head_module = model.get_output_embeddings()
    rotary = inner.rotary_emb
    text_config = model.config.get_text_config(decoder=True)
    # Gemma 3's rotary embedding has one frequency table per layer type and asks which one (layer_type).
    rope_kwargs = ({"layer_type": list(text_config.layer_types)[0]}
                   if "layer_type" in inspect.signature(rotary.forward).parameters else {})
    hidden = int(text_config.hidden_size)
    layers = int(text_config.num_hidden_layers)
    history = 256

    # A decoding step streams every weight from memory; one layer timed again and again would sit in the
    # CPU's cache and hide exactly what bf16 weights save. So the probe runs through enough copies of
    # the layer to outgrow the cache (at most the model's own layers).
    layer_bytes = sum(p.numel() * 4 for p in layer0.parameters())
    copies = max(1, min(layers, -(-PROBE_STREAM_BYTES // max(layer_bytes, 1))))

    def timers(dtype: torch.dtype, kernel_max_tokens: int | None) -> dict[Any, Callable[[], None]]:
        """What to time for one candidate: ("step", n) a step of n tokens through the layer copies, ("head", n)
        the head scoring n tokens, "prefill" a TYPICAL_PROMPT-token chunk through the copies."""
        stack = [copy.deepcopy(layer0) for _ in range(copies)]
        lm_head = torch.nn.Sequential(copy.deepcopy(head_module))
        if kernel_max_tokens is None:
            stack, lm_head = [layer.to(dtype) for layer in stack], lm_head.to(dtype)
        else:  # fp32, with bf16 copies of the weights for products of few rows
            for layer in stack:
                half_weights.convert(layer, kernel_max_tokens)
            half_weights.convert(lm_head, kernel_max_tokens)
        rope = copy.deepcopy(rotary)

        def feed(caches: list[Any], start: int, n: int) -> None:
            x = torch.randn(1, n, hidden, dtype=dtype)
            pos = torch.arange(start, start + n).unsqueeze(0)
            position_embeddings = rope(x, pos, **rope_kwargs)
            for layer, cache in zip(stack, caches, strict=True):
                layer(x, position_embeddings=position_embeddings, **cache_kwargs(layer, cache), position_ids=pos,
                      attention_mask=None, use_cache=True)

        def score(n: int) -> None:
            lm_head(torch.randn(1, n, hidden, dtype=dtype))

        pasts = [DynamicCache() for _ in stack]
        feed(pasts, 0, history)

        def step(n: int) -> None:
            feed(pasts, history, n)
            for past in pasts:
                past.crop(-n)

        fns: dict[Any, Callable[[], None]] = {("head", n): partial(score, n) for n in STEP_SIZES}
        fns.update({("step", n): partial(step, n) for n in STEP_SIZES})
        fns["prefill"] = lambda: feed([DynamicCache() for _ in stack], 0, TYPICAL_PROMPT)
        return fns

    # bf16 copies of the weights: bf16's kernel serves every decoding pass (one token, or one and the guesses
    # speculation checks: `half_weights.DECODE_ROWS` rows at most), and prefill too where it is faster there.
    candidates = {FP32: (torch.float32, None), BF16: (torch.bfloat16, None), HALF_WEIGHTS: (torch.float32, NEVER)}
    head_bytes = sum(p.numel() * 4 for p in head_module.parameters())
    at_once = 3 * (layer_bytes * copies + head_bytes)  # fp32, bf16 (half) and fp32 with bf16 copies (1.5×)
    if at_once <= psutil.virtual_memory().available // 4:
        samples = _interleaved_seconds({name: timers(dtype, kmt) for name, (dtype, kmt) in candidates.items()}, runs)
    else:  # one candidate's copies at a time (each freed before the next); a busy machine shows as unsteady
        samples = {}
        for name, (dtype, kmt) in candidates.items():
            samples.update(_interleaved_seconds({name: timers(dtype, kmt)}, runs))

    # The whole model: every layer, and the head scoring every token a step feeds (a verifying step
    # scores them all) but only the last of a prefill chunk.
    per_layer = layers / copies
    step_s: dict[str, dict[int, float]] = {}
    prefill_s: dict[str, float] = {}
    for name, timed in samples.items():
        median = {label: statistics.median(times) for label, times in timed.items()}
        step_s[name] = {n: per_layer * median[("step", n)] + median[("head", n)] for n in STEP_SIZES}
        prefill_s[name] = per_layer * median["prefill"] + median[("head", 1)]
    kernel_prefill = prefill_s[HALF_WEIGHTS]
    kernel_max = NEVER if kernel_prefill <= prefill_s[FP32] else half_weights.DECODE_ROWS
    prefill_s[HALF_WEIGHTS] = min(kernel_prefill, prefill_s[FP32])
    steady = all(_steady(timed[("step", 1)]) for timed in samples.values())
    return PrecisionProbe(step_s, prefill_s, kernel_max, steady=steady)


def _machine_key(identity: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"v{PROBE_VERSION}|{cpu}|torch {torch.__version__}|{torch.get_num_threads()} threads|{identity}"


def _table_path() -> Path:
    return paths.cache_dir() / "precision.json"


def _read_table() -> dict[str, Any]:
    try:
        data = json.loads(_table_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(key: str, found: PrecisionProbe) -> None:
    table = _read_table()
    table[key] = asdict(found)
    path = _table_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # not remembered: the next start measures again


def _recall(key: str) -> PrecisionProbe | None:
    entry = _read_table().get(key)
    if not isinstance(entry, dict):
        return None
    try:
        found = PrecisionProbe(
            step_s={d: {int(n): float(s) for n, s in v.items()} for d, v in entry["step_s"].items()},
            prefill_s={d: float(s) for d, s in entry["prefill_s"].items()},
            kernel_max_tokens=int(entry.get("kernel_max_tokens", 0)),
            steady=bool(entry.get("steady", True)),
            tries=int(entry.get("tries", 1)),
        )
        return found if set(found.prefill_s) == set(CANDIDATES) else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


_probed_here: set[str] = set()  # keys measured by this process (a busy machine's probe is retaken at the next start)


def measured_probe(model: Any, identity: str, report: Callable[[str], None] | None = None) -> PrecisionProbe:
    """The probe for this machine and model: remembered, or measured now (a few seconds) and kept.

    A probe taken while the machine was busy (`PrecisionProbe.steady` False) is used, and taken again at
    the next start, up to `UNSTEADY_TRIES` times in all; a steady one is kept for good."""
    key = _machine_key(identity)
    found = _recall(key)
    retake = (found is not None and not found.steady and found.tries < UNSTEADY_TRIES and key not in _probed_here)
    if found is None or retake:
        if report is not None:
            report("Measuring which precision is fastest on this CPU (once per model)…")
        tries = found.tries + 1 if found is not None else 1
        found = replace(probe(model), tries=tries)
        _probed_here.add(key)
        _remember(key, found)
    return found


def _room_for_copies(model: Any) -> bool:
    """bf16 copies of the weights only where they convert and fit easily: a quarter of the RAM available now."""
    import psutil

    from engine import half_weights

    return half_weights.convertible(model) and half_weights.extra_bytes(model) * 4 <= psutil.virtual_memory().available


def choose_cpu_precision(model: Any, identity: str, report: Callable[[str], None] | None = None) -> PrecisionChoice:
    """`auto` on a CPU: the precision whose typical turn is fastest here (see the module docstring).
    bf16 copies of the weights are a candidate only where they convert and fit (`_room_for_copies`)."""
    found = measured_probe(model, identity, report)
    best = found.best()
    if best == HALF_WEIGHTS and not _room_for_copies(model):
        best = min((FP32, BF16), key=found.turn_seconds)
    dtype = torch.bfloat16 if best == BF16 else torch.float32
    return PrecisionChoice(dtype, found.describe(best), found.step_costs(best), half_weights=best == HALF_WEIGHTS,
                           kernel_max_tokens=found.kernel_max_tokens)


def step_costs_for(model: Any, identity: str, dtype: torch.dtype) -> dict[int, float]:
    """How a step's cost grows with its tokens, for a model on the CPU in `dtype` (probe, remembered)."""
    found = measured_probe(model, identity)
    name = dtype_name(dtype)
    return found.step_costs(name) if name in found.step_s else {}
