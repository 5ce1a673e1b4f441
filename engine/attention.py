"""Attention for a few queries over a long cache without copying the cache.

transformers' SDPA path (integrations/sdpa_attention.py) handles grouped-query attention in
three ways: torch's `enable_gqa` when there is no mask, packing the query heads of one key/value
head together for a single query token, and otherwise `repeat_kv`, which copies every key and
value `num_key_value_groups` times. A step that scores a few tokens at once over a long cache —
speculative decoding checking its guesses, a short follow-up's prefill — carries a causal mask,
so it took the copying path: at 8k tokens of history, SmolLM2's three KV heads were copied into
nine for every layer at every such step.

`cachet_sdpa` packs those queries too: the `rep` query heads that share a KV head become `rep × n`
query rows of that head, and the causal mask is repeated over them (a few KB), so the cache is
read once and never copied. Everything else (softcap, position bias, long prefill chunks, no
grouping) goes to transformers' own function unchanged. The result equals the copying path's
(tests/engine/test_attention.py).

A decoding step (one query) over a long cache is bound by reading the cache. torch's CPU kernel
splits that work by head, and a model with 3 KV heads on 2 cores leaves one core idle for a third
of it. `split_decode` splits the cache along its length instead ("flash-decoding"): the chunks
become extra batch rows of a view (no copy), each chunk's softmax is computed with its
log-sum-exp, and the chunks are merged exactly. Measured on the 2-core machine with SmolLM2-135M's
shapes at 8k tokens (30 layers): 38 → 30 ms per step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "cachet_sdpa"
PACK_MAX_QUERIES = 64  # beyond this the repeated mask costs more than the copy it saves
SPLIT_MIN_KEYS = 1024  # a shorter cache is read too quickly for splitting it to pay
SPLIT_CHUNKS = 8
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def split_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Attention of one query per head over a long CPU cache, split along the cache's length.

    `query` [b, heads, 1, d] with heads = kv_heads × rep; `key`/`value` [b, kv_heads, L, d] (views of a
    longer buffer are fine). Returns [b, heads, 1, d], equal to SDPA's result up to float rounding.
    """
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    rep = heads // kv_heads
    chunk = length // SPLIT_CHUNKS
    main = chunk * SPLIT_CHUNKS
    q = query.reshape(batch * kv_heads, 1, rep, dim)  # the rep heads of one KV head as rep query rows
    outs, lses = [], []
    # The cache's first `main` tokens as SPLIT_CHUNKS rows of `chunk` tokens: [b*kv, chunks, chunk, d], a view
    # (also of a longer buffer the cache grows in).
    k = key[:, :, :main].unflatten(2, (SPLIT_CHUNKS, chunk)).flatten(0, 1)
    v = value[:, :, :main].unflatten(2, (SPLIT_CHUNKS, chunk)).flatten(0, 1)
    out, lse = _flash_cpu(q.expand(batch * kv_heads, SPLIT_CHUNKS, rep, dim), k, v, scale=scaling)
    outs.append(out)
    lses.append(lse)
    if main < length:  # the tail that does not fill a chunk
        tail_k = key[:, :, main:].flatten(0, 1).unsqueeze(1)
        tail_v = value[:, :, main:].flatten(0, 1).unsqueeze(1)
        out, lse = _flash_cpu(q, tail_k, tail_v, scale=scaling)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)  # [b*kv, parts, rep, d], [b*kv, parts, rep]
    weights = torch.softmax(lse.float(), dim=1).unsqueeze(-1).to(out.dtype)
    merged = (out * weights).sum(dim=1)  # [b*kv, rep, d]
    return merged.reshape(batch, heads, 1, dim)


def cachet_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    rep = int(getattr(module, "num_key_value_groups", 1))
    batch, heads, n, dim = query.shape
    if (n == 1 and key.shape[2] >= SPLIT_MIN_KEYS and query.device.type == "cpu" and dropout == 0.0
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None and kwargs.get("cache") is None
            and kwargs.get("s_aux") is None and heads == key.shape[1] * rep and value.shape[-1] == dim
            and query.dtype == key.dtype == value.dtype and query.dtype in (torch.float32, torch.bfloat16)
            and (attention_mask is None or (attention_mask.dtype == torch.bool and bool(attention_mask.all())))):
        return split_decode(query, key, value, scaling).transpose(1, 2).contiguous(), None
    if 1 < n <= ROW_EXACT_MAX_QUERIES and getattr(module, ROW_EXACT, False):
        rows = _row_exact(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if rows is not None:
            return rows, None
    packable = (rep > 1 and 1 < n <= PACK_MAX_QUERIES and attention_mask is not None
                and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
                and attention_mask.shape[-1] == key.shape[2]
                and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                and kwargs.get("cache") is None and dropout == 0.0 and heads == key.shape[1] * rep
                and value.shape[-1] == dim)
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    assert attention_mask is not None
    kv_heads, kv_len = key.shape[1], key.shape[2]
    # Head h reads KV head h // rep (repeat_kv's order), so [b, kv, rep, n, d] -> [b, kv, rep * n, d].
    packed = query.reshape(batch, kv_heads, rep * n, dim)
    mask_batch = attention_mask.shape[0]
    mask = attention_mask.unsqueeze(2).expand(mask_batch, 1, rep, n, kv_len)
    mask = mask.reshape(mask_batch, 1, rep * n, kv_len)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, n, dim).transpose(1, 2).contiguous(), None


ROW_EXACT = "cachet_row_exact"  # attribute set on attention modules whose model needs row-exact passes
ROW_EXACT_MAX_QUERIES = 9  # a decoding pass: one token and up to 8 guesses


def _row_exact(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float, scaling: float | None,
               **kwargs: Any) -> torch.Tensor | None:
    """A pass of a few queries computed one query at a time, each exactly as a one-token step at its position
    computes it (the same function, the same keys), or None where the mask is not the plain causal one.

    A model with bf16 copies of its weights (engine/half_weights.py) rounds each layer's input to bf16,
    which turns the last-bit differences between attention over several queries and over one into
    different logits; computed this way, a pass checking speculative guesses gives every position the
    logits that decoding one token at a time would, so greedy replies do not depend on speculation.
    """
    n, length = query.shape[2], key.shape[2]
    if attention_mask is None:
        visible = [length - n + 1 + i for i in range(n)]
    elif attention_mask.dtype == torch.bool and attention_mask.dim() == 4 and attention_mask.shape[0] == 1:
        rows = attention_mask[0, 0]
        visible = [int(r.sum()) for r in rows]
        if any(not bool(r[:v].all()) for r, v in zip(rows, visible, strict=True)):
            return None  # not a prefix per row (sliding window, padding): the packed pass handles it
    else:
        return None
    outs = []
    for i, keys in enumerate(visible):
        q = query[:, :, i : i + 1]
        k, v = key[:, :, :keys], value[:, :, :keys]
        out, _ = cachet_sdpa(module, q, k, v, None, dropout=dropout, scaling=scaling, **kwargs)
        outs.append(out)  # [b, 1, heads, d]
    return torch.cat(outs, dim=1)


def mark_row_exact(model: torch.nn.Module) -> int:
    """Make `model`'s attention compute passes of a few queries one query at a time (see `_row_exact`);
    returns how many attention modules were marked."""
    marked = 0
    for module in model.modules():
        if hasattr(module, "num_key_value_groups"):
            setattr(module, ROW_EXACT, True)
            marked += 1
    return marked


def register() -> str:
    """Make `cachet_sdpa` a name models accept (`model.set_attn_implementation(NAME)`); idempotent."""
    AttentionInterface.register(NAME, cachet_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def use_packed_attention(model: Any) -> bool:
    """Switch a model that runs transformers' SDPA attention to `cachet_sdpa`; False (unchanged) otherwise."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError):  # a model that refuses custom attention keeps its own
        return False
    return True
