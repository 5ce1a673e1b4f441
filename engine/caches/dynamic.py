"""The full KV cache: every token's keys and values, kept as they are (transformers' `DynamicLayer`).

It is the reference that every other strategy's fidelity is measured against. A model whose
layers use a sliding window (or attention chunks) keeps only that window in those layers, as
transformers' `DynamicCache` does; such a layer can be cropped only while it still holds every
token it was fed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

from engine.caches.base import KV, KVCache, KVLayer
from engine.caches.shape import FULL, STATE, WINDOW, KVShape, layer_kinds, layered_bytes, tensor_nbytes
from engine.caches.state import StateLayer
from engine.specs import CacheSpec

GROW_QUANTUM = 256  # capacity is a multiple of this many tokens
GROW_FACTOR = 1.25  # and grows by at least this factor: amortised O(1) copies per token, at most 25% slack


def grown_capacity(needed: int, current: int) -> int:
    """The capacity to allocate for `needed` tokens when `current` is too small."""
    target = max(needed, int(current * GROW_FACTOR))
    return -(-target // GROW_QUANTUM) * GROW_QUANTUM


class GrowingLayer(KVLayer, DynamicLayer):
    """Keys and values appended in buffers that grow in place (the full cache's and the sink window's).

    transformers' `DynamicLayer` concatenates on every update, copying the whole layer each
    decoding step (at 7.7k tokens of history that was 43% of a step's time here). This layer
    writes new tokens into pre-allocated capacity and hands out views of the filled part
    (`keys`, `values`); when full, it moves to a buffer `GROW_FACTOR` larger. Capacity is not
    content: `nbytes()` counts what is held, `reserved_nbytes()` what is allocated. Whatever sets
    `keys`/`values` to other tensors (a move to another device, a restore, a sink's eviction) is
    adopted into a fresh buffer at the next update.
    """

    # How much to allocate for `needed` tokens when the buffer (of `current` tokens) is too small; None:
    # `grown_capacity`. Graph-captured decoding (engine/graphs.py) sets its buckets here.
    capacity_for: Callable[[int, int], int] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def _owns(self, view: torch.Tensor | None, buf: torch.Tensor | None) -> bool:
        return (view is not None and buf is not None and view.device == buf.device and view.dtype == buf.dtype
                and view.data_ptr() == buf.data_ptr() and view.shape[:2] == buf.shape[:2]
                and view.stride() == buf.stride())

    def _fits(self, buf: torch.Tensor | None, like: torch.Tensor, needed: int) -> bool:
        return (buf is not None and buf.device == like.device and buf.dtype == like.dtype
                and buf.shape[:2] == like.shape[:2] and buf.shape[-1] == like.shape[-1] and buf.shape[-2] >= needed)

    def _allocate(self, needed: int, capacity: int | None = None) -> None:
        """Buffers for at least `needed` tokens (exactly `capacity` when given) holding the current content.

        Content set from elsewhere (a sink's eviction, a restore) goes back into the buffer it left when that
        one still fits, so that the buffer keeps its address (a captured decode graph writes there)."""
        assert self.keys is not None and self.values is not None
        held = self.keys.shape[-2]
        owned = self._owns(self.keys, self._kbuf) and self._owns(self.values, self._vbuf)
        if (capacity is None and not owned and self._fits(self._kbuf, self.keys, needed)
                and self._fits(self._vbuf, self.values, needed)):
            assert self._kbuf is not None and self._vbuf is not None
            kbuf, vbuf = self._kbuf, self._vbuf
            keys, values = self.keys, self.values
            if keys.untyped_storage().data_ptr() == kbuf.untyped_storage().data_ptr():
                keys = keys.clone()  # a view into the same buffer: copy it out before writing over it
            if values.untyped_storage().data_ptr() == vbuf.untyped_storage().data_ptr():
                values = values.clone()
        else:
            current = self._kbuf.shape[-2] if owned and self._kbuf is not None else 0
            if capacity is None:
                grow = self.capacity_for or grown_capacity
                capacity = grow(needed, max(current, held))
            b, h, _, d = self.keys.shape
            # A graph's step attends over the whole buffer, masked: uninitialised memory could hold NaNs, which
            # a zero attention weight does not cancel (0 × NaN), so those buffers start zeroed.
            make = torch.zeros if self.capacity_for is not None else torch.empty
            kbuf = make((b, h, capacity, d), dtype=self.keys.dtype, device=self.keys.device)
            vbuf = make((b, h, capacity, self.values.shape[-1]), dtype=self.values.dtype, device=self.values.device)
            keys, values = self.keys, self.values
        kbuf[..., :held, :].copy_(keys)
        vbuf[..., :held, :].copy_(values)
        self._kbuf, self._vbuf = kbuf, vbuf
        self.keys, self.values = kbuf[..., :held, :], vbuf[..., :held, :]

    def reserve(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold the content in buffers of exactly `capacity` tokens (moving it once if they are not), and
        return them: a captured decode step writes its token into them (then `advance` counts it)."""
        assert self.keys is not None and self.values is not None
        if capacity < self.keys.shape[-2]:
            raise ValueError(f"{capacity} tokens cannot hold the {self.keys.shape[-2]} this layer has.")
        with torch.inference_mode():
            owned = self._owns(self.keys, self._kbuf) and self._owns(self.values, self._vbuf)
            if not (owned and self._kbuf is not None and self._kbuf.shape[-2] == capacity):
                reuse = (not owned and self._kbuf is not None and self._kbuf.shape[-2] == capacity
                         and self._fits(self._kbuf, self.keys, capacity)
                         and self._fits(self._vbuf, self.values, capacity))
                self._allocate(self.keys.shape[-2], None if reuse else capacity)
        assert self._kbuf is not None and self._vbuf is not None
        return self._kbuf, self._vbuf

    def advance(self, new: int) -> None:
        """Count `new` tokens written into the buffers past the content by someone else (a replayed graph)."""
        assert self.keys is not None and self._kbuf is not None and self._vbuf is not None
        held = self.keys.shape[-2] + new
        self.keys, self.values = self._kbuf[..., :held, :], self._vbuf[..., :held, :]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self._kbuf = self._vbuf = None
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        held, new = self.keys.shape[-2], key_states.shape[-2]
        with torch.inference_mode():  # the buffers may be inference tensors (made in a forward pass)
            if not (self._owns(self.keys, self._kbuf) and self._owns(self.values, self._vbuf)
                    and self._kbuf is not None and held + new <= self._kbuf.shape[-2]):
                self._allocate(held + new)
            assert self._kbuf is not None and self._vbuf is not None
            self._kbuf[..., held:held + new, :].copy_(key_states)
            self._vbuf[..., held:held + new, :].copy_(value_states)
            self.keys, self.values = self._kbuf[..., :held + new, :], self._vbuf[..., :held + new, :]
        return self.keys, self.values

    def reserved_nbytes(self) -> int:
        if self._owns(self.keys, self._kbuf) and self._owns(self.values, self._vbuf):
            assert self._kbuf is not None and self._vbuf is not None
            return tensor_nbytes(self._kbuf) + tensor_nbytes(self._vbuf)
        return self.nbytes()

    def to(self, device: torch.device, pin_memory: bool = False) -> None:
        """Move what is held (not the spare capacity): an idle cache takes no more than its content."""
        if self.keys is not None and self.values is not None:
            self.keys, self.values = self.keys.contiguous(), self.values.contiguous()
        self._kbuf = self._vbuf = None
        super().to(device, pin_memory)

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


class FullLayer(GrowingLayer):
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

    sliding = True

    def _holds_everything(self) -> bool:
        return self.keys is None or self.keys.shape[-2] == self.cumulative_length

    def crop_to(self, length: int) -> bool:
        current = self.get_seq_length()
        if length < 0 or length > current or (length < current and not self._holds_everything()):
            return False
        if length < current:
            self.crop(length - current)
        return True

    def rewindable(self, new_tokens: int) -> bool:
        """Nothing slides out of the window inside the pass."""
        return self._holds_everything() and self.get_seq_length() + new_tokens <= self.sliding_window - 1

    def full_kv(self) -> KV | None:
        if self.get_seq_length() == 0 or not self._holds_everything():
            return None
        assert self.keys is not None and self.values is not None
        return self.keys, self.values


def layers_for(config: Any, full: Callable[[int], KVLayer] | None = None,
               window: Callable[[int, int], KVLayer] | None = None) -> list[Any]:
    """One layer per model layer, as the model's config says: `full(index)` for full-attention layers (a
    `FullLayer` by default: each strategy brings its own), `window(index, sliding_window)` for sliding or
    chunked ones (a `WindowLayer`: every strategy keeps the model's own window), a `StateLayer` for
    state-space layers (kept as they are), a `DummyLayer` for layers that hold nothing."""
    layers: list[Any] = []
    for idx, (kind, size) in enumerate(layer_kinds(config)):
        if kind == FULL:
            layers.append(full(idx) if full is not None else FullLayer())
        elif kind == WINDOW:
            layers.append(window(idx, size) if window is not None else WindowLayer(sliding_window=size))
        elif kind == STATE:
            layers.append(StateLayer())
        else:
            layers.append(DummyLayer())
    return layers


class DynamicKVCache(KVCache):
    """The full cache; with `offloading`, each layer's KV lives in CPU RAM between its uses (CUDA only)."""

    def __init__(self, config: Any, offloading: bool = False) -> None:
        super().__init__(layers=list(layers_for(config)), offloading=offloading, offload_only_non_sliding=False)


def build(config: Any, spec: CacheSpec | None = None, device: torch.device | None = None) -> DynamicKVCache:
    return DynamicKVCache(config)


def bytes_for(tokens: int, config: Any, spec: CacheSpec | None = None, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a full cache of `tokens` tokens holds: 2 (K and V) × KV heads × head dim × dtype size per token
    and full-attention layer; sliding layers hold their window, state-space layers their constant states."""
    shape = KVShape.of(config)
    return layered_bytes(config, dtype, tokens * shape.bytes_per_token(dtype) // shape.layers, tokens)
