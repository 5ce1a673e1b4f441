"""Per-conversation KV cache strategies and the operations the session needs on any of them.

Each strategy lives in its own module, exposing

    build(config, spec) -> transformers.Cache
    bytes_for(tokens, config, spec, dtype) -> int   # what a cache of `tokens` tokens allocates

The session only talks to caches through this package.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import asdict, dataclass, fields, replace
from types import ModuleType
from typing import Any

import torch
from transformers import Cache

STRATEGIES = ("dynamic", "sink", "quantized", "sink-quantized", "offloaded", "static")
LOSSY = frozenset({"sink", "quantized", "sink-quantized"})
_MODULES = {
    "dynamic": "engine.caches.dynamic",
    "sink": "engine.caches.sink",
    "quantized": "engine.caches.quantized",
    "sink-quantized": "engine.caches.sink",
    "offloaded": "engine.caches.offloaded",
    "static": "engine.caches.static",
}
BACKENDS = ("quanto", "hqq")


class CacheConfigError(ValueError):
    """A cache setting is invalid; the message says which and why."""


@dataclass(frozen=True)
class CacheSpec:
    """A conversation's cache strategy and its parameters (unused ones are ignored).

    sink_tokens, window: sink / sink-quantized — the first `sink_tokens` tokens and the most
        recent `window` tokens are kept; the middle is evicted.
    nbits, residual, q_group_size, axis_key, axis_value, backend: quantized / sink-quantized —
        KV stored in `nbits` bits in groups of `q_group_size`, the `residual` most recent tokens
        in full precision; keys quantized along `axis_key`, values along `axis_value`.
    max_cache_len: static — the pre-allocated length.
    """

    strategy: str = "dynamic"
    sink_tokens: int = 4
    window: int = 1024
    nbits: int = 4
    residual: int = 128
    q_group_size: int = 64
    axis_key: int = -1  # per channel, as KIVI: measured far better than per token (see README)
    axis_value: int = 0
    backend: str = "quanto"
    max_cache_len: int = 4096

    def validate(self) -> CacheSpec:
        if self.strategy not in STRATEGIES:
            raise CacheConfigError(f"Unknown cache strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        if self.strategy in ("sink", "sink-quantized"):
            if self.sink_tokens < 0:
                raise CacheConfigError(f"sink tokens must be 0 or more, not {self.sink_tokens}.")
            if self.window <= self.sink_tokens:
                raise CacheConfigError(
                    f"the window ({self.window}) must be larger than the sink tokens ({self.sink_tokens})."
                )
        if self.strategy in ("quantized", "sink-quantized"):
            if self.nbits not in (2, 4):
                raise CacheConfigError(f"quantized caches store 2 or 4 bits, not {self.nbits}.")
            if self.backend not in BACKENDS:
                raise CacheConfigError(f"Unknown quantization backend {self.backend!r}; choose quanto or hqq.")
            if self.residual < 0:
                raise CacheConfigError(f"the full-precision residual must be 0 or more tokens, not {self.residual}.")
            if self.q_group_size not in (16, 32, 64, 128):
                raise CacheConfigError(f"group size must be 16, 32, 64 or 128, not {self.q_group_size}.")
            if self.axis_key not in (0, -1) or self.axis_value not in (0, -1):
                raise CacheConfigError("quantization axes must be 0 (per token) or -1 (per channel).")
        if self.strategy == "sink-quantized" and self.residual >= self.window:
            raise CacheConfigError(
                f"the full-precision residual ({self.residual}) must be smaller than the window ({self.window}): "
                "the window is stored as quantized blocks of that many tokens."
            )
        if self.strategy == "static" and self.max_cache_len < 16:
            raise CacheConfigError(f"the static cache needs at least 16 tokens, not {self.max_cache_len}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_changes(self, **changes: Any) -> CacheSpec:
        return replace(self, **changes).validate()

    @property
    def is_lossy(self) -> bool:
        return self.strategy in LOSSY

    @property
    def bounded_length(self) -> bool:
        """True when the cache holds a bounded number of tokens whatever the chat's length."""
        return self.strategy in ("sink", "sink-quantized")


def quantization_defaults(nbits: int) -> dict[str, Any]:
    """The measured best settings (residual, group size, axes) for `nbits`-bit KV on the default model."""
    return dict(strategy_module("quantized").default_spec(nbits))


def strategy_module(strategy: str) -> ModuleType:
    return importlib.import_module(_MODULES[strategy])


def build_cache(spec: CacheSpec, config: Any) -> Cache:
    spec.validate()
    cache: Cache = strategy_module(spec.strategy).build(config, spec)
    return cache


def bytes_for(spec: CacheSpec, tokens: int, config: Any, dtype: torch.dtype = torch.float32) -> int:
    """Estimated bytes a cache of `spec` holds after `tokens` tokens (for the advisor and the UI)."""
    return int(strategy_module(spec.strategy).bytes_for(tokens, config, spec, dtype))


def seq_length(cache: Cache | None) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors among an object's attributes (one level deep, lists included)."""
    total = 0
    for value in vars(obj).values():
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                total += _tensor_nbytes(item)
    return total


def _tensor_nbytes(t: torch.Tensor) -> int:
    # quanto's packed tensors are torch.Tensor subclasses whose storage lives in inner tensors
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor:
        names, _ = inner()
        return sum(_tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def cache_bytes(cache: Cache | None) -> int:
    """Bytes the cache's tensors really hold now (not an estimate)."""
    if cache is None:
        return 0
    measure = getattr(cache, "nbytes", None)
    if callable(measure):
        return int(measure())
    return sum(tensor_bytes(layer) for layer in cache.layers)


def crop_to(cache: Cache, length: int) -> bool:
    """Crop every layer to `length` tokens; False when the cache cannot be cropped that way.

    Layers are cropped one by one, so this also repairs a cache that a failed forward pass
    left with some layers longer than others.
    """
    custom = getattr(cache, "crop_to", None)
    if callable(custom):
        return bool(custom(length))
    layer: Any
    for layer in cache.layers:
        if not getattr(layer, "is_croppable", False):
            return False
        current = layer.get_seq_length()
        if current < length:
            return False
        if current > length:
            layer.crop(length - current)
    return True


def availability(device: torch.device) -> dict[str, str | None]:
    """For each strategy: None when usable on `device`, else the reason it is not (for the UI)."""
    reasons: dict[str, str | None] = dict.fromkeys(STRATEGIES)
    if device.type != "cuda":
        reasons["offloaded"] = "Offloading moves the KV cache from GPU memory to RAM; there is no CUDA GPU here."
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        reasons["quantized"] = reasons["sink-quantized"] = "optimum-quanto is not installed."
    return reasons


def backend_availability() -> dict[str, str | None]:
    """For each quantization backend: None when installed, else why not."""
    return {
        "quanto": None if importlib.util.find_spec("optimum.quanto") else "optimum-quanto is not installed.",
        "hqq": None if importlib.util.find_spec("hqq") else "HQQ is not installed (pip install hqq).",
    }
