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

import functools
import inspect
from abc import abstractmethod
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engine.caches.shape import tensor_nbytes
from engine.caches.state import StateLayer, StateSnapshot

KV = tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=256)
def _cache_keyword(forward: Any) -> str:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for calling `module` (a model or a decoder layer): transformers 5.25 renamed
    `past_key_values` to `cache` (the old name warns, and goes in 5.40); older versions and remote code
    take `past_key_values`. Decided once per class from its forward's signature."""
    return {_cache_keyword(type(module).forward): cache}


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
    sinks, blocks) extends them. `sliding` marks a layer that keeps only the model's own window.
    """

    sliding = False

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
    """A cache whose attention layers are all `KVLayer`s; every operation goes over all of them.

    A hybrid model's state-space layers are `StateLayer`s (state.py): constant-size states that
    cannot be cropped back. Such a cache keeps copies of them at a few lengths (`checkpoint`, taken
    by the session at each turn's generation point), so that it can still go back to one of those.
    """

    MAX_CHECKPOINTS = 4  # a regenerate, and edits of the last few turns, need no recompute from scratch
    _checkpoints: dict[int, list[StateSnapshot]] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' update, after moving the layer's tensors to where its attention runs: with a model split
        between GPU and CPU (engine/layer_split.py) the pool and snapshots move a cache as a whole, and each
        layer's keys and values go back to their layer's device here, once."""
        if layer_idx < len(self.layers):
            layer = self.layers[layer_idx]
            if (isinstance(layer, KVLayer) and layer.is_initialized and layer.keys is not None
                    and layer.keys.device != key_states.device):
                layer.to(key_states.device)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def kv_layers(self) -> list[KVLayer]:
        return [layer for layer in self.layers if isinstance(layer, KVLayer)]

    @property
    def state_layers(self) -> list[StateLayer]:
        return [layer for layer in self.layers if isinstance(layer, StateLayer)]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """The conversation tokens held, counted in the first full-attention layer (a model whose first
        layers slide, or are state-space layers, is counted where every token is)."""
        if layer_idx == 0 or layer_idx is None:
            for layer in self.kv_layers:
                if not layer.sliding:
                    return layer.get_seq_length()
            layer_idx = 0
        return super().get_seq_length(layer_idx)

    def _holds_state(self) -> bool:
        return any(layer.holds_state() for layer in self.state_layers)

    def crop_to(self, length: int) -> bool:
        """Crop every layer to `length` tokens; False when one cannot be.

        Each layer is cropped on its own, so this also repairs a cache that a failed forward pass
        left with some layers one chunk longer than others. State-space layers go back only to a
        length they were checkpointed at (or stay, when `length` is the current length).
        """
        if length < 0 or any(layer.get_seq_length() < length for layer in self.kv_layers):
            return False
        snapshot = None
        if self._holds_state() and length != int(self.get_seq_length()):
            snapshot = (self._checkpoints or {}).get(length)
            if snapshot is None:
                return False
        done = all([layer.crop_to(length) for layer in self.kv_layers])
        if done and snapshot is not None:
            for layer, states in zip(self.state_layers, snapshot, strict=True):
                layer.restore(states)
        if done and self._checkpoints:
            self._checkpoints = {n: c for n, c in self._checkpoints.items() if n <= length}
        return done

    def checkpoint(self) -> None:
        """Copy the state-space layers' states at the current length (nothing without such layers)."""
        if not self._holds_state():
            return
        checkpoints = self._checkpoints if self._checkpoints is not None else {}
        checkpoints[int(self.get_seq_length())] = [layer.snapshot() for layer in self.state_layers]
        while len(checkpoints) > self.MAX_CHECKPOINTS:
            del checkpoints[min(checkpoints)]
        self._checkpoints = checkpoints

    def restore_point(self, length: int) -> int:
        """The longest length up to `length` this cache can be cropped back to: `length` itself without
        state-space layers, else the longest checkpoint (0: none, recompute from scratch)."""
        if not self._holds_state() or length == int(self.get_seq_length()):
            return length
        return max((n for n in (self._checkpoints or {}) if n <= length), default=0)

    def checkpoint_nbytes(self) -> int:
        """Bytes the checkpointed states take (part of `nbytes`)."""
        return sum(StateLayer.snapshot_nbytes(s) for c in (self._checkpoints or {}).values() for s in c)

    def full_kv(self) -> list[KV | None]:
        """`full_kv()` of every layer (None for a state-space layer: it has no keys and values to give)."""
        return [layer.full_kv() if isinstance(layer, KVLayer) else None for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes the cache's tensors really hold now (not an estimate), checkpointed states included."""
        return (sum(layer.nbytes() for layer in self.kv_layers) + sum(layer.nbytes() for layer in self.state_layers)
                + self.checkpoint_nbytes())

    def reserved_nbytes(self) -> int:
        """Bytes allocated for the cache, spare capacity of layers that grow in place included."""
        return (sum(layer.reserved_nbytes() for layer in self.kv_layers)
                + sum(layer.nbytes() for layer in self.state_layers) + self.checkpoint_nbytes())

    def to(self, device: torch.device, pin_memory: bool = False) -> None:
        """Move every tensor of every layer to `device`, in place (the pool moves idle caches)."""
        for layer in self.kv_layers:
            layer.to(device, pin_memory)
        for state in self.state_layers:
            state.to(device, pin_memory)
        for snapshots in (self._checkpoints or {}).values():
            for snapshot in snapshots:
                for conv, rec, _ in snapshot:
                    for d in (conv, rec):
                        for i, t in d.items():
                            d[i] = None if t is None else move_tensor(t, device, pin_memory)

    def rewindable(self, new_tokens: int) -> bool:
        """Whether `new_tokens` fed in one pass can be taken back exactly (every layer agrees, and a
        bounded cache has room for them)."""
        try:
            self.ensure_room(new_tokens)
        except Exception:  # noqa: BLE001 (a bounded cache's "full")
            return False
        return (all(layer.rewindable(new_tokens) for layer in self.kv_layers)
                and not any(layer.holds_state() for layer in self.state_layers))

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

