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
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "cachet_sdpa"
PACK_MAX_QUERIES = 64  # beyond this the repeated mask costs more than the copy it saves


def cachet_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    rep = int(getattr(module, "num_key_value_groups", 1))
    batch, heads, n, dim = query.shape
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
