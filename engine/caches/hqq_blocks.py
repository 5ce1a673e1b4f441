"""KV blocks quantized with HQQ (Half-Quadratic Quantization, Badri & Shaji 2023), when `hqq` is installed.

HQQ fits each group's scale and zero point by a few iterations of a half-quadratic solver
instead of taking min/max, which matters most at 2 bits. Only its solver is used here
(`Quantizer.quantize(..., bitpack=False)`); the integers are packed by this module so that a
quantized tensor can be appended to and cut along the token axis *without re-quantizing*:

* groups never straddle a token block: with `axis == 0` ("per token") a group is `group`
  consecutive elements of the (tokens × head dim) rows of one head, with `axis == -1`
  ("per channel", KIVI's choice for keys) it is `group` consecutive tokens of one channel;
* each group's integers are packed into `group · nbits / 8` bytes of its own row, so the groups
  of more tokens are just more rows: appending a block is a concatenation and a crop is a slice.

The axis convention is the one of the quanto path (engine/caches/quantized.py), so a chat's
settings mean the same whatever the backend. transformers' own `HQQQuantizedLayer` uses HQQ's
axes instead, where `axis=0` groups elements that lie far apart in memory (`reshape(group, -1)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch


def _pack(ints: torch.Tensor, nbits: int) -> torch.Tensor:
    """(..., group) integers < 2**nbits → (..., group · nbits / 8) bytes, element i in bit field i % (8 / nbits)."""
    per_byte = 8 // nbits
    fields = ints.to(torch.uint8).reshape(*ints.shape[:-1], ints.shape[-1] // per_byte, per_byte)
    packed = fields[..., 0].clone()
    for i in range(1, per_byte):
        packed |= fields[..., i] << (nbits * i)
    return packed


def _unpack(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    mask = (1 << nbits) - 1
    fields = [(packed >> (nbits * i)) & mask for i in range(8 // nbits)]
    return torch.stack(fields, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * (8 // nbits))


@dataclass
class HQQBlock:
    """A quantized (batch, heads, tokens, head_dim) tensor.

    axis 0: `packed` is (batch, heads, groups, bytes) with tokens · head_dim / group groups.
    axis -1: `packed` is (batch, heads, head_dim, groups, bytes) with tokens / group groups.
    `scale` and `zero` have the shape of `packed` with a last dimension of 1.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    axis: int
    nbits: int
    group: int
    tokens: int
    head_dim: int

    @property
    def _group_dim(self) -> int:
        return 2 if self.axis == 0 else 3

    def _groups(self, tokens: int) -> int:
        return tokens * self.head_dim // self.group if self.axis == 0 else tokens // self.group

    def dequantize(self) -> torch.Tensor:
        values = (_unpack(self.packed, self.nbits).to(self.scale.dtype) - self.zero) * self.scale
        batch, heads = values.shape[:2]
        if self.axis == 0:
            return values.reshape(batch, heads, self.tokens, self.head_dim)
        return values.reshape(batch, heads, self.head_dim, self.tokens).transpose(-1, -2)

    def head(self, tokens: int) -> HQQBlock:
        """The first `tokens` tokens (a multiple of the token quantum; nothing is re-quantized)."""
        whole = (tokens * self.head_dim) % self.group == 0 if self.axis == 0 else tokens % self.group == 0
        if not whole:
            raise ValueError(f"a cut after {tokens} tokens falls inside a quantization group of {self.group}")
        cut = [slice(None)] * self.packed.dim()
        cut[self._group_dim] = slice(0, self._groups(tokens))
        index = tuple(cut)
        return replace(self.map(lambda t: t[index].clone()), tokens=tokens)

    def cat(self, other: HQQBlock) -> HQQBlock:
        dim = self._group_dim
        return HQQBlock(torch.cat((self.packed, other.packed), dim), torch.cat((self.scale, other.scale), dim),
                        torch.cat((self.zero, other.zero), dim), self.axis, self.nbits, self.group,
                        self.tokens + other.tokens, self.head_dim)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> HQQBlock:
        """The same block with `fn` applied to each of its tensors (a slice, a batch selection,
        a move to another device: the cache pool moves idle caches between the GPU and RAM)."""
        return replace(self, packed=fn(self.packed), scale=fn(self.scale), zero=fn(self.zero))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


def quantize(x: torch.Tensor, axis: int, nbits: int, group: int) -> HQQBlock:
    """Quantize a (batch, heads, tokens, head_dim) tensor with HQQ's optimiser (see the module doc)."""
    from hqq.core.quantize import Quantizer

    batch, heads, tokens, head_dim = x.shape
    if axis == 0:
        if (tokens * head_dim) % group:
            raise ValueError(f"{tokens} tokens of {head_dim} channels do not split into groups of {group}")
        rows = x.reshape(batch, heads, tokens * head_dim // group, group)
    else:
        if tokens % group:
            raise ValueError(f"{tokens} tokens do not split into groups of {group}")
        rows = x.transpose(-1, -2).reshape(batch, heads, head_dim, tokens // group, group)
    ints, meta = Quantizer.quantize(rows.reshape(-1, group).float(), nbits=nbits, channel_wise=True,
                                    group_size=group, optimize=True, axis=1, bitpack=False,
                                    compute_dtype=torch.float32, device=str(x.device))
    shape = (*rows.shape[:-1], 1)
    scale: Any = meta["scale"]
    zero: Any = meta["zero"]
    return HQQBlock(_pack(ints.round().reshape(rows.shape), nbits), scale.reshape(shape).to(x.dtype),
                    zero.reshape(shape).to(x.dtype), axis, nbits, group, tokens, head_dim)


def block_bytes(elements: int, nbits: int, group: int, size: int) -> int:
    """Bytes of an HQQBlock of `elements` values: packed integers plus a scale and a zero per group."""
    groups = elements // group
    return elements * nbits // 8 + 2 * groups * size
