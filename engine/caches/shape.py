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
