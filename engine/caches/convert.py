"""Switching a conversation's cache strategy without recomputing it, where that is possible.

Every strategy can give back its content as full-precision (keys, values) per layer, keys
rotated for their slot positions (`KVCache.full_kv`). A new cache of another strategy is then
filled by feeding those tensors through its own `update`, so it stores them its own way:
dynamic → quantized quantizes the stored KV, dynamic → sink keeps the sinks and the last
window, anything → dynamic de-quantizes.

A sink cache that already evicted tokens holds a different text than the conversation's
token stream, so it converts only into another sink cache; any other switch from it
returns None and the session recomputes from the messages.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.caches import build_cache
from engine.caches.base import KV, KVCache
from engine.caches.shape import KVShape
from engine.specs import CacheSpec


def convert(cache: KVCache | None, stream_length: int, spec: CacheSpec, config: Any,
            device: torch.device | None = None) -> KVCache | None:
    """A cache of `spec` holding what `cache` holds, or None when the session must recompute.

    Args:
        cache: the conversation's current cache.
        stream_length: how many tokens of the conversation the current cache stands for.
        spec: the new strategy.
        config: the model config.
        device: where the model runs.
    """
    if cache is None or stream_length == 0:
        return None
    if cache.evicted and not spec.bounded_length:
        return None
    content = cache.full_kv()
    if any(kv is None for kv in content):
        return None
    return fill([kv for kv in content if kv is not None], stream_length, spec, config, device)


def fill(content: list[KV], stream_length: int, spec: CacheSpec, config: Any,
         device: torch.device | None = None) -> KVCache | None:
    """A new cache of `spec` fed with per-layer full-precision (keys, values); None if it cannot hold them.

    `stream_length` is how many conversation tokens the content stands for: more than it
    holds when it comes from a sink cache that evicted tokens (only a sink cache can take that).
    Content of another shape than the model's (layers, KV heads, head size) is refused before
    anything is fed: a cache's `update` would fail on it, or worse, take it.
    """
    stored = content[0][0].shape[-2] if content else 0
    if stored == 0 or (stored < stream_length and not spec.bounded_length) or stored > stream_length:
        return None
    shape = KVShape.of(config)
    expected = (1, shape.kv_heads, stored, shape.head_dim)
    if len(content) != shape.layers or any(tuple(t.shape) != expected for kv in content for t in kv):
        return None  # another model's, a damaged or a hand-made snapshot; or layers that disagree
    target = build_cache(spec, config, device)
    try:
        target.ensure_room(stored)
    except ValueError:
        return None
    for idx, (keys, values) in enumerate(content):
        target.update(keys, values, idx)
    target.adopt_stream(stream_length)
    return target
