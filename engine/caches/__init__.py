"""Per-conversation KV cache strategies and the operations the session needs on any of them.

Each strategy lives in its own module, exposing

    build(config, spec) -> transformers.Cache
    bytes_for(tokens, config, spec, dtype) -> int   # what a cache of `tokens` tokens allocates

The session only talks to caches through this package.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import torch
from transformers import Cache

from engine.specs import (  # noqa: F401  (re-exported: the cache settings, where cache code looks for them)
    BACKENDS,
    LOSSY,
    STRATEGIES,
    CacheConfigError,
    CacheSpec,
    quantization_defaults,
)

_MODULES = {
    "dynamic": "engine.caches.dynamic",
    "sink": "engine.caches.sink",
    "quantized": "engine.caches.quantized",
    "sink-quantized": "engine.caches.sink",
    "offloaded": "engine.caches.offloaded",
    "static": "engine.caches.static",
}


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
