"""Tiny random models for fast tests: a byte-level tokenizer with a ChatML template and a
2-layer Llama built from a config. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.models import LoadedModel, ModelSource

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte plus ChatML specials: every text round-trips exactly."""
    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIALS)
    fast.chat_template = CHATML
    return fast


def tiny_config(vocab_size: int, layers: int = 2, **overrides: Any) -> LlamaConfig:
    params: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_loaded_model(seed: int = 0, **config_overrides: Any) -> LoadedModel:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer), **config_overrides)
    config.eos_token_id = tokenizer.eos_token_id
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=ModelSource("folder", "<tiny>", "tiny-llama"),
        identity=f"tiny-llama-seed{seed}|float32", device=torch.device("cpu"), dtype=torch.float32,
        load_seconds=0.0, weights_bytes=sum(p.numel() * 4 for p in model.parameters()),
    )


def save_tiny_folder(path: Path, seed: int = 0) -> Path:
    lm = tiny_loaded_model(seed)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
