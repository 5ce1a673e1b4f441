"""Tiny random models for fast tests: a byte-level tokenizer with a ChatML template and a
2-layer Llama built from a config. Nothing is downloaded.

`ForwardGate` holds such a model's forward passes where a test says: on a fast CPU the tiny model writes
thousands of tokens a second, so a test that needs a reply still streaming holds it open instead of
hoping to catch it.
"""

from __future__ import annotations

import threading
import time
import weakref
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


class GateTimeout(RuntimeError):
    """A held forward pass was never let go (the test that held it failed or forgot it)."""


_GATES: weakref.WeakSet[ForwardGate] = weakref.WeakSet()


class ForwardGate:
    """Holds a model's forward passes at a point the test chooses, in the thread that runs the model.

    Every forward pass of the attached model is counted (a prefill chunk, a one-token decoding step, a
    pass checking speculative guesses): with speculation off and a prompt under one prefill chunk
    (512 tokens), pass 1 chooses the reply's first token and each later pass one more. `hold_after(n)`
    lets n more passes start and holds the next one until `step()` or `open()` lets it go; nothing is
    held before that. A held pass waits at most `timeout` seconds (None: for ever), then fails with
    `GateTimeout`, which ends the turn as an error instead of hanging the test.
    """

    def __init__(self, timeout: float | None = 60.0) -> None:
        self.timeout = timeout
        self.passes = 0  # passes that went through
        self._limit: int | None = None  # how many passes may have gone through; None: no limit
        self._waiting = 0
        self._cond = threading.Condition()
        _GATES.add(self)

    def attach(self, lm: LoadedModel) -> LoadedModel:
        """Count and hold `lm`'s forward passes; returns `lm` (so `lambda: gate.attach(tiny_loaded_model())`
        is a loader)."""
        lm.model.register_forward_pre_hook(self._before)
        return lm

    def _before(self, _module: Any, _args: Any) -> None:
        with self._cond:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while self._limit is not None and self.passes >= self._limit:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise GateTimeout(f"forward pass {self.passes + 1} was held for {self.timeout} s and never let go")
                self._waiting += 1
                self._cond.notify_all()
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
            self.passes += 1

    @property
    def held(self) -> bool:
        """Whether a pass is waiting at the gate now."""
        with self._cond:
            return self._waiting > 0

    def hold_after(self, n: int) -> None:
        """Let `n` more passes through, then hold the next."""
        with self._cond:
            self._limit = self.passes + n
            self._cond.notify_all()

    def step(self, n: int = 1) -> None:
        """Let `n` more passes through (a no-op while the gate is open)."""
        with self._cond:
            if self._limit is not None:
                self._limit += n
                self._cond.notify_all()

    def open(self) -> None:
        """Let every pass through, now and later."""
        with self._cond:
            self._limit = None
            self._cond.notify_all()

    def held_after(self, n: int) -> bool:
        """Whether exactly `n` passes went through and the next one is held now."""
        with self._cond:
            return self._waiting > 0 and self.passes == n

    def wait_held(self, timeout: float = 60.0, after: int | None = None) -> bool:
        """Wait until a pass is held (after exactly `after` passes, if given); False if none was within
        `timeout` seconds. It blocks this thread: in the GUI's, use qtbot.waitUntil(lambda: gate.held)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting > 0 and after in (None, self.passes), timeout)


def open_all_gates() -> None:
    """Let every held pass of every gate through (before a window's worker thread is joined)."""
    for gate in list(_GATES):
        gate.open()


def save_tiny_folder(path: Path, seed: int = 0) -> Path:
    lm = tiny_loaded_model(seed)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


# ----- tiny models of the architectures users run (issue 15) ----------------------------------------
# Each is as small as the architecture allows (hidden 64, 2-4 layers, the byte tokenizer's vocabulary),
# with the features a KV cache must get right switched on. SLIDING is small so that tests cross it.
SLIDING = 16
_COMMON: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=1024, tie_word_embeddings=False)
_SW = ["sliding_attention", "full_attention"]

ROPE_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
                 "short_factor": [1.0 + i / 16 for i in range(8)], "long_factor": [1.5 + i / 8 for i in range(8)]},
}


def _arch_params(arch: str, vocab_size: int) -> tuple[str, dict[str, Any]]:
    """(model_type, config kwargs) of the tiny model called `arch`."""
    base = dict(_COMMON, vocab_size=vocab_size)
    if arch.startswith("llama-"):
        rope = dict(ROPE_VARIANTS[arch.removeprefix("llama-")])
        return "llama", dict(base, num_hidden_layers=2, rope_parameters=rope,
                             **({"original_max_position_embeddings": 256} if rope["rope_type"] == "longrope" else {}))
    if arch == "qwen2":
        return "qwen2", dict(base, num_hidden_layers=2)
    if arch == "qwen3":  # q/k RMS norms, explicit head_dim
        return "qwen3", dict(base, num_hidden_layers=2, head_dim=16)
    if arch == "mistral":  # every layer slides (Mistral 7B v0.1's 4,096-token window, shrunk)
        return "mistral", dict(base, num_hidden_layers=2, sliding_window=SLIDING, head_dim=16)
    if arch == "gemma2":  # sliding/global interleaved, attention and final logit soft-capping
        return "gemma2", dict(base, num_hidden_layers=4, head_dim=16, sliding_window=SLIDING, layer_types=_SW * 2,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    if arch == "gemma3":  # 5 local : 1 global in the real models; a different RoPE base per kind of layer
        return "gemma3_text", dict(base, num_hidden_layers=4, head_dim=16, sliding_window=SLIDING,
                                   layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                   final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                       "rope_theta": 1_000_000.0},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 10_000.0}})
    if arch == "phi3":  # partial rotary + LongRoPE (Phi-3.5 / Phi-4-mini)
        return "phi3", dict(base, num_hidden_layers=2, num_key_value_heads=4, original_max_position_embeddings=256,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.5,
                                             "short_factor": [1.0 + i / 8 for i in range(4)],
                                             "long_factor": [2.0 + i / 4 for i in range(4)]})
    if arch == "smollm3":  # every other layer without RoPE (every 4th in the real model)
        return "smollm3", dict(base, num_hidden_layers=4, no_rope_layer_interval=2,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "gpt_oss":  # learned attention sinks, alternating sliding layers, YaRN, mixture of experts
        return "gpt_oss", dict(base, num_hidden_layers=2, head_dim=16, sliding_window=SLIDING, layer_types=_SW,
                               num_local_experts=4, num_experts_per_tok=2,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 256, "beta_fast": 32.0,
                                                "beta_slow": 1.0, "truncate": False})
    if arch == "bamba":  # Mamba-2 layers with one attention layer (the hybrid transformers runs on a CPU)
        return "bamba", dict(base, num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16,
                             mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16, mamba_expand=2)
    raise KeyError(arch)


ARCHITECTURES = ["llama-default", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "smollm3", "gpt_oss",
                 "bamba"]
LLAMA_ROPES = [f"llama-{name}" for name in ROPE_VARIANTS]


def tiny_arch_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    from transformers import AutoConfig

    model_type, params = _arch_params(arch, vocab_size)
    params.update(overrides)
    return AutoConfig.for_model(model_type, **params)


def tiny_arch_model(arch: str, seed: int = 0, **overrides: Any) -> LoadedModel:
    """A tiny random model of architecture `arch` (see `_arch_params`; `overrides` change its config), fp32 on
    the CPU, with the byte tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_arch_config(arch, len(tokenizer), **overrides)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=ModelSource("folder", "<tiny>", f"tiny-{arch}"),
        identity=f"tiny-{arch}-seed{seed}|float32", device=torch.device("cpu"), dtype=torch.float32,
        load_seconds=0.0, weights_bytes=sum(p.numel() * 4 for p in model.parameters()),
    )
