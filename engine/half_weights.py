"""A bf16 copy of the weights for decoding steps, next to the fp32 weights for everything else.

A decoding step on a CPU is bound by memory bandwidth: it reads every weight once to score one
token, so reading bf16 weights instead of fp32 halves the bytes (1.6× faster steps for SmolLM2-135M
on this project's 2-core AVX2 machine). But running the *whole* model in bf16 on a CPU without
native bf16 arithmetic (AVX2, most laptops) costs elsewhere, measured there with
`scripts/speed_probe.py`: a ~40-token prefill took 2.8× longer (bf16 products of many rows are
emulated) and attention over an 8k-token bf16 cache ran 1.8× slower than in fp32; widening bf16
weights back to fp32 for every prefill product cost about as much as the product itself.

So each `nn.Linear` keeps its fp32 weight and gains a bf16 copy (+50% weight memory): a product
over at most `kernel_max_tokens` rows (at least `DECODE_ROWS`: a decoding step, a speculative check
of a few guesses) runs bf16's kernel on the copy and reads half the bytes; a larger one (a prefill
chunk) runs in fp32 on the original. Activations, norms, RoPE, the KV cache and attention stay
fp32, so a cache is exactly as precise as with fp32 weights, the advisor's byte counts do not change, and the model's
`dtype` is still fp32. `engine/precision.py` measures whether this pays on the machine it runs on
and where the two kernels cross.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_DTYPE = torch.bfloat16
NEVER = 1 << 30  # a kernel_max_tokens that sends every product to the bf16 copies
# The most rows a decoding pass has: one token plus the guesses speculative decoding checks (engine/speculative.py
# checks at most 8). Every such pass runs on the bf16 copies, whose kernel computes each row as it would alone
# (checked: bitwise equal), so a pass checking guesses gives each position the logits a one-token step would,
# and greedy replies are the same with speculation on and off.
DECODE_ROWS = 9


class HalfWeightLinear(nn.Module):
    """`nn.Linear` with a bf16 copy of its weight used for products of few rows."""

    def __init__(self, linear: nn.Linear, kernel_max_tokens: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the fp32 original (shared with a tied embedding, if any)
        self.bias = linear.bias
        # Buffers, not parameters: the model's dtype, its parameter count and `.parameters()` stay those of fp32.
        self.register_buffer("weight_bf16", linear.weight.detach().to(WEIGHT_DTYPE), persistent=False)
        self.register_buffer("bias_bf16", None if linear.bias is None else linear.bias.detach().to(WEIGHT_DTYPE),
                             persistent=False)
        self.kernel_max_tokens = max(kernel_max_tokens, DECODE_ROWS) if kernel_max_tokens else 0
        self.weight_bf16: torch.Tensor
        self.bias_bf16: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= self.kernel_max_tokens and x.dtype == torch.float32:
            return F.linear(x.to(WEIGHT_DTYPE), self.weight_bf16, self.bias_bf16).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bf16 copy for products of up to {self.kernel_max_tokens} rows")


def extra_bytes(model: nn.Module) -> int:
    """What `convert` adds: a bf16 copy of every `nn.Linear`'s weight and bias."""
    return sum(sum(p.numel() * 2 for p in m.parameters(recurse=False))
               for m in model.modules() if type(m) is nn.Linear)


def convertible(model: nn.Module) -> bool:
    """True for an fp32 model with linear layers (what `convert` handles)."""
    first = next(model.parameters(), None)
    return first is not None and first.dtype == torch.float32 and any(type(m) is nn.Linear for m in model.modules())


@torch.no_grad()
def convert(model: nn.Module, kernel_max_tokens: int) -> int:
    """Give every `nn.Linear` of `model` a bf16 copy for products of at most `kernel_max_tokens` rows, in
    place; returns the bytes added."""
    from engine.attention import mark_row_exact

    mark_row_exact(model)  # a decoding pass's rows get exactly what one-token steps get (engine/attention.py)
    added = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                replacement = HalfWeightLinear(child, kernel_max_tokens)
                added += sum(b.numel() * b.element_size() for b in replacement.buffers())
                setattr(parent, name, replacement)
    return added


def is_converted(model: nn.Module) -> bool:
    return any(isinstance(m, HalfWeightLinear) for m in model.modules())


@contextmanager
def kernel_limit(model: nn.Module, rows: int) -> Iterator[None]:
    """Run `model`'s bf16 copies for products of at most `rows` rows for a while (0: plain fp32; `NEVER`:
    every product on the copies, as the fidelity table measures them); a no-op for a model without copies."""
    layers = [m for m in model.modules() if isinstance(m, HalfWeightLinear)]
    saved = [m.kernel_max_tokens for m in layers]
    for m in layers:
        m.kernel_max_tokens = rows
    try:
        yield
    finally:
        for m, limit in zip(layers, saved, strict=True):
            m.kernel_max_tokens = limit


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights a one-token step reads: the bf16 copies, and every other parameter except embedding
    tables (a step reads one row); for a model without copies, its parameters and buffers as they are."""
    layers = [m for m in model.modules() if isinstance(m, HalfWeightLinear)]
    if not layers:
        from engine.quantized_weights import model_bytes

        return model_bytes(model)  # int8/int4 weights at their real size
    copied = {id(m.weight) for m in layers} | {id(m.bias) for m in layers if m.bias is not None}
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in copied | embedded)
    return rest + sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
