"""The shape of a model's KV cache, read from its config: the one place memory estimates start from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> KVShape:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(layers=int(text.num_hidden_layers), kv_heads=kv_heads, head_dim=int(head_dim))

    def elements_per_token(self) -> int:
        """Key and value elements one token adds to the cache, over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.elements_per_token() * torch.empty((), dtype=dtype).element_size()
