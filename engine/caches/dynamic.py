"""The full KV cache (transformers' `DynamicCache`): every token's keys and values, kept as they are.

It is the reference that every other strategy's fidelity is measured against.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from engine.caches.shape import KVShape


def build(config: Any, spec: Any = None) -> DynamicCache:
    return DynamicCache(config=config)


def bytes_for(tokens: int, config: Any, spec: Any = None, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a full cache of `tokens` tokens holds: 2 (K and V) × layers × KV heads × head dim × dtype size."""
    return tokens * KVShape.of(config).bytes_per_token(dtype)
