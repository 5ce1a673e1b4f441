"""The layers of a hybrid model that are not attention: state-space (Mamba) and linear-attention layers.

Such a layer keeps no per-token keys and values, only a convolution state and a recurrent state of
constant size, updated in place token after token (transformers' `LinearAttentionLayer`). Every
Cachet strategy keeps them as they are: there is nothing to quantize, evict or re-position. What
they cannot do is go back: a recurrent state after 100 tokens says nothing about the state after
90, so a cache holding one can only be cropped to its current length, or to a length whose states
it copied earlier (`KVCache.checkpoint`; the session takes one at every turn's generation point).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import LinearAttentionLayer

from engine.caches.shape import tensor_nbytes

StateSnapshot = list[tuple[dict[int, torch.Tensor | None], dict[int, torch.Tensor | None], dict[int, bool]]]


def _move(t: torch.Tensor | None, device: torch.device, pin_memory: bool) -> torch.Tensor | None:
    from engine.caches.base import move_tensor

    return None if t is None else move_tensor(t, device, pin_memory)


class StateLayer(LinearAttentionLayer):
    """A state-space layer's conv and recurrent states, with the parts of the KV contract that apply.

    Not a `CacheLayerMixin` on purpose: transformers' `Cache.get_seq_length()` skips such layers, and
    they have no sequence length of their own (the cache's length comes from its attention layers).
    """

    keys = values = None  # no per-token content

    def __init__(self, number_of_states: int = 1, **kwargs: Any) -> None:
        super().__init__(number_of_states=number_of_states)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for d in (self.conv_states, self.recurrent_states) for t in d.values() if t is not None]

    def holds_state(self) -> bool:
        return any(self.has_previous_state.values()) or any(self.is_recurrent_states_initialized.values())

    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self._tensors())

    def reserved_nbytes(self) -> int:
        return self.nbytes()

    def to(self, device: torch.device, pin_memory: bool = False) -> None:
        for states in (self.conv_states, self.recurrent_states):
            for i, t in states.items():
                states[i] = _move(t, device, pin_memory)
        if self.device is not None:
            self.device = device

    def rewindable(self, new_tokens: int) -> bool:
        """Never: a recurrent state cannot take tokens back (speculative decoding skips such caches)."""
        return False

    def snapshot(self) -> StateSnapshot:
        """A copy of the states as they are now."""
        with torch.inference_mode():
            conv = {i: None if t is None else t.clone() for i, t in self.conv_states.items()}
            rec = {i: None if t is None else t.clone() for i, t in self.recurrent_states.items()}
        return [(conv, rec, dict(self.has_previous_state))]

    def restore(self, snapshot: StateSnapshot) -> None:
        """Put back the states `snapshot` copied (copies again: the snapshot stays usable)."""
        conv, rec, previous = snapshot[0]
        with torch.inference_mode():
            for mine, theirs in ((self.conv_states, conv), (self.recurrent_states, rec)):
                for i, t in theirs.items():
                    mine[i] = None if t is None else t.clone()
        self.has_previous_state = dict(previous)

    @staticmethod
    def snapshot_nbytes(snapshot: StateSnapshot) -> int:
        return sum(tensor_nbytes(t) for conv, rec, _ in snapshot for d in (conv, rec) for t in d.values()
                   if t is not None)
