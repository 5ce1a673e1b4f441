"""Switching a conversation's cache strategy without recomputing it, where that is possible.

Every strategy can give back its content as full-precision (keys, values) per layer, keys
rotated for their slot positions (`export_kv`). A new cache of another strategy is then
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
from transformers import Cache

from engine.caches import CacheSpec, build_cache
from engine.caches.sink import SinkCache


def layer_kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One layer's content in full precision, keys rotated for slots 0..n-1; None if empty."""
    if not getattr(layer, "is_initialized", False) or layer.get_seq_length() == 0:
        return None
    full_kv = getattr(layer, "full_kv", None)  # our sink and quantized layers de-quantize here
    if callable(full_kv):
        result: tuple[torch.Tensor, torch.Tensor] = full_kv()
        return result
    n = layer.get_seq_length()
    return layer.keys[..., :n, :], layer.values[..., :n, :]


def export_kv(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    return [layer_kv(layer) for layer in cache.layers]


def convert(cache: Cache | None, stream_length: int, spec: CacheSpec, config: Any) -> Cache | None:
    """A cache of `spec` holding what `cache` holds, or None when the session must recompute.

    Args:
        cache: the conversation's current cache.
        stream_length: how many tokens of the conversation the current cache stands for.
        spec: the new strategy.
        config: the model config.
    """
    if cache is None or stream_length == 0:
        return None
    evicted = isinstance(cache, SinkCache) and cache.evicted > 0
    if evicted and not spec.bounded_length:
        return None
    content = export_kv(cache)
    if any(kv is None for kv in content):
        return None
    return fill([kv for kv in content if kv is not None], stream_length, spec, config)


def fill(content: list[tuple[torch.Tensor, torch.Tensor]], stream_length: int, spec: CacheSpec,
         config: Any) -> Cache | None:
    """A new cache of `spec` fed with per-layer full-precision (keys, values); None if it cannot hold them.

    `stream_length` is how many conversation tokens the content stands for: more than it
    holds when it comes from a sink cache that evicted tokens (only a sink cache can take that).
    """
    stored = content[0][0].shape[-2] if content else 0
    if stored == 0 or (stored < stream_length and not spec.bounded_length) or stored > stream_length:
        return None
    if any(k.shape[-2] != stored or v.shape[-2] != stored for k, v in content):
        return None  # layers that disagree on what they hold (a damaged or hand-made snapshot)
    target = build_cache(spec, config)
    ensure = getattr(target, "ensure_room", None)
    if callable(ensure):
        try:
            ensure(stored)
        except ValueError:
            return None
    for idx, (keys, values) in enumerate(content):
        target.update(keys, values, idx)
    if isinstance(target, SinkCache):
        # The new sink layers count what they were fed; carry over the stream's history.
        for layer in target.sink_layers:
            layer.evicted += stream_length - layer.fed
            layer.fed = stream_length
    return target
