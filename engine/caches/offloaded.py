"""The full KV cache kept in CPU RAM and streamed to the GPU one layer at a time
(transformers' `DynamicCache(offloading=True)`).

Only the layer being computed and the next one (prefetched on a side stream) are in GPU memory,
so a long chat's history costs RAM instead of GPU memory, at some decode speed (measured on an
H100: 40–46 tokens/s against 55–57 for the plain dynamic cache, 1B shape). Lossless. It needs the
model on a CUDA GPU; on any other device there is nothing to offload from.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.caches import availability
from engine.caches.dynamic import DynamicKVCache
from engine.caches.shape import KVShape
from engine.specs import CacheConfigError, CacheSpec

GPU_RESIDENT_LAYERS = 2  # the layer in use and the one being prefetched


def build(config: Any, spec: CacheSpec | None = None, device: torch.device | None = None) -> DynamicKVCache:
    """The offloading cache for a model on `device`: where the model runs, not what the machine has
    (None: no model device known, so nothing to offload from)."""
    reason = availability(device or torch.device("cpu"))["offloaded"]
    if reason is not None:
        raise CacheConfigError(reason)
    return DynamicKVCache(config, offloading=True)


def bytes_for(tokens: int, config: Any, spec: CacheSpec | None = None, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the whole cache (held in CPU RAM): the same as the dynamic cache's."""
    return tokens * KVShape.of(config).bytes_per_token(dtype)


def gpu_bytes_for(tokens: int, config: Any, spec: CacheSpec | None = None, dtype: torch.dtype = torch.float32) -> int:
    """GPU memory the cache occupies at the peak of a forward pass: two layers' worth."""
    shape = KVShape.of(config)
    layers = min(GPU_RESIDENT_LAYERS, shape.layers)
    return bytes_for(tokens, config, spec, dtype) * layers // shape.layers
