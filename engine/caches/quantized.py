"""A KV cache stored in 4 or 2 bits (optimum-quanto), keeping the most recent tokens in full precision.

This is KIVI's scheme (arXiv 2402.02750) on top of transformers' `QuantoQuantizedLayer`: keys and
values are quantized in groups of `q_group_size`, keys along `axis_key` and values along
`axis_value` (0: groups run along a token's head vector, "per token"; -1: groups run over
`q_group_size` consecutive tokens of one channel, "per channel"), and at least the `residual`
most recent tokens stay in full precision.

What differs from transformers' own `QuantizedLayer` (and why):

* The quantized part always holds a whole number of "flush blocks" of tokens, chosen so that no
  quantization group straddles two heads or a block edge, and exactly
  `quantized_tokens(n) = ⌊max(0, n − residual) / block⌋ · block` of the `n` cached tokens are
  quantized whatever the chunking. transformers quantizes every prefill in full, and with a
  per-channel axis it fails as soon as a length is not a multiple of the group size, which a chat
  hits on its first turn. Because the split depends only on `n`, `bytes_for` is exact.
* `crop_to` works anywhere: within the residual it slices; into the quantized part it
  dequantizes, cuts and re-quantizes. Re-quantizing dequantized data with the same groups
  reproduces the same integers (checked in the tests), so a crop loses nothing more.
* Dequantization unpacks the bits with plain torch ops instead of quanto's C++ kernel. That
  kernel is compiled on first use (33 s to 2 min on a 2-core CPU, and it needs a C++ compiler),
  and it is no faster than torch here. The build is cached in
  `site-packages/optimum/quanto/library/extensions/cpp/build/` (keyed by the torch version, so a
  second process pays ~0 s), but an installed app may have no compiler and a read-only
  site-packages. This cache never triggers it.

What is still slow: importing optimum-quanto (~3 s) and, as in transformers, dequantizing the
whole history at every forward pass (memory is traded for time). `warm_up()` pays the import once,
off the UI thread.

With `backend="hqq"` the layers quantize with HQQ's optimiser instead (engine/caches/hqq_blocks.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import torch
from transformers.cache_utils import Cache, QuantoQuantizedLayer, get_layer_types_and_kwargs

from engine.caches import CacheConfigError
from engine.caches.shape import KVShape

# Quantized blocks are at least this many tokens: re-quantizing the history on every new token
# would cost O(n) per step.
MIN_FLUSH_BLOCK = 64


def default_spec(nbits: int) -> dict[str, Any]:
    """The quantization settings chosen by measurement for `nbits` (scripts/measure_fidelity.py,
    SmolLM2-135M, resources/texts/alice.txt, chunks of 64, CPU fp32).

    4-bit: KIVI's axes (keys per channel, values per token), group 64, residual 128: perplexity
    +0.2% at 2,048 tokens, +0.4% at 4,000, with 19% of the full cache's bytes at 4,000 tokens.
    2-bit: searched over axes (at group 64, residual 128: per-token keys ×4.9–6.4, per-channel
    keys and values ×2.5, per-channel keys / per-token values ×1.36), then group × residual on
    the best axes. Group 32 is clearly best (g64 ×1.27–1.40, g128 ×1.62–1.79). Residual 256 gains
    2% (×1.12) over 128 (×1.14) but then holds more bytes than 4-bit at 2,048 tokens, which is
    never worth it; residual 128 costs +14% perplexity for 18% of the full cache at 2,048 tokens
    (16% at 4,000).
    """
    if nbits == 4:
        return {"nbits": 4, "q_group_size": 64, "residual": 128, "axis_key": -1, "axis_value": 0}
    if nbits == 2:
        return {"nbits": 2, "q_group_size": 32, "residual": 128, "axis_key": -1, "axis_value": 0}
    raise CacheConfigError(f"quantized caches store 2 or 4 bits, not {nbits}.")


def token_quantum(axis: int, group_size: int, head_dim: int) -> int:
    """The fewest tokens whose quantization groups do not straddle a head: a block is a multiple of it."""
    if axis == -1:  # groups of `group_size` consecutive tokens of one channel
        return group_size
    return group_size // math.gcd(group_size, head_dim)  # groups of consecutive elements of a head's rows


def flush_block(spec: Any, head_dim: int) -> int:
    """Tokens move from the full-precision residual to the quantized part in multiples of this."""
    quantum = math.lcm(
        token_quantum(spec.axis_key, spec.q_group_size, head_dim),
        token_quantum(spec.axis_value, spec.q_group_size, head_dim),
    )
    return math.lcm(quantum, MIN_FLUSH_BLOCK)


def quantized_tokens(tokens: int, residual: int, block: int) -> int:
    """How many of `tokens` cached tokens are held quantized (the rest are the residual)."""
    return max(0, tokens - residual) // block * block


def _unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """quanto's bit layout: packed row i holds rows i, i + R, i + 2R, ... in successive bit fields."""
    mask = (1 << bits) - 1
    fields = [(packed >> (bits * i)) & mask for i in range(8 // bits)]
    return torch.cat(fields)[:rows]


class QuantizedKVLayer(QuantoQuantizedLayer):
    """One layer's keys and values: a quanto-quantized prefix plus a full-precision residual.

    `self.keys` / `self.values` hold the residual, `_quantized_keys` / `_quantized_values` the
    quantized prefix of `_quantized_length` tokens (both None when it is empty).
    """

    def __init__(self, nbits: int = 4, axis_key: int = -1, axis_value: int = 0, q_group_size: int = 64,
                 residual_length: int = 128, block: int = MIN_FLUSH_BLOCK) -> None:
        super().__init__(nbits=nbits, axis_key=axis_key, axis_value=axis_value, q_group_size=q_group_size,
                         residual_length=residual_length)
        self.block = block
        self._quantized_length = 0

    # ----- quantization ------------------------------------------------------------------------
    def _dequantize(self, qtensor: Any) -> torch.Tensor:
        from optimum.quanto.tensor.grouped import ungroup

        rows = qtensor._data.shape[0]
        data = _unpack(qtensor._data._data, qtensor.qtype.bits, rows)
        values = qtensor._scale * data - qtensor._shift  # quanto's affine scheme with a float shift
        return ungroup(values, axis=qtensor.axis, orig_shape=qtensor.shape)

    def _quantize_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        length = keys.shape[-2]
        if length == 0:
            self._quantized_keys = self._quantized_values = None
        else:
            self._quantized_keys = self._quantize(keys.contiguous(), axis=self.axis_key)
            self._quantized_values = self._quantize(values.contiguous(), axis=self.axis_value)
        self._quantized_length = length

    def _dequantized_prefix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._quantized_keys is None:
            return None
        return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

    # ----- the layer API ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        recent_keys = torch.cat([self.keys, key_states], dim=-2)
        recent_values = torch.cat([self.values, value_states], dim=-2)
        prefix = self._dequantized_prefix()
        if prefix is None:
            all_keys, all_values = recent_keys, recent_values
        else:
            all_keys = torch.cat([prefix[0], recent_keys], dim=-2)
            all_values = torch.cat([prefix[1], recent_values], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        target = quantized_tokens(self.cumulative_length, self.residual_length, self.block)
        if target > self._quantized_length:
            # The old prefix is re-quantized from its dequantized values: the same integers come back.
            moved = target - self._quantized_length
            self._quantize_prefix(all_keys[..., :target, :], all_values[..., :target, :])
            self.keys = recent_keys[..., moved:, :].clone()
            self.values = recent_values[..., moved:, :].clone()
        else:
            self.keys, self.values = recent_keys, recent_values
        return all_keys, all_values

    def get_seq_length(self) -> int:
        return int(self.cumulative_length)

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token's keys and values in full precision (the quantized part dequantized)."""
        assert self.keys is not None and self.values is not None
        prefix = self._dequantized_prefix()
        if prefix is None:
            return self.keys, self.values
        return torch.cat([prefix[0], self.keys], dim=-2), torch.cat([prefix[1], self.values], dim=-2)

    def crop_to(self, length: int) -> bool:
        """Keep the first `length` tokens; False (and nothing changed) when fewer are cached."""
        if length < 0 or length > self.cumulative_length:
            return False
        if length == self.cumulative_length or not self.is_initialized:
            return True
        assert self.keys is not None and self.values is not None
        target = quantized_tokens(length, self.residual_length, self.block)
        if target == self._quantized_length:
            keep = length - target
            self.keys = self.keys[..., :keep, :].clone()
            self.values = self.values[..., :keep, :].clone()
        else:  # the cut reaches into the quantized part, or leaves fewer tokens to quantize
            prefix = self._dequantized_prefix()
            assert prefix is not None
            keys = torch.cat([prefix[0], self.keys], dim=-2)[..., :length, :]
            values = torch.cat([prefix[1], self.values], dim=-2)[..., :length, :]
            self._quantize_prefix(keys[..., :target, :], values[..., :target, :])
            self.keys = keys[..., target:, :].clone()
            self.values = values[..., target:, :].clone()
        self.cumulative_length = length
        return True

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove.")
        self.crop_to(self.cumulative_length + tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self._quantized_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        assert self.keys is not None and self.values is not None
        prefix = self._dequantized_prefix()
        if prefix is not None:
            index = beam_idx.to(prefix[0].device)
            self._quantize_prefix(prefix[0].index_select(0, index), prefix[1].index_select(0, index))
        index = beam_idx.to(self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("The quantized cache holds one conversation (batch size 1).")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("The quantized cache holds one conversation (batch size 1).")

    def quantized_nbytes(self, q: Any) -> int:
        """Bytes of one quantized tensor made by `_quantize`: packed integers, scales and shifts."""
        packed = q._data._data
        return int(packed.numel() * packed.element_size() + q._scale.numel() * q._scale.element_size()
                   + q._shift.numel() * q._shift.element_size())

    def nbytes(self) -> int:
        """Bytes really held: the quantized prefix and the full-precision residual."""
        total = sum(self.quantized_nbytes(q) for q in (self._quantized_keys, self._quantized_values) if q is not None)
        for t in (self.keys, self.values):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


class HQQKVLayer(QuantizedKVLayer):
    """The same layer with HQQ's solver (engine/caches/hqq_blocks.py) instead of quanto's min/max.

    Its quantized prefix is appended to and cut without re-quantizing anything (HQQ's optimised
    scales would not reproduce the same integers from de-quantized values, unlike quanto's).
    """

    def _quantize(self, tensor: torch.Tensor, axis: int) -> Any:  # type: ignore[override]  # as quanto's
        from engine.caches import hqq_blocks

        return hqq_blocks.quantize(tensor, axis, self.nbits, self.q_group_size)

    def _dequantize(self, qtensor: Any) -> torch.Tensor:
        return cast(torch.Tensor, qtensor.dequantize())

    def _quantize_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store `keys`/`values` (whose first `_quantized_length` tokens are the stored prefix, de-quantized)."""
        length, held = keys.shape[-2], self._quantized_length
        stored_keys, stored_values = self._quantized_keys, self._quantized_values
        if length == 0:
            self._quantized_keys = self._quantized_values = None
        elif stored_keys is None or stored_values is None or held == 0:
            self._quantized_keys = self._quantize(keys.contiguous(), self.axis_key)
            self._quantized_values = self._quantize(values.contiguous(), self.axis_value)
        elif length <= held:
            self._quantized_keys = stored_keys.head(length)
            self._quantized_values = stored_values.head(length)
        else:
            self._quantized_keys = stored_keys.cat(self._quantize(keys[..., held:, :].contiguous(), self.axis_key))
            self._quantized_values = stored_values.cat(
                self._quantize(values[..., held:, :].contiguous(), self.axis_value))
        self._quantized_length = length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        assert self.keys is not None and self.values is not None
        stored_keys, stored_values = self._quantized_keys, self._quantized_values
        if stored_keys is not None and stored_values is not None:
            index = beam_idx.to(stored_keys.packed.device)
            self._quantized_keys = stored_keys.map(lambda t: t.index_select(0, index))
            self._quantized_values = stored_values.map(lambda t: t.index_select(0, index))
        index = beam_idx.to(self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)

    def quantized_nbytes(self, q: Any) -> int:
        return int(q.nbytes())


def make_layer(spec: Any, residual: int, block: int) -> QuantizedKVLayer:
    """A quantized layer for `spec`'s backend (quanto or HQQ)."""
    kind = HQQKVLayer if spec.backend == "hqq" else QuantizedKVLayer
    return kind(spec.nbits, spec.axis_key, spec.axis_value, spec.q_group_size, residual, block)


class QuantizedKVCache(Cache):
    """A conversation's KV cache in `nbits` bits, with `crop_to` and exact `nbytes` (see the module doc)."""

    def __init__(self, config: Any, nbits: int = 4, axis_key: int = -1, axis_value: int = 0,
                 q_group_size: int = 64, residual: int = 128, backend: str = "quanto") -> None:
        text = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(text)
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise CacheConfigError(
                f"The quantized cache needs a model whose layers all use full attention; this one also has {other}."
            )
        shape = KVShape.of(config)
        self.nbits, self.q_group_size, self.residual = nbits, q_group_size, residual
        self.axis_key, self.axis_value, self.backend = axis_key, axis_value, backend
        self.block = flush_block(self, shape.head_dim)
        layers: list[Any] = [make_layer(self, residual, self.block) for _ in range(shape.layers)]
        super().__init__(layers=layers)

    @property
    def kv_layers(self) -> list[QuantizedKVLayer]:
        return cast(list[QuantizedKVLayer], self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.kv_layers)

    def crop_to(self, length: int) -> bool:
        """Crop every layer to `length` tokens (False when a layer holds fewer).

        Each layer is cropped on its own, so this also repairs a cache that a failed forward pass
        left with some layers one chunk longer than others.
        """
        if any(layer.get_seq_length() < length for layer in self.kv_layers):
            return False
        return all(layer.crop_to(length) for layer in self.kv_layers)


def _check_backend(spec: Any) -> None:
    from engine.caches import backend_availability

    available = backend_availability()
    if spec.backend not in available:
        raise CacheConfigError(f"Unknown quantization backend {spec.backend!r}; choose quanto or hqq.")
    # quanto is needed either way: the layers build on transformers' QuantoQuantizedLayer.
    for name in dict.fromkeys(("quanto", spec.backend)):
        if available[name] is not None:
            raise CacheConfigError(cast(str, available[name]))


def build(config: Any, spec: Any) -> QuantizedKVCache:
    _check_backend(spec)
    shape = KVShape.of(config)
    for axis in (spec.axis_key, spec.axis_value):
        if axis == 0 and (spec.q_group_size > shape.head_dim and spec.q_group_size % shape.head_dim):
            raise CacheConfigError(
                f"group size {spec.q_group_size} does not fit this model's head size {shape.head_dim}."
            )
    return QuantizedKVCache(config, nbits=spec.nbits, axis_key=spec.axis_key, axis_value=spec.axis_value,
                            q_group_size=spec.q_group_size, residual=spec.residual, backend=spec.backend)


def _quantized_bytes(elements: int, spec: Any, axis: int, size: int) -> int:
    """Bytes of one quantized tensor of `elements` values: packed integers plus a scale and a shift per group."""
    if spec.backend == "hqq":
        from engine.caches.hqq_blocks import block_bytes

        return block_bytes(elements, spec.nbits, spec.q_group_size, size)
    groups = elements // spec.q_group_size
    per_byte = 8 // spec.nbits
    # quanto packs the rows of the grouped tensor: (groups, group size) on axis 0, (group size, groups) on -1
    if axis == 0:
        packed = math.ceil(groups / per_byte) * spec.q_group_size
    else:
        packed = math.ceil(spec.q_group_size / per_byte) * groups
    return packed + 2 * groups * size


def bytes_for(tokens: int, config: Any, spec: Any, dtype: torch.dtype = torch.float32) -> int:
    """Exact bytes a quantized cache holds after `tokens` tokens (see `QuantizedKVLayer.nbytes`)."""
    shape = KVShape.of(config)
    size = torch.empty((), dtype=dtype).element_size()
    quantized = quantized_tokens(tokens, spec.residual, flush_block(spec, shape.head_dim))
    per_token = shape.kv_heads * shape.head_dim  # elements of K, or of V, for one token of one layer
    per_layer = 2 * (tokens - quantized) * per_token * size
    if quantized:
        per_layer += _quantized_bytes(quantized * per_token, spec, spec.axis_key, size)
        per_layer += _quantized_bytes(quantized * per_token, spec, spec.axis_value, size)
    return shape.layers * per_layer


_warm_lock = threading.Lock()
_warmed: set[str] = set()


def warm_up(backend: str = "quanto", progress: Callable[[str], None] | None = None) -> float:
    """Import the quantization library of `backend` and quantize/de-quantize once, so that a chat's
    first turn does not pay it (importing optimum-quanto takes ~3 s, hqq ~2-5 s on this CPU).

    Idempotent and thread-safe; returns the seconds spent (0.0 once done). No kernel is compiled:
    see the module docstring for quanto's C++ extension and why this cache does not use it.
    """
    with _warm_lock:
        if backend in _warmed:
            return 0.0
        started = time.perf_counter()
        if progress is not None:
            progress(f"Loading the quantization library ({'HQQ' if backend == 'hqq' else 'optimum-quanto'})…")
        from engine.caches import CacheSpec

        layer = make_layer(CacheSpec(strategy="quantized", backend=backend, nbits=4, q_group_size=64), 0, 64)
        sample = torch.randn(1, 1, 64, 64)
        layer.update(sample, sample)
        layer.update(sample[..., :1, :], sample[..., :1, :])
        _warmed.add(backend)
        return time.perf_counter() - started
