"""Which precision runs a model fastest on this CPU, and what a decoding step of n tokens costs.

On a CPU a decoding step reads every weight once, so it is bound by memory bandwidth: bf16 weights
halve the bytes and decode faster even without native bf16 arithmetic (measured on a 2-core AVX2
machine: 1.7–1.8× for SmolLM2-135M). Prefill is bound by arithmetic, where bf16 without native
support can be slower. So `--dtype auto` on a CPU measures, once per machine and model, what one
decoder layer and the output head cost in fp32 and in bf16 for a decoding step and for a prefill
chunk, and picks the precision that makes a typical turn (`TYPICAL_PROMPT` new tokens, then
`TYPICAL_REPLY` decoded) fastest. The result is kept in the cache folder (`precision.json`), keyed
by the CPU, the torch version, the thread count and the model, so later starts do not measure again.

The same probe measures how the cost of one step grows with the tokens it scores (1, 2, 4, 8),
which is what speculative decoding's `auto` mode weighs guesses against (engine/speculative.py).
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine import paths

TYPICAL_PROMPT = 64  # new tokens of a follow-up (the user's message and the template around it)
TYPICAL_REPLY = 256  # tokens of a reply
STEP_SIZES = (1, 2, 4, 8)
PROBE_VERSION = 2
CANDIDATES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PrecisionProbe:
    """What the model's steps cost, per precision (seconds, estimated from one decoder layer times
    the number of layers, plus the output head; medians)."""

    step_s: dict[str, dict[int, float]]  # dtype name -> tokens per step -> seconds
    prefill_s: dict[str, float]  # dtype name -> seconds for a TYPICAL_PROMPT-token chunk

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
        other = next(d for d in self.prefill_s if d != dtype)
        speed = self.turn_seconds(other) / self.turn_seconds(dtype)
        decode = self.step_s[other][1] / self.step_s[dtype][1]
        prefill = self.prefill_s[other] / self.prefill_s[dtype]
        return (f"{dtype}: measured fastest on this CPU (a typical turn {speed:.2f}× {other}'s speed; "
                f"decoding {decode:.2f}×, prefill {prefill:.2f}×)")


@dataclass
class PrecisionChoice:
    """The precision a model runs in, why, and its step costs (for speculative decoding)."""

    dtype: torch.dtype
    reason: str
    step_costs: dict[int, float] = field(default_factory=dict)  # tokens per step -> cost relative to one

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _median_seconds(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def probe(model: Any, runs: int = 5) -> PrecisionProbe:
    """Time one decoder layer and the output head of `model` (an fp32 model on the CPU) in fp32 and bf16.

    Copies of one layer and of the head are timed, never the model itself, so the probe needs a few
    MB and the model is untouched. A step of n tokens attends over 256 cached tokens and scores all
    n (as a step checking guesses does); a prefill chunk scores its last token only.
    """
    from transformers.cache_utils import DynamicCache

    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layer0 = inner.layers[0]
    head_module = model.get_output_embeddings()
    rotary = inner.rotary_emb
    hidden = int(model.config.get_text_config(decoder=True).hidden_size)
    history = 256
    step_s: dict[str, dict[int, float]] = {}
    prefill_s: dict[str, float] = {}
    for dtype in CANDIDATES:
        name = dtype_name(dtype)
        layer = copy.deepcopy(layer0).to(dtype)
        lm_head = copy.deepcopy(head_module).to(dtype)
        rope = copy.deepcopy(rotary)

        def feed(cache: Any, start: int, n: int, layer: Any = layer, rope: Any = rope,
                 dtype: torch.dtype = dtype) -> None:
            x = torch.randn(1, n, hidden, dtype=dtype)
            pos = torch.arange(start, start + n).unsqueeze(0)
            layer(x, position_embeddings=rope(x, pos), past_key_values=cache, position_ids=pos,
                  attention_mask=None, use_cache=True)

        def score(n: int, lm_head: Any = lm_head, dtype: torch.dtype = dtype) -> None:
            lm_head(torch.randn(1, n, hidden, dtype=dtype))

        past = DynamicCache()
        feed(past, 0, history)

        def step(n: int, past: Any = past, feed: Callable[..., None] = feed) -> None:
            feed(past, history, n)
            past.crop(-n)

        def prefill(feed: Callable[..., None] = feed) -> None:
            feed(DynamicCache(), 0, TYPICAL_PROMPT)

        layers = int(model.config.get_text_config(decoder=True).num_hidden_layers)
        # The whole model: every layer, and the head scoring every token a step feeds (a verifying step
        # scores them all) but only the last of a prefill chunk.
        head = {n: _median_seconds(partial(score, n), runs) for n in STEP_SIZES}
        step_s[name] = {n: layers * _median_seconds(partial(step, n), runs) + head[n] for n in STEP_SIZES}
        prefill_s[name] = layers * _median_seconds(prefill, runs) + head[1]
    return PrecisionProbe(step_s, prefill_s)


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
        return PrecisionProbe(
            step_s={d: {int(n): float(s) for n, s in v.items()} for d, v in entry["step_s"].items()},
            prefill_s={d: float(s) for d, s in entry["prefill_s"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def measured_probe(model: Any, identity: str, report: Callable[[str], None] | None = None) -> PrecisionProbe:
    """The probe for this machine and model: remembered, or measured now (about a second) and kept."""
    key = _machine_key(identity)
    found = _recall(key)
    if found is None:
        if report is not None:
            report("Measuring which precision is fastest on this CPU (once per model)…")
        found = probe(model)
        _remember(key, found)
    return found


def choose_cpu_precision(model: Any, identity: str, report: Callable[[str], None] | None = None) -> PrecisionChoice:
    """`auto` on a CPU: the precision whose typical turn is fastest here (see the module docstring)."""
    found = measured_probe(model, identity, report)
    best = found.best()
    dtype = torch.bfloat16 if best == "bfloat16" else torch.float32
    return PrecisionChoice(dtype, found.describe(best), found.step_costs(best))


def step_costs_for(model: Any, identity: str, dtype: torch.dtype) -> dict[int, float]:
    """How a step's cost grows with its tokens, for a model on the CPU in `dtype` (probe, remembered)."""
    found = measured_probe(model, identity)
    name = dtype_name(dtype)
    return found.step_costs(name) if name in found.step_s else {}
