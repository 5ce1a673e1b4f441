"""The shape of a model's KV cache, read from its config, and the byte sizes of what caches hold:
the one place memory estimates and measurements start from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def text_config(config: Any) -> Any:
    """The decoder's config: a multimodal model's text part, or the config itself."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes one element of `dtype` takes."""
    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds; quanto's packed tensors (subclasses whose storage lives in
    inner tensors) are counted by those inner tensors."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor:
        names, _ = inner()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> KVShape:
        text = text_config(config)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(layers=int(text.num_hidden_layers), kv_heads=kv_heads, head_dim=int(head_dim))

    def elements_per_token(self) -> int:
        """Key and value elements one token adds to the cache, over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.elements_per_token() * dtype_size(dtype)


# What each layer of a model keeps, as `layer_kinds` names it.
FULL, WINDOW, STATE, NONE = "full", "window", "state", "none"


def layer_kinds(config: Any) -> list[tuple[str, int]]:
    """(kind, window) per layer: FULL (every token's K/V), WINDOW (a sliding or chunked layer: its window),
    STATE (a state-space / linear-attention layer: constant-size states) or NONE (holds nothing)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    from engine.specs import CacheConfigError

    text = text_config(config)
    if hasattr(text, "per_layer_config"):
        layer_types, kwargs = get_layer_types_and_kwargs(text)
    else:  # a plain description of a model (the advisor's, discovery's): full attention unless it says
        layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * int(text.num_hidden_layers))
        kwargs = [{"sliding_window": getattr(text, "sliding_window", None)} for _ in layer_types]
    kinds: list[tuple[str, int]] = []
    for layer_type, layer_kwargs in zip(layer_types, kwargs, strict=True):
        if layer_type == "full_attention":
            kinds.append((FULL, 0))
        elif layer_type in ("sliding_attention", "chunked_attention"):
            kinds.append((WINDOW, int(layer_kwargs["sliding_window"])))
        elif layer_type in ("linear_attention", "conv"):
            kinds.append((STATE, 0))
        elif layer_type == "dummy":
            kinds.append((NONE, 0))
        else:
            raise CacheConfigError(f"Cachet's caches do not support layers of type {layer_type!r} yet.")
    return kinds


def window_tokens(tokens: int, window: int) -> int:
    """Tokens a sliding layer of `window` holds after `tokens` were fed (transformers keeps window - 1)."""
    return min(tokens, window - 1)


def state_nbytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes one state-space layer's states take (conv state + recurrent state) in `dtype`, as the Mamba
    family of transformers allocates them: Mamba-2 (Bamba, Granite 4, Falcon-H1) or Mamba-1 (Jamba)."""
    text = text_config(config)
    size = dtype_size(dtype)
    d_state, d_conv = int(text.mamba_d_state), int(text.mamba_d_conv)
    intermediate = int(getattr(text, "mamba_d_ssm", None) or text.mamba_expand * text.hidden_size)
    heads = getattr(text, "mamba_n_heads", None)
    if heads is None:  # Mamba-1: conv over the intermediate channels, one state per channel
        return (intermediate * d_conv + intermediate * d_state) * size
    groups = int(getattr(text, "mamba_n_groups", 1))
    head_dim = int(getattr(text, "mamba_d_head", None) or intermediate // int(heads))
    conv_dim = intermediate + 2 * groups * d_state
    return (conv_dim * d_conv + int(heads) * head_dim * d_state) * size


def layered_bytes(config: Any, dtype: torch.dtype, full_bytes: int, tokens: int) -> int:
    """Bytes of a cache whose full-attention layers hold `full_bytes` each: sliding layers add their
    window (capped, in full precision), state-space layers their constant states."""
    shape = KVShape.of(config)
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * dtype_size(dtype)
    total = 0
    for kind, window in layer_kinds(config):
        if kind == FULL:
            total += full_bytes
        elif kind == WINDOW:
            total += window_tokens(tokens, window) * per_token_layer
        elif kind == STATE:
            total += state_nbytes(config, dtype) if tokens > 0 else 0
    return total
