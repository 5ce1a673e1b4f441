"""A KV cache pre-allocated to `max_cache_len` tokens (transformers' `StaticCache`).

Its tensors never change shape or address, which is what `torch.compile` with CUDA graphs needs:
on a GPU, compile the decode step once, e.g.
`model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`, and every
later token reuses the captured graph (several times faster decoding for small models, where
Python overhead dominates). Prefill should stay eager. Without compilation (the default here, and
always on CPU) it gives the same logits as the dynamic cache, only with attention over the whole
pre-allocated length, masked.

The memory is taken in full at the first forward pass. A conversation that would outgrow it is
refused with `StaticCacheFull` before anything is written, never silently truncated: call
`ensure_room(n)` before feeding `n` tokens (each layer also checks again in `update`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from engine.caches.base import KV, KVCache, KVLayer, move_tensor
from engine.caches.shape import KVShape, layered_bytes
from engine.specs import CacheSpec


class StaticCacheFull(ValueError):
    """Feeding more tokens would overflow the pre-allocated cache; nothing was written."""

    def __init__(self, cached: int, new: int, capacity: int) -> None:
        super().__init__(
            f"The static cache holds at most {capacity} tokens; it has {cached} and {new} more would not fit. "
            "Start a new chat, delete earlier messages, or choose a larger static cache (or another strategy)."
        )
        self.cached = cached
        self.new = new
        self.capacity = capacity


class CroppableStaticLayer(KVLayer, StaticLayer):
    """A `StaticLayer` that can be cropped and refuses to overflow.

    Its length is `cumulative_length` (a 0-d tensor, so compiled graphs see no new constant);
    attention masks are computed from it, so cropping only has to lower it. The dropped tail is
    zeroed anyway so that no stale keys survive.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.get_length()
        if cached + key_states.shape[-2] > self.max_cache_len:
            raise StaticCacheFull(cached, key_states.shape[-2], self.max_cache_len)
        return super().update(key_states, value_states, *args, **kwargs)

    def get_length(self) -> int:
        return int(self.cumulative_length) if self.is_initialized else 0

    def full_kv(self) -> KV | None:
        """The cached tokens' keys and values (without the unused tail)."""
        n = self.get_length()
        if n == 0:
            return None
        assert self.keys is not None and self.values is not None
        return self.keys[..., :n, :], self.values[..., :n, :]

    def to(self, device: torch.device, pin_memory: bool = False) -> None:
        super().to(device, pin_memory)
        self.cumulative_length = move_tensor(self.cumulative_length, device, pin_memory)

    @torch.inference_mode()  # the tensors were made by forward passes in inference mode
    def crop_to(self, length: int) -> bool:
        if length < 0 or length > self.get_length():
            return False
        if self.is_initialized and length < self.get_length():
            assert self.keys is not None and self.values is not None
            self.keys[:, :, length:].zero_()
            self.values[:, :, length:].zero_()
            self.cumulative_length.fill_(length)
        return True

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove.")
        self.crop_to(self.get_length() + tokens_to_remove)


class CroppableStaticCache(KVCache, StaticCache):
    """`StaticCache` with the layers above and `ensure_room`.

    Only full-attention layers are pre-allocated: a model's sliding layers keep their own window as in
    the dynamic cache (at most `sliding_window - 1` tokens, which never overflows), state-space layers
    their constant states. Their shapes change until the window is full, so a compiled decode step of
    such a model is recompiled until then.
    """

    def __init__(self, config: Any, max_cache_len: int) -> None:
        from engine.caches.dynamic import layers_for

        KVCache.__init__(self, layers=layers_for(config, full=lambda _: CroppableStaticLayer(max_cache_len)))
        self.max_cache_len = max_cache_len

    @property
    def static_layers(self) -> list[CroppableStaticLayer]:
        return [layer for layer in self.layers if isinstance(layer, CroppableStaticLayer)]

    def room(self) -> int:
        """Tokens that can still be fed."""
        return self.max_cache_len - int(self.get_seq_length())

    def ensure_room(self, new_tokens: int) -> None:
        """Raise `StaticCacheFull` if `new_tokens` more tokens would not fit."""
        if new_tokens > self.room():
            raise StaticCacheFull(int(self.get_seq_length()), new_tokens, self.max_cache_len)


def build(config: Any, spec: CacheSpec, device: torch.device | None = None) -> CroppableStaticCache:
    return CroppableStaticCache(config, max_cache_len=spec.max_cache_len)


def bytes_for(tokens: int, config: Any, spec: CacheSpec, dtype: torch.dtype = torch.float32) -> int:
    """The full pre-allocation, whatever `tokens` is: `max_cache_len` tokens of K and V in every full-attention
    layer (sliding layers: their window; state-space layers: their states)."""
    shape = KVShape.of(config)
    return layered_bytes(config, dtype, spec.max_cache_len * shape.bytes_per_token(dtype) // shape.layers, tokens)
