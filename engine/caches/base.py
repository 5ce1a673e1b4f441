"""What Cachet needs from every KV cache it builds, declared once.

The shape follows `transformers/cache_utils.py`: a `Cache` holds one layer object per model
layer, and each layer implements `update` / `get_seq_length` / `crop` / `offload` for the model's
forward pass. On top of that, every layer of every Cachet strategy is a `KVLayer`, which adds what
the session, the conversions, the snapshots and the memory pool need:

    get_seq_length() -> int             how many tokens the layer holds (transformers' own; a 0-d
                                        tensor in the static layers, as compiled graphs need)
    crop_to(n) -> bool                  stand for the first n tokens of the conversation again;
                                        False (and nothing changed) when it cannot (the session
                                        then recomputes)
    full_kv() -> (keys, values) | None  everything held, in full precision, keys rotated for slots
                                        0..n-1 (what a conversion or a snapshot copies); None
                                        when the layer holds nothing it can give back whole
    nbytes() -> int                     the bytes its tensors really hold now (content)
    reserved_nbytes() -> int            the bytes allocated for it (content plus spare capacity)
    to(device, pin_memory)              move every tensor it holds, in place
    rewindable(n) -> bool               whether n tokens fed in one pass can be cropped away again
                                        leaving the layer as it was, and that pass computes what n
                                        one-token passes would (no eviction, no quantization inside
                                        it): speculative decoding checks guesses only then

and every cache is a `KVCache`, which does the same over its layers and adds `ensure_room`
(a pre-allocated cache refuses to overflow before anything is written) and `evicted` (tokens
of the conversation it stands for but no longer holds). Callers never probe a cache for what
it can do: whatever it is, it can do all of this.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engine.caches.shape import tensor_nbytes

KV = tuple[torch.Tensor, torch.Tensor]


def move_tensor(t: torch.Tensor, device: torch.device, pin_memory: bool = False) -> torch.Tensor:
    """`t` on `device`; in pinned memory when asked and it is a plain tensor going to the CPU (pinned
    pages make the copy back to the GPU asynchronous)."""
    moved = t.to(device, non_blocking=pin_memory)
    if pin_memory and device.type == "cpu" and type(moved) is torch.Tensor and not moved.is_pinned():
        moved = moved.pin_memory()
    return moved


class KVLayer(CacheLayerMixin):
    """One layer of a Cachet cache (see the module docstring for the contract).

    `nbytes` and `to` cover `keys` and `values`; a layer that holds more (a quantized prefix,
    sinks, blocks) extends them.
    """

    @abstractmethod
    def crop_to(self, length: int) -> bool:
        """Keep what stands for the first `length` tokens; False (nothing changed) when impossible."""

    @abstractmethod
    def full_kv(self) -> KV | None:
        """Every held token's keys and values in full precision, keys rotated for slots 0..n-1."""

    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in (self.keys, self.values) if t is not None)

    def rewindable(self, new_tokens: int) -> bool:
        """True for a layer that only appends (see the module docstring)."""
        return True

    def reserved_nbytes(self) -> int:
        """The bytes allocated for it, spare capacity included (at least `nbytes()`)."""
        return self.nbytes()

    def to(self, device: torch.device, pin_memory: bool = False) -> None:
        if self.keys is not None:
            self.keys = move_tensor(self.keys, device, pin_memory)
        if self.values is not None:
            self.values = move_tensor(self.values, device, pin_memory)
        if self.is_initialized:  # offloading prefetches back to `device`
            self.device = device


class KVCache(Cache):
    """A cache whose layers are all `KVLayer`s; every operation goes over all of them."""

    @property
    def kv_layers(self) -> list[KVLayer]:
        return cast(list[KVLayer], self.layers)

    def crop_to(self, length: int) -> bool:
        """Crop every layer to `length` tokens; False when one cannot be.

        Each layer is cropped on its own, so this also repairs a cache that a failed forward pass
        left with some layers one chunk longer than others.
        """
        if length < 0 or any(layer.get_seq_length() < length for layer in self.kv_layers):
            return False
        return all([layer.crop_to(length) for layer in self.kv_layers])

    def full_kv(self) -> list[KV | None]:
        """`full_kv()` of every layer."""
        return [layer.full_kv() for layer in self.kv_layers]

    def nbytes(self) -> int:
        """Bytes the cache's tensors really hold now (not an estimate)."""
        return sum(layer.nbytes() for layer in self.kv_layers)

    def reserved_nbytes(self) -> int:
        """Bytes allocated for the cache, spare capacity of layers that grow in place included."""
        return sum(layer.reserved_nbytes() for layer in self.kv_layers)

    def to(self, device: torch.device, pin_memory: bool = False) -> None:
        """Move every tensor of every layer to `device`, in place (the pool moves idle caches)."""
        for layer in self.kv_layers:
            layer.to(device, pin_memory)

    def rewindable(self, new_tokens: int) -> bool:
        """Whether `new_tokens` fed in one pass can be taken back exactly (every layer agrees, and a
        bounded cache has room for them)."""
        try:
            self.ensure_room(new_tokens)
        except Exception:  # noqa: BLE001 (a bounded cache's "full")
            return False
        return all(layer.rewindable(new_tokens) for layer in self.kv_layers)

    def ensure_room(self, new_tokens: int) -> None:
        """Raise before anything is written when `new_tokens` more would not fit (a bounded
        pre-allocation); most caches grow and never raise."""

    @property
    def evicted(self) -> int:
        """Tokens of the conversation this cache stands for but no longer holds (a sink cache's
        evicted middle); a cache that evicted converts only into another that may."""
        return 0

    def adopt_stream(self, stream_length: int) -> None:
        """The content just fed in stands for `stream_length` tokens of the conversation (more than
        it holds when it came from a cache that evicted; only such a cache can take that)."""
        if stream_length != self.get_seq_length():
            raise ValueError(f"a {type(self).__name__} holds every token it stands for: {self.get_seq_length()} "
                             f"tokens cannot stand for {stream_length}.")

