"""The full KV cache: every token's keys and values, kept as they are (transformers' `DynamicLayer`).

It is the reference that every other strategy's fidelity is measured against. A model whose
layers use a sliding window (or attention chunks) keeps only that window in those layers, as
transformers' `DynamicCache` does; such a layer can be cropped only while it still holds every
token it was fed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from engine.caches.base import KV, KVCache, KVLayer
from engine.caches.shape import KVShape, text_config
from engine.specs import CacheConfigError, CacheSpec


class FullLayer(KVLayer, DynamicLayer):
    """Every token's keys and values."""

    def crop_to(self, length: int) -> bool:
        current = self.get_seq_length()
        if length < 0 or length > current:
            return False
        if length < current:
            self.crop(length - current)
        return True

    def full_kv(self) -> KV | None:
        if self.get_seq_length() == 0:
            return None
        assert self.keys is not None and self.values is not None
        return self.keys, self.values


class WindowLayer(KVLayer, DynamicSlidingWindowLayer):
    """A sliding-window (or chunked) attention layer: the last `sliding_window - 1` tokens."""

    def _holds_everything(self) -> bool:
        return self.keys is None or self.keys.shape[-2] == self.cumulative_length

    def crop_to(self, length: int) -> bool:
        current = self.get_seq_length()
        if length < 0 or length > current or (length < current and not self._holds_everything()):
            return False
        if length < current:
            self.crop(length - current)
        return True

    def full_kv(self) -> KV | None:
        if self.get_seq_length() == 0 or not self._holds_everything():
            return None
        assert self.keys is not None and self.values is not None
        return self.keys, self.values


def layers_for(config: Any) -> list[KVLayer]:
    """One full or window layer per model layer, as the model's config says."""
    layer_types, kwargs = get_layer_types_and_kwargs(text_config(config))
    layers: list[KVLayer] = []
    for layer_type, layer_kwargs in zip(layer_types, kwargs, strict=True):
        if layer_type == "full_attention":
            layers.append(FullLayer())
        elif layer_type in ("sliding_attention", "chunked_attention"):
            layers.append(WindowLayer(**layer_kwargs))
        else:
            raise CacheConfigError(f"Cachet's caches do not support layers of type {layer_type!r} yet.")
    return layers


class DynamicKVCache(KVCache):
    """The full cache; with `offloading`, each layer's KV lives in CPU RAM between its uses (CUDA only)."""

    def __init__(self, config: Any, offloading: bool = False) -> None:
        super().__init__(layers=list(layers_for(config)), offloading=offloading, offload_only_non_sliding=False)


def build(config: Any, spec: CacheSpec | None = None, device: torch.device | None = None) -> DynamicKVCache:
    return DynamicKVCache(config)


def bytes_for(tokens: int, config: Any, spec: CacheSpec | None = None, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a full cache of `tokens` tokens holds: 2 (K and V) × layers × KV heads × head dim × dtype size."""
    return tokens * KVShape.of(config).bytes_per_token(dtype)
