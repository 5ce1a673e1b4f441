"""One quantizer per backend, shared by the quantized and the sink-quantized layers.

A quantizer stores a (batch, heads, tokens, head_dim) tensor in `nbits` bits, in groups of
`group` values along an axis (0: a token's head vector, "per token"; -1: consecutive tokens of
one channel, "per channel"), and gives it back. The layers only call these methods, the way
transformers' quanto and HQQ layers differ only in `_quantize` / `_dequantize`:

    quantize(tensor, axis) -> q     dequantize(q) -> tensor     nbytes(q) -> int
    to(q, device, pin_memory) -> q  estimate_bytes(elements, axis, element_size) -> int (no import)

and, for a backend whose quantized tensors can be cut and appended to along the tokens without
re-quantizing (`appendable`), `head(q, tokens)` and `cat(a, b)`.

* quanto (optimum-quanto): min/max scales. Re-quantizing de-quantized values with the same groups
  gives back the same integers, so a layer may re-quantize its history at any time and loses
  nothing more. De-quantization unpacks the bits with plain torch ops instead of quanto's C++
  kernel, which is compiled on first use (33 s to 2 min on a 2-core CPU, and it needs a compiler)
  and is no faster here.
* HQQ (engine/caches/hqq_blocks.py): scales fitted by a half-quadratic solver; they would not come
  back from de-quantized values, so its blocks are appended to and cut, never re-quantized.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, cast

import torch

from engine.caches.base import move_tensor
from engine.caches.shape import tensor_nbytes
from engine.specs import CacheConfigError, CacheSpec


def _unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """quanto's bit layout: packed row i holds rows i, i + R, i + 2R, ... in successive bit fields."""
    mask = (1 << bits) - 1
    fields = [(packed >> (bits * i)) & mask for i in range(8 // bits)]
    return torch.cat(fields)[:rows]


class Quantizer(ABC):
    """Stores tensors in `nbits` bits in groups of `group` values (see the module docstring)."""

    appendable = False

    def __init__(self, nbits: int, group: int) -> None:
        self.nbits = nbits
        self.group = group

    @abstractmethod
    def quantize(self, tensor: torch.Tensor, axis: int) -> Any: ...

    @abstractmethod
    def dequantize(self, q: Any) -> torch.Tensor: ...

    @abstractmethod
    def nbytes(self, q: Any) -> int: ...

    @abstractmethod
    def to(self, q: Any, device: torch.device, pin_memory: bool = False) -> Any: ...

    @staticmethod
    @abstractmethod
    def estimate_bytes(elements: int, nbits: int, group: int, axis: int, element_size: int) -> int:
        """Bytes of one quantized tensor of `elements` values (exactly what `nbytes` will say)."""

    def head(self, q: Any, tokens: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} re-quantizes instead of cutting")

    def cat(self, a: Any, b: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} re-quantizes instead of appending")


class QuantoQuantizer(Quantizer):
    """optimum-quanto's affine min/max quantization, with our own bit unpacking."""

    def __init__(self, nbits: int, group: int) -> None:
        super().__init__(nbits, group)
        from optimum.quanto import MaxOptimizer, qint2, qint4

        self.qtype = qint4 if nbits == 4 else qint2
        self.optimizer = MaxOptimizer()

    def quantize(self, tensor: torch.Tensor, axis: int) -> Any:
        from optimum.quanto import quantize_weight

        tensor = tensor.contiguous()
        scale, shift = self.optimizer(tensor, self.qtype, axis, self.group)
        return quantize_weight(tensor, self.qtype, axis, scale, shift, self.group)

    def dequantize(self, q: Any) -> torch.Tensor:
        from optimum.quanto.tensor.grouped import ungroup

        rows = q._data.shape[0]
        data = _unpack(q._data._data, q.qtype.bits, rows)
        values = q._scale * data - q._shift  # quanto's affine scheme with a float shift
        return cast(torch.Tensor, ungroup(values, axis=q.axis, orig_shape=q.shape))

    def nbytes(self, q: Any) -> int:
        return tensor_nbytes(q)  # packed integers, scales and shifts

    def to(self, q: Any, device: torch.device, pin_memory: bool = False) -> Any:
        return q.to(device)  # a tensor subclass: its inner tensors move with it (never pinned)

    @staticmethod
    def estimate_bytes(elements: int, nbits: int, group: int, axis: int, element_size: int) -> int:
        groups = elements // group
        per_byte = 8 // nbits
        # quanto packs the rows of the grouped tensor: (groups, group size) on axis 0, (group size, groups) on -1
        packed = math.ceil(groups / per_byte) * group if axis == 0 else math.ceil(group / per_byte) * groups
        return packed + 2 * groups * element_size


class HQQQuantizer(Quantizer):
    """HQQ's solver, packed by engine/caches/hqq_blocks.py so that blocks append and cut."""

    appendable = True

    def __init__(self, nbits: int, group: int) -> None:
        super().__init__(nbits, group)
        import hqq.core.quantize  # noqa: F401  (fail here, with the reason, not in the first forward pass)

    def quantize(self, tensor: torch.Tensor, axis: int) -> Any:
        from engine.caches import hqq_blocks

        return hqq_blocks.quantize(tensor.contiguous(), axis, self.nbits, self.group)

    def dequantize(self, q: Any) -> torch.Tensor:
        return cast(torch.Tensor, q.dequantize())

    def nbytes(self, q: Any) -> int:
        return int(q.nbytes())

    def to(self, q: Any, device: torch.device, pin_memory: bool = False) -> Any:
        return q.map(lambda t: move_tensor(t, device, pin_memory))

    @staticmethod
    def estimate_bytes(elements: int, nbits: int, group: int, axis: int, element_size: int) -> int:
        from engine.caches.hqq_blocks import block_bytes

        return block_bytes(elements, nbits, group, element_size)

    def head(self, q: Any, tokens: int) -> Any:
        return q.head(tokens)

    def cat(self, a: Any, b: Any) -> Any:
        return a.cat(b)


BACKEND_CLASSES: dict[str, type[Quantizer]] = {"quanto": QuantoQuantizer, "hqq": HQQQuantizer}


def check_backend(spec: CacheSpec) -> None:
    """Raise CacheConfigError with the reason when `spec`'s backend cannot be used here."""
    from engine.caches import backend_availability

    reason = backend_availability().get(spec.backend, f"Unknown quantization backend {spec.backend!r}; "
                                                      "choose quanto or hqq.")
    if reason is not None:
        raise CacheConfigError(reason)


def make_quantizer(spec: CacheSpec) -> Quantizer:
    """The quantizer of `spec`'s backend, bits and group size."""
    check_backend(spec)
    return BACKEND_CLASSES[spec.backend](spec.nbits, spec.q_group_size)


def estimate_bytes(spec: CacheSpec, elements: int, axis: int, element_size: int) -> int:
    """Bytes one quantized tensor of `elements` values takes with `spec`'s backend (no import of it)."""
    return BACKEND_CLASSES[spec.backend].estimate_bytes(elements, spec.nbits, spec.q_group_size, axis, element_size)
