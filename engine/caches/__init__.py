"""Per-conversation KV cache strategies and the operations the session needs on any of them.

Each strategy lives in its own module with `build(...)` and a memory estimate `bytes_for(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from engine.caches import dynamic

STRATEGIES = ("dynamic",)


class CacheConfigError(ValueError):
    """A cache setting is invalid; the message says which and why."""


@dataclass(frozen=True)
class CacheSpec:
    """A conversation's cache strategy and its parameters."""

    strategy: str = "dynamic"

    def validate(self) -> CacheSpec:
        if self.strategy not in STRATEGIES:
            raise CacheConfigError(
                f"Unknown cache strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}."
            )
        return self


def build_cache(spec: CacheSpec, config: Any) -> Cache:
    spec.validate()
    return dynamic.build(config)


def seq_length(cache: Cache | None) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors among an object's attributes (one level deep)."""
    total = 0
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def cache_bytes(cache: Cache | None) -> int:
    """Bytes the cache's tensors really hold now (not an estimate)."""
    if cache is None:
        return 0
    return sum(tensor_bytes(layer) for layer in cache.layers)


def crop_to(cache: Cache, length: int) -> bool:
    """Crop every layer to `length` tokens; False when the cache cannot be cropped that way.

    Layers are cropped one by one, so this also repairs a cache that a failed forward pass
    left with some layers longer than others.
    """
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
