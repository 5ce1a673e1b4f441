"""Models of a published shape with random weights, for timing bigger models without downloading them.

Timing does not depend on weight values, so a Llama-3.2-1B- or Llama-3.1-8B-shaped model built
from its config (the published numbers below) decodes exactly as fast as the real one. Text goes
through the bundled model's tokenizer: its ids are all inside the bigger vocabulary, and ids
beyond it (which random weights produce) decode to nothing, which costs the same.

`--model shape:NAME` selects one; `shape:tiny` is a 2-layer model for checking the harness.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from engine import models
from engine.models import LoadedModel, ModelSource

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# From the models' published config.json files.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                         tie_word_embeddings=False, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=8192, rope_theta=10000.0,
                 tie_word_embeddings=False),
}
PREFIX = "shape:"


def is_shape(model: str) -> bool:
    return model.startswith(PREFIX)


def load_shape(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """A random-weight model of the named shape on `device` in `dtype`, with the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    name = model.removeprefix(PREFIX)
    if name not in SHAPES:
        raise models.ModelLoadError(f"Unknown model shape {name!r}; choose one of {', '.join(SHAPES)}.")
    started = time.perf_counter()
    tokenizer = models.load("default", device="cpu", dtype="float32").tokenizer
    config = LlamaConfig(**SHAPES[name], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        net: Any = LlamaForCausalLM(config)
    net = net.to(dtype=dtype).eval()
    net.generation_config.eos_token_id = tokenizer.eos_token_id
    seen: set[int] = set()
    weights = 0
    for p in net.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.numel() * p.element_size()
    return LoadedModel(
        model=net, tokenizer=tokenizer, source=ModelSource("folder", model, f"{name} shape (random weights)"),
        identity=f"{model}-seed{seed}|{str(dtype).removeprefix('torch.')}", device=device, dtype=dtype,
        load_seconds=time.perf_counter() - started, weights_bytes=weights,
    )
