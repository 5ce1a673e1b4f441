"""Attention sinks (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453): endless chats in constant memory.

The cache keeps the first `sink_tokens` tokens of the conversation (the "attention sinks"
that softmax leans on) and the most recent `window` tokens, and evicts the middle. Attention
must see contiguous positions inside the cache, so the keys of the kept recent tokens are
re-rotated whenever tokens before them are evicted.

transformers 5.x no longer ships a `SinkCache`, and its attention layers no longer pass the
rotary `cos`/`sin` to `Cache.update`, so this cache computes the rotation itself from the
model config's RoPE parameters (`RopeRotator`), and the session drives the positions: a
token fed into a cache that holds `L` tokens gets position `L`, never its absolute index.

Two storage layouts share that logic:

* `sink` keeps keys as the model rotated them (for their current slot). On eviction the
  kept recent keys are rotated back by the number of evicted tokens, in float32. Eviction
  happens in batches of `evict_batch` tokens (1/16 of the window), so the cache holds
  between `window - evict_batch` and `window` recent tokens and each key is re-rotated at
  most 16 times in its life: rounding does not pile up in half precision.
* `sink-quantized` keeps the sinks and a recent residual in full precision and the rest of
  the window as quantized blocks of `residual` tokens whose keys are stored *un-rotated*:
  a block is quantized once and never re-quantized; on read it is de-quantized and rotated
  to its current positions. Eviction drops whole blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.caches.base import KV, KVCache, KVLayer, move_tensor
from engine.caches.dynamic import GrowingLayer, WindowLayer
from engine.caches.quantizers import Quantizer, estimate_bytes, make_quantizer
from engine.caches.shape import KVShape, dtype_size, layered_bytes, tensor_nbytes, text_config
from engine.specs import CacheConfigError, CacheSpec


class SinkUnsupportedError(ValueError):
    """The model's attention cannot be re-positioned (no standard rotary embedding)."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeRotator:
    """Rotates keys by a number of positions with the model's own RoPE frequencies.

    Built from the config (`rope_parameters` with its `rope_type`, `head_dim`, partial
    rotary factor), the same way the model's rotary embedding computes its inverse
    frequencies. The scaling factor some RoPE variants multiply `cos`/`sin` with (YaRN's,
    LongRoPE's attention factor) is left out on purpose: the stored keys carry it once already,
    and a relative re-rotation must not scale them again.

    `layer_type` picks the parameters of one kind of layer where a model has several (Gemma 3:
    a different base for its sliding and its global layers); `seq_len` is the longest position
    the cache reaches, for the variants whose frequencies depend on it (LongRoPE's short or long
    factors, dynamic NTK). A rotator with `rot_dim == 0` (`RopeRotator.none()`) is a layer
    without RoPE (SmolLM3's NoPE layers): its keys carry no position and never move.
    """

    def __init__(self, config: Any, layer_type: str | None = None, seq_len: int | None = None) -> None:
        text = text_config(config)
        params = getattr(text, "rope_parameters", None) or {}
        if not params and getattr(text, "rope_theta", None) is None:
            raise SinkUnsupportedError(
                f"{getattr(text, 'model_type', 'this model')} has no rotary position embedding, "
                "so its cached keys cannot be re-positioned for attention sinks."
            )
        per_type = layer_type is not None and isinstance(params.get(layer_type), dict)
        if per_type:
            params = params[layer_type]
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = float(params.get("rope_theta", getattr(text, "rope_theta", 10000.0)))
            head_dim = KVShape.of(text).head_dim
            factor = params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0))
            dim = int(head_dim * float(factor))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise SinkUnsupportedError(f"RoPE type {rope_type!r} is not supported by the sink cache.")
            kwargs: dict[str, Any] = {"layer_type": layer_type} if per_type else {}
            if seq_len is not None and rope_type in ("longrope", "dynamic"):
                kwargs["seq_len"] = seq_len
            inv_freq, _scaling = ROPE_INIT_FUNCTIONS[rope_type](text, torch.device("cpu"), **kwargs)
        self.inv_freq = inv_freq.to(torch.float64)
        self.rot_dim = 2 * self.inv_freq.numel()
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def none(cls) -> RopeRotator:
        """The rotator of a layer without RoPE: moves nothing."""
        rotator = cls.__new__(cls)
        rotator.inv_freq = torch.zeros(0, dtype=torch.float64)
        rotator.rot_dim = 0
        rotator._tables = {}
        return rotator

    @classmethod
    def for_layer(cls, config: Any, index: int, seq_len: int | None = None) -> RopeRotator:
        """The rotator of layer `index`: none for a layer without RoPE, else its kind of layer's."""
        text = text_config(config)
        no_rope = getattr(text, "no_rope_layers", None)  # SmolLM3: 1 = uses RoPE, 0 = NoPE
        if no_rope is not None and index < len(no_rope) and not no_rope[index]:
            return cls.none()
        layer_types = getattr(text, "layer_types", None)
        layer_type = layer_types[index] if layer_types is not None and index < len(layer_types) else None
        return cls(config, layer_type, seq_len)

    def _cos_sin(self, shift: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (shift, device)
        if key not in self._tables:
            angles = shift * self.inv_freq
            emb = torch.cat((angles, angles))
            self._tables.clear() if len(self._tables) > 64 else None
            self._tables[key] = (emb.cos().to(device, torch.float32), emb.sin().to(device, torch.float32))
        return self._tables[key]

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Move keys rotated for position p to position p + delta (delta may be negative)."""
        if delta == 0 or keys.shape[-2] == 0 or self.rot_dim == 0:
            return keys
        cos, sin = self._cos_sin(delta, keys.device)
        rot = keys[..., : self.rot_dim].float()
        moved = rot * cos + _rotate_half(rot) * sin
        if self.rot_dim < keys.shape[-1]:
            moved = torch.cat((moved, keys[..., self.rot_dim :].float()), dim=-1)
        return moved.to(keys.dtype)

    def rotate_positions(self, keys: torch.Tensor, start: int, sign: int = 1) -> torch.Tensor:
        """Rotate un-rotated keys to positions start, start+1, … (sign=-1 undoes that rotation)."""
        n = keys.shape[-2]
        if n == 0 or self.rot_dim == 0:
            return keys
        positions = torch.arange(start, start + n, dtype=torch.float64)
        angles = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        cos = emb.cos().to(keys.device, torch.float32)
        sin = (sign * emb.sin()).to(keys.device, torch.float32)
        rot = keys[..., : self.rot_dim].float()
        moved = rot * cos + _rotate_half(rot) * sin
        if self.rot_dim < keys.shape[-1]:
            moved = torch.cat((moved, keys[..., self.rot_dim :].float()), dim=-1)
        return moved.to(keys.dtype)


def evict_batch_for(window: int) -> int:
    return max(1, window // 16)


class SinkLayer(GrowingLayer):
    """One layer of a sink cache: sinks + recent window, keys stored rotated for their slot.

    Its length in the conversation is `fed` (tokens ever fed in), of which `evicted` are gone;
    `crop_to(n)` counts in those conversation tokens.
    """

    def __init__(self, sink_tokens: int, window: int, rotator: RopeRotator) -> None:
        super().__init__()
        self.sink_tokens = sink_tokens
        self.window = window
        self.evict_batch = evict_batch_for(window)
        self.rotator = rotator
        self.fed = 0  # tokens ever fed into this layer
        self.evicted = 0  # tokens dropped from the middle

    @property
    def capacity(self) -> int:
        return self.sink_tokens + self.window

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states)
        self.fed += key_states.shape[-2]
        stored = keys.shape[-2]
        if stored > self.capacity:
            # Evict down to capacity - evict_batch (at least the overflow), keeping the sinks.
            keep_recent = max(self.window - self.evict_batch, 0)
            drop = stored - self.sink_tokens - keep_recent
            recent_k = self.rotator.shift(keys[..., self.sink_tokens + drop :, :], -drop)
            self.keys = torch.cat((keys[..., : self.sink_tokens, :], recent_k), dim=-2)
            self.values = torch.cat((values[..., : self.sink_tokens, :], values[..., self.sink_tokens + drop :, :]),
                                    dim=-2)
            self.evicted += drop
        # This forward pass attends to everything, evicted tokens included, at the positions
        # they were fed with; the eviction only affects later passes.
        return keys, values

    def advance(self, new: int) -> None:
        """Count `new` tokens a replayed decode graph wrote past the content (never an evicting step)."""
        super().advance(new)
        self.fed += new

    def full_kv(self) -> KV | None:
        """Everything stored, in full precision, keys rotated for slots 0..n-1."""
        if not self.is_initialized or self.get_seq_length() == 0:
            return None
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def rewindable(self, new_tokens: int) -> bool:
        """No eviction inside the pass: the layer still holds everything it will be fed."""
        return self.get_seq_length() + new_tokens <= self.capacity

    def can_crop_to(self, length: int) -> bool:
        """Whether the tokens fed after the first `length` are all still in the kept recent part."""
        return 0 <= self.fed - length <= self.removable()

    def crop_to(self, length: int) -> bool:
        """Stand for the first `length` tokens fed again (see `can_crop_to`)."""
        if not self.can_crop_to(length):
            return False
        self.crop_stream(self.fed - length)
        return True

    def layout(self) -> tuple[int, ...]:
        """What every layer of a healthy cache agrees on besides its length: the tokens evicted."""
        return (self.evicted,)

    def removable(self) -> int:
        """How many of the most recent tokens can be cropped away without losing the stream's order."""
        stored = self.get_seq_length()
        return stored if self.evicted == 0 else max(stored - self.sink_tokens, 0)

    def crop_stream(self, remove: int) -> None:
        if remove:
            self.crop(-remove)
            self.fed -= remove

    def reset(self) -> None:
        super().reset()
        self.fed = 0
        self.evicted = 0


class QuantizedSinkLayer(SinkLayer):
    """Sinks and a recent residual in full precision; the rest of the window as quantized blocks.

    Blocks hold un-rotated keys, so they are quantized once and only rotated (never
    re-quantized) when evictions shift them. Eviction drops whole oldest blocks.
    """

    keys: torch.Tensor  # the full-precision residual (set on the first update)
    values: torch.Tensor

    def __init__(self, sink_tokens: int, window: int, rotator: RopeRotator, quantizer: Quantizer, block: int,
                 axis_key: int, axis_value: int) -> None:
        super().__init__(sink_tokens, window, rotator)
        self.quantizer = quantizer
        self.axis_key, self.axis_value = axis_key, axis_value
        self.block = block
        # Each block: (quantized un-rotated keys, quantized values, length).
        self.blocks: list[tuple[Any, Any, int]] = []
        self.sink_k = torch.empty(0)  # rotated for slots 0..sink-1 (they never move)
        self.sink_v = torch.empty(0)

    def _block_tokens(self) -> int:
        return sum(n for _, _, n in self.blocks)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_k.shape[-2] + self._block_tokens() + self.keys.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
            self.sink_k, self.sink_v = self.keys, self.values
        self.fed += key_states.shape[-2]
        # Fill the sinks first.
        room = self.sink_tokens - self.sink_k.shape[-2]
        if room > 0:
            self.sink_k = torch.cat((self.sink_k, key_states[..., :room, :]), dim=-2)
            self.sink_v = torch.cat((self.sink_v, value_states[..., :room, :]), dim=-2)
            key_states, value_states = key_states[..., room:, :], value_states[..., room:, :]
        n_sink = self.sink_k.shape[-2]
        n_blocks = self._block_tokens()
        # Full-precision view of the window for this forward pass, at the current slots.
        stored_k, stored_v = self._stored_kv()
        keys = torch.cat((stored_k, key_states), dim=-2)
        values = torch.cat((stored_v, value_states), dim=-2)

        # New state: residual grows; full blocks of the residual are quantized (un-rotated).
        residual_k = torch.cat((self.keys, key_states), dim=-2)
        residual_v = torch.cat((self.values, value_states), dim=-2)
        start = n_sink + n_blocks  # slot of the residual's first token
        while residual_k.shape[-2] > self.block:
            bk = self.rotator.rotate_positions(residual_k[..., : self.block, :], start, sign=-1)
            bv = residual_v[..., : self.block, :]
            self.blocks.append((self.quantizer.quantize(bk, self.axis_key),
                                self.quantizer.quantize(bv, self.axis_value), self.block))
            residual_k, residual_v = residual_k[..., self.block :, :], residual_v[..., self.block :, :]
            start += self.block
        # Evict whole oldest blocks while the window overflows.
        drop = 0
        while self.blocks and self._block_tokens() + residual_k.shape[-2] > self.window:
            drop += self.blocks.pop(0)[2]
        if drop:
            residual_k = self.rotator.shift(residual_k, -drop)
            self.evicted += drop
        self.keys, self.values = residual_k, residual_v
        return keys, values

    def full_kv(self) -> KV | None:
        if not self.is_initialized or self.get_seq_length() == 0:
            return None
        return self._stored_kv()

    def _stored_kv(self) -> KV:
        """Sinks, de-quantized blocks rotated to their slots, and the residual, in slot order."""
        parts_k = [self.sink_k]
        parts_v = [self.sink_v]
        pos = self.sink_k.shape[-2]
        for qk, qv, n in self.blocks:
            parts_k.append(self.rotator.rotate_positions(self.quantizer.dequantize(qk), pos))
            parts_v.append(self.quantizer.dequantize(qv))
            pos += n
        parts_k.append(self.keys)
        parts_v.append(self.values)
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    def layout(self) -> tuple[int, ...]:
        return (self.evicted, len(self.blocks))

    def rewindable(self, new_tokens: int) -> bool:
        """No block quantized (so nothing evicted) inside the pass: the residual takes them all."""
        residual = self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0
        return residual + new_tokens <= self.block

    def removable(self) -> int:
        """The residual and every quantized block can be taken back (a block goes back into the residual,
        de-quantized as attention read it); the sinks too while nothing was evicted."""
        if not self.is_initialized:
            return 0
        if self.evicted == 0:
            return self.get_seq_length()
        return self.keys.shape[-2] + self._block_tokens()

    def crop_stream(self, remove: int) -> None:
        if not remove:
            return
        while remove > self.keys.shape[-2] and self.blocks:
            qk, qv, _n = self.blocks.pop()
            slot = self.sink_k.shape[-2] + self._block_tokens()  # the popped block's first slot
            keys = self.rotator.rotate_positions(self.quantizer.dequantize(qk), slot).to(self.keys.dtype)
            values = self.quantizer.dequantize(qv).to(self.values.dtype)
            self.keys = torch.cat((keys, self.keys), dim=-2)
            self.values = torch.cat((values, self.values), dim=-2)
        residual = self.keys.shape[-2]
        if remove <= residual:
            self.keys = self.keys[..., : residual - remove, :]
            self.values = self.values[..., : residual - remove, :]
        else:  # every block is back in the residual and nothing was evicted: crop into the sinks
            keep = self.sink_k.shape[-2] - (remove - residual)
            self.keys = self.keys[..., :0, :]
            self.values = self.values[..., :0, :]
            self.sink_k, self.sink_v = self.sink_k[..., :keep, :], self.sink_v[..., :keep, :]
        self.fed -= remove

    def nbytes(self) -> int:
        total = super().nbytes()
        if self.is_initialized:
            total += tensor_nbytes(self.sink_k) + tensor_nbytes(self.sink_v)
        for qk, qv, _ in self.blocks:
            total += self.quantizer.nbytes(qk) + self.quantizer.nbytes(qv)
        return total

    def to(self, device: torch.device, pin_memory: bool = False) -> None:
        super().to(device, pin_memory)
        self.sink_k = move_tensor(self.sink_k, device, pin_memory)
        self.sink_v = move_tensor(self.sink_v, device, pin_memory)
        move = self.quantizer.to
        self.blocks = [(move(qk, device, pin_memory), move(qv, device, pin_memory), n) for qk, qv, n in self.blocks]

    def reset(self) -> None:
        super().reset()
        self.blocks = []
        self.sink_k = self.sink_v = torch.empty(0)


class SinkWindowLayer(WindowLayer):
    """A model's own sliding-window layer inside a sink cache: its window is kept as it is (the last
    `sliding_window - 1` tokens of the conversation, what the model's own layer would see), but it is
    numbered with the slots. When the full-attention layers evict `d` tokens, the positions of
    everything after them drop by `d`; this layer's keys are re-rotated by -d and its slot count
    (`cumulative_length`: the slot the next token gets) lowered by d, so that new queries (at slot
    positions) see them at their true distance.

    The trap: a model's window can be longer than the tokens the sink layers keep (Gemma 3's 1,024
    against a window of 64). Then this layer holds more tokens than there are slots, the oldest of
    them before slot 0, and transformers' sliding layer, which sizes the attention mask from
    `cumulative_length` alone, would announce fewer keys than `update` returns. `get_mask_sizes`
    therefore counts the keys really held and starts them at a negative offset where they reach
    back past slot 0 (the mask functions compare positions, which may be negative; RoPE rotates by
    any angle). `renumbered` counts the slots it moved back by, so that `fed` (conversation tokens)
    tells whether it ever slid, which is what decides if it can be cut back.
    """

    def __init__(self, sliding_window: int, rotator: RopeRotator) -> None:
        super().__init__(sliding_window=sliding_window)
        self.rotator = rotator
        self.renumbered = 0  # slots moved back by the full-attention layers' evictions

    def held(self) -> int:
        """Tokens whose keys and values this layer holds (up to `sliding_window - 1`)."""
        return 0 if not self.is_initialized or self.keys is None else int(self.keys.shape[-2])

    @property
    def fed(self) -> int:
        """Conversation tokens this layer was fed (and not cropped away)."""
        return int(self.cumulative_length) + self.renumbered

    def _holds_everything(self) -> bool:
        """Nothing ever slid out of the window: every token fed is still here."""
        return self.held() == self.fed

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys this pass attends to, position of the first): the keys held, ending at the last slot."""
        held = self.held()
        return held + query_length, int(self.cumulative_length) - held

    def renumber(self, drop: int) -> None:
        """The full-attention layers evicted `drop` tokens before everything this layer holds."""
        if drop <= 0 or not self.is_initialized or self.keys is None:
            return
        self.keys = self.rotator.shift(self.keys, -drop)
        self.cumulative_length -= drop
        self.renumbered += drop

    def can_crop_to(self, length: int) -> bool:
        """Whether `crop_to(length)` would succeed: back to an earlier slot only while the window never slid
        (a token that slid out cannot come back)."""
        current = int(self.cumulative_length)
        if length < 0 or length > current:
            return False
        return length == current or (self._holds_everything() and current - length <= self.held())

    def crop_to(self, length: int) -> bool:
        """Keep what stands for the first `length` slots (see `can_crop_to`): the newest keys are dropped."""
        if not self.can_crop_to(length):
            return False
        remove = int(self.cumulative_length) - length
        if remove == 0:
            return True
        assert self.keys is not None and self.values is not None
        keep = self.held() - remove
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
        self.cumulative_length = length
        return True

    def rewindable(self, new_tokens: int) -> bool:
        """Nothing slides out of the window inside the pass."""
        return self._holds_everything() and self.held() + new_tokens <= self.sliding_window - 1

    def full_kv(self) -> KV | None:
        """The window, when it holds exactly the slots 0..n-1 (never renumbered, never slid); else None."""
        if self.renumbered or not self._holds_everything() or self.held() == 0:
            return None
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.renumbered = 0


class SinkCache(KVCache):
    """A cache of attention sinks + a recent window, for every full-attention layer of the model.

    A model's own sliding-window layers keep their window (`SinkWindowLayer`), state-space layers
    their states. `crop_to(n)` counts in tokens fed (the conversation's token stream), not tokens
    stored: it succeeds when the tokens to remove are all still in the kept recent window.
    """

    def __init__(self, config: Any, spec: CacheSpec) -> None:
        from engine.caches.dynamic import layers_for

        shape = KVShape.of(config)
        self.spec = spec
        reach = spec.sink_tokens + spec.window  # the highest slot, for RoPE variants that depend on length
        if spec.strategy == "sink-quantized":
            block = quantized_block(spec, shape.head_dim)
            if block > spec.window:
                raise CacheConfigError(
                    f"the window ({spec.window}) is smaller than one quantized block ({block} tokens: the residual "
                    f"rounded up to whole groups of {spec.q_group_size}); make the window larger."
                )
            quantizer = make_quantizer(spec)

            def full(idx: int) -> SinkLayer:
                return QuantizedSinkLayer(spec.sink_tokens, spec.window, RopeRotator.for_layer(config, idx, reach),
                                          quantizer, block, spec.axis_key, spec.axis_value)
        else:
            def full(idx: int) -> SinkLayer:
                return SinkLayer(spec.sink_tokens, spec.window, RopeRotator.for_layer(config, idx, reach))

        def window(idx: int, size: int) -> SinkWindowLayer:
            return SinkWindowLayer(size, RopeRotator.for_layer(config, idx, reach))

        super().__init__(layers=layers_for(config, full=full, window=window))
        self._renumbered = 0  # evictions the window layers have followed

    @property
    def sink_layers(self) -> list[SinkLayer]:
        return [layer for layer in self.layers if isinstance(layer, SinkLayer)]

    @property
    def window_layers(self) -> list[SinkWindowLayer]:
        return [layer for layer in self.layers if isinstance(layer, SinkWindowLayer)]

    @property
    def fed(self) -> int:
        layers = self.sink_layers
        return layers[0].fed if layers else int(self.get_seq_length())

    @property
    def evicted(self) -> int:
        layers = self.sink_layers
        return layers[0].evicted if layers else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' update; after the model's last attention layer, the window layers follow what the
        full-attention layers evicted in this pass (they used the old numbering until then)."""
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self._last_attention_layer():
            self._renumber_windows()
        return out

    def _last_attention_layer(self) -> int:
        return max(i for i, layer in enumerate(self.layers) if isinstance(layer, KVLayer))

    def _renumber_windows(self) -> None:
        drop = self.evicted - self._renumbered
        if drop:
            for layer in self.window_layers:
                layer.renumber(drop)
            self._renumbered = self.evicted

    def crop_to(self, length: int) -> bool:
        """False (and nothing changed) when the stream cannot be cut there — or when the layers disagree on
        what they evicted (a forward pass that failed after some layers had evicted): the caller then
        recomputes instead of attending at mismatched positions. A hybrid model's state-space states cannot
        be cut at all (the caller recomputes).

        Every window layer is brought to the slot count the sink layers are left with (`length` minus what
        was evicted), each from its own length: after a pass that failed midway, the window layers before
        the failing one hold its tokens and the later ones do not, so cutting them all by one amount would
        leave them disagreeing (and every later pass failing on the mask)."""
        layers = self.sink_layers
        if len({layer.layout() for layer in layers}) > 1 or self._renumbered != self.evicted:
            return False
        if not all(layer.can_crop_to(length) for layer in layers):
            return False
        slots = length - self.evicted
        windows = self.window_layers
        if slots < 0 or not all(layer.can_crop_to(slots) for layer in windows):
            return False  # a window layer that has slid cannot be cut back (checked before anything is cut)
        if self._holds_state() and (self.fed != length or any(layer.get_seq_length() != slots for layer in windows)):
            return False
        for window in windows:
            window.crop_to(slots)
        for layer in layers:
            layer.crop_to(length)
        return len({layer.get_seq_length() for layer in layers}) <= 1

    def checkpoint(self) -> None:
        """Nothing: a sink cache's state-space states are not checkpointed (its lengths move with evictions)."""

    def restore_point(self, length: int) -> int:
        return length if not self._holds_state() or length == self.fed else 0

    def adopt_stream(self, stream_length: int) -> None:
        """The window just fed in stands for `stream_length` conversation tokens: count the rest as evicted."""
        for layer in self.sink_layers:
            layer.evicted += stream_length - layer.fed
            layer.fed = stream_length
        self._renumbered = self.evicted


def build(config: Any, spec: CacheSpec, device: torch.device | None = None) -> SinkCache:
    return SinkCache(config, spec)


def quantized_block(spec: CacheSpec, head_dim: int) -> int:
    """Tokens per quantized block of a sink-quantized window: the residual, rounded up so that no
    quantization group straddles two blocks (and at least one token)."""
    from engine.caches.quantized import spec_quantum

    quantum = spec_quantum(spec, head_dim)
    return max(1, math.ceil(spec.residual / quantum)) * quantum


def bytes_for(tokens: int, config: Any, spec: CacheSpec, dtype: torch.dtype = torch.float32) -> int:
    """Bytes held after `tokens` tokens: never more than sinks + window, whatever the length.

    For sink-quantized this follows `QuantizedSinkLayer` exactly: after the sinks, the residual
    holds 1..block tokens in full precision, every earlier full block is quantized on its own, and
    the oldest blocks are dropped while blocks + residual exceed the window. That is the
    memory of a chat fed `tokens` tokens; after an edit cropped its recent tokens it holds less
    until it has grown again (what is really held is always `cache_bytes`, which the UI shows).
    """
    shape = KVShape.of(config)
    per_token = shape.bytes_per_token(dtype) // shape.layers  # one full-attention layer's K and V
    return layered_bytes(config, dtype, _full_layer_bytes(tokens, shape, spec, dtype, per_token), tokens)


def _full_layer_bytes(tokens: int, shape: KVShape, spec: CacheSpec, dtype: torch.dtype, per_token: int) -> int:
    """What one full-attention layer of a sink cache holds after `tokens` tokens (see `bytes_for`)."""
    if spec.strategy != "sink-quantized":
        return min(tokens, spec.sink_tokens + spec.window) * per_token
    sinks = min(tokens, spec.sink_tokens)
    rest = tokens - sinks
    if rest <= 0:
        return sinks * per_token
    block = quantized_block(spec, shape.head_dim)
    blocks = (rest - 1) // block
    residual = rest - blocks * block
    kept = min(blocks, max(0, (spec.window - residual) // block))
    size = dtype_size(dtype)
    elements = block * shape.kv_heads * shape.head_dim
    per_block = (estimate_bytes(spec, elements, spec.axis_key, size)
                 + estimate_bytes(spec, elements, spec.axis_value, size))
    return (sinks + residual) * per_token + kept * per_block
