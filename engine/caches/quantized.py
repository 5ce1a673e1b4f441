"""A KV cache stored in 4 or 2 bits (optimum-quanto or HQQ), keeping the most recent tokens in full precision.

This is KIVI's scheme (arXiv 2402.02750) on top of transformers' `QuantizedLayer`: keys and
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
  dequantizes, cuts and re-quantizes (quanto: re-quantizing dequantized data with the same groups
  reproduces the same integers, checked in the tests) or cuts the stored blocks (HQQ), so a crop
  loses nothing more.
* The quantization itself is the backend's `Quantizer` (engine/caches/quantizers.py), shared with
  the sink-quantized layers. quanto's C++ unpacking kernel (compiled on first use: 33 s to 2 min
  on a 2-core CPU, and it needs a compiler) is never triggered; see there.

What is still slow: importing optimum-quanto (~3 s) and, as in transformers, dequantizing the
whole history at every forward pass (memory is traded for time). `warm_up()` pays the import once,
off the UI thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import QuantizedLayer

from engine.caches.base import KV, KVCache, KVLayer
from engine.caches.quantizers import Quantizer, estimate_bytes, make_quantizer
from engine.caches.shape import KVShape, dtype_size, layered_bytes
from engine.specs import CacheConfigError, CacheSpec

# Quantized blocks are at least this many tokens: re-quantizing the history on every new token
# would cost O(n) per step.
MIN_FLUSH_BLOCK = 64


def token_quantum(axis: int, group_size: int, head_dim: int) -> int:
    """The fewest tokens whose quantization groups do not straddle a head: a block is a multiple of it."""
    if axis == -1:  # groups of `group_size` consecutive tokens of one channel
        return group_size
    return group_size // math.gcd(group_size, head_dim)  # groups of consecutive elements of a head's rows


def spec_quantum(spec: CacheSpec, head_dim: int) -> int:
    """The fewest tokens that split into whole quantization groups for both keys and values."""
    return math.lcm(token_quantum(spec.axis_key, spec.q_group_size, head_dim),
                    token_quantum(spec.axis_value, spec.q_group_size, head_dim))


def flush_block(spec: CacheSpec, head_dim: int) -> int:
    """Tokens move from the full-precision residual to the quantized part in multiples of this."""
    return math.lcm(spec_quantum(spec, head_dim), MIN_FLUSH_BLOCK)


def quantized_tokens(tokens: int, residual: int, block: int) -> int:
    """How many of `tokens` cached tokens are held quantized (the rest are the residual)."""
    return max(0, tokens - residual) // block * block


class QuantizedKVLayer(KVLayer, QuantizedLayer):
    """One layer's keys and values: a quantized prefix plus a full-precision residual.

    `self.keys` / `self.values` hold the residual, `_quantized_keys` / `_quantized_values` the
    quantized prefix of `_quantized_length` tokens (both None when it is empty), made by `quantizer`.
    """

    def __init__(self, quantizer: Quantizer, axis_key: int = -1, axis_value: int = 0, residual_length: int = 128,
                 block: int = MIN_FLUSH_BLOCK) -> None:
        super().__init__(nbits=quantizer.nbits, axis_key=axis_key, axis_value=axis_value,
                         q_group_size=quantizer.group, residual_length=residual_length)
        self.quantizer = quantizer
        self.block = block
        self._quantized_length = 0

    # ----- quantization (all of it is the backend's) -----------------------------------------------
    def _quantize(self, tensor: torch.Tensor, axis: int) -> Any:  # type: ignore[override]  # as QuantizedLayer's
        return self.quantizer.quantize(tensor, axis)

    def _dequantize(self, q_tensor: Any) -> torch.Tensor:
        return self.quantizer.dequantize(q_tensor)

    def _store_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold `keys`/`values` quantized; their first `_quantized_length` tokens are the stored
        prefix, de-quantized, which an appendable backend keeps as it is instead of re-quantizing."""
        length, held, q = keys.shape[-2], self._quantized_length, self.quantizer
        stored_keys, stored_values = self._quantized_keys, self._quantized_values
        if length == 0:
            self._quantized_keys = self._quantized_values = None
        elif not q.appendable or stored_keys is None or stored_values is None or held == 0:
            self._quantized_keys = q.quantize(keys, self.axis_key)
            self._quantized_values = q.quantize(values, self.axis_value)
        elif length <= held:
            self._quantized_keys, self._quantized_values = q.head(stored_keys, length), q.head(stored_values, length)
        else:
            self._quantized_keys = q.cat(stored_keys, q.quantize(keys[..., held:, :], self.axis_key))
            self._quantized_values = q.cat(stored_values, q.quantize(values[..., held:, :], self.axis_value))
        self._quantized_length = length

    def _dequantized_prefix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._quantized_keys is None or self._quantized_values is None:
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
        target = quantized_tokens(self.cumulative_length + key_states.shape[-2], self.residual_length, self.block)
        if target > self._quantized_length:
            moved = target - self._quantized_length
            self._store_prefix(all_keys[..., :target, :], all_values[..., :target, :])
            self.keys = recent_keys[..., moved:, :].clone()
            self.values = recent_values[..., moved:, :].clone()
        else:
            self.keys, self.values = recent_keys, recent_values
        self.cumulative_length += key_states.shape[-2]
        return all_keys, all_values

    def get_seq_length(self) -> int:
        return int(self.cumulative_length)

    def full_kv(self) -> KV | None:
        """Every cached token's keys and values in full precision (the quantized part dequantized)."""
        if not self.is_initialized or self.cumulative_length == 0:
            return None
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
            everything = self.full_kv()
            assert everything is not None
            keys, values = everything[0][..., :length, :], everything[1][..., :length, :]
            self._store_prefix(keys[..., :target, :], values[..., :target, :])
            self.keys = keys[..., target:, :].clone()
            self.values = values[..., target:, :].clone()
        self.cumulative_length = length
        return True

    def rewindable(self, new_tokens: int) -> bool:
        """Nothing quantized inside the pass: the full-precision residual takes the new tokens."""
        target = quantized_tokens(self.cumulative_length + new_tokens, self.residual_length, self.block)
        return target == self._quantized_length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove.")
        self.crop_to(self.cumulative_length + tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self._quantized_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("The quantized cache holds one conversation (batch size 1).")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("The quantized cache holds one conversation (batch size 1).")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("The quantized cache holds one conversation (batch size 1).")

    def nbytes(self) -> int:
        """Bytes really held: the quantized prefix and the full-precision residual."""
        quantized = (q for q in (self._quantized_keys, self._quantized_values) if q is not None)
        return super().nbytes() + sum(self.quantizer.nbytes(q) for q in quantized)

    def to(self, device: torch.device, pin_memory: bool = False) -> None:
        super().to(device, pin_memory)
        if self._quantized_keys is not None:
            self._quantized_keys = self.quantizer.to(self._quantized_keys, device, pin_memory)
        if self._quantized_values is not None:
            self._quantized_values = self.quantizer.to(self._quantized_values, device, pin_memory)


class QuantizedKVCache(KVCache):
    """A conversation's KV cache in `spec.nbits` bits (see the module docstring)."""

    def __init__(self, config: Any, spec: CacheSpec) -> None:
        from engine.caches.dynamic import layers_for

        shape = KVShape.of(config)
        self.spec = spec
        self.block = flush_block(spec, shape.head_dim)
        quantizer = make_quantizer(spec)
        # Full-attention layers quantized; a model's sliding layers keep their own (short) window in full
        # precision, state-space layers their states: see `layers_for`.
        super().__init__(layers=layers_for(config, full=lambda _: QuantizedKVLayer(
            quantizer, spec.axis_key, spec.axis_value, spec.residual, self.block)))


def build(config: Any, spec: CacheSpec, device: torch.device | None = None) -> QuantizedKVCache:
    shape = KVShape.of(config)
    for axis in (spec.axis_key, spec.axis_value):
        if axis == 0 and (spec.q_group_size > shape.head_dim and spec.q_group_size % shape.head_dim):
            raise CacheConfigError(
                f"group size {spec.q_group_size} does not fit this model's head size {shape.head_dim}."
            )
    return QuantizedKVCache(config, spec)


def bytes_for(tokens: int, config: Any, spec: CacheSpec, dtype: torch.dtype = torch.float32) -> int:
    """Exact bytes a quantized cache holds after `tokens` tokens (see `QuantizedKVLayer.nbytes`)."""
    shape = KVShape.of(config)
    size = dtype_size(dtype)
    quantized = quantized_tokens(tokens, spec.residual, flush_block(spec, shape.head_dim))
    per_token = shape.kv_heads * shape.head_dim  # elements of K, or of V, for one token of one layer
    per_layer = 2 * (tokens - quantized) * per_token * size
    if quantized:
        per_layer += estimate_bytes(spec, quantized * per_token, spec.axis_key, size)
        per_layer += estimate_bytes(spec, quantized * per_token, spec.axis_value, size)
    return layered_bytes(config, dtype, per_layer, tokens)


_warm_lock = threading.Lock()
_warmed: set[str] = set()


def warm_up(backend: str = "quanto", progress: Callable[[str], None] | None = None) -> float:
    """Import the quantization library of `backend` and quantize/de-quantize once, so that a chat's
    first turn does not pay it (importing optimum-quanto takes ~3 s, hqq ~2-5 s on this CPU).

    Idempotent and thread-safe; returns the seconds spent (0.0 once done). No kernel is compiled:
    see engine/caches/quantizers.py for quanto's C++ extension and why this cache does not use it.
    """
    with _warm_lock:
        if backend in _warmed:
            return 0.0
        started = time.perf_counter()
        if progress is not None:
            progress(f"Loading the quantization library ({'HQQ' if backend == 'hqq' else 'optimum-quanto'})…")
        quantizer = make_quantizer(CacheSpec(strategy="quantized", backend=backend, nbits=4, q_group_size=64))
        sample = torch.randn(1, 1, 64, 64)
        for axis in (0, -1):
            quantizer.dequantize(quantizer.quantize(sample, axis))
        _warmed.add(backend)
        return time.perf_counter() - started
