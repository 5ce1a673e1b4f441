"""Which attention kernel a model runs: Cachet's SDPA path, or FlashAttention 2 (issue 15 §3).

No torch here: the choice is made from plain facts (is `flash_attn` importable, the device, its compute
capability, the dtype, the cache strategies the model's chats can use), so it is tested without a GPU.

FlashAttention 2 (the optional extra `pip install 'cachet[flash]'`) needs a CUDA GPU of compute capability
8.0 or newer (Ampere, Ada, Hopper) and fp16/bf16 activations. The kernel is set once per loaded model, while
a chat can switch its cache strategy at any time, so FlashAttention 2 is chosen only when every strategy a
chat can use here hands it what it computes correctly: the keys and values of exactly the tokens the cache
holds. The static cache does not: it hands attention its whole pre-allocated buffer, and only the mask of
Cachet's SDPA path hides the slots not yet written (FlashAttention's causal alignment would read them).
Correctness first: where a chat can use the static cache, the model keeps Cachet's SDPA path, and says why.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

FLASH = "flash_attention_2"  # transformers' name for the FlashAttention 2 kernel
SDPA = "cachet_sdpa"  # engine/attention.py: transformers' SDPA, with packed grouped queries and split decoding
FLASH_MIN_CAPABILITY = (8, 0)
FLASH_DTYPES = ("float16", "bfloat16")
# Strategies whose caches hand attention the keys and values of exactly the tokens they hold (a window, a
# dequantized copy, keys moved to new positions: a plain causal attention over them is the right one).
FLASH_STRATEGIES = frozenset({"dynamic", "sink", "quantized", "sink-quantized", "offloaded"})


@dataclass(frozen=True)
class AttentionChoice:
    kernel: str  # FLASH or SDPA
    reason: str  # why, in words (the model info and the CLI's start line show it)

    @property
    def label(self) -> str:
        return "FlashAttention 2" if self.kernel == FLASH else "SDPA"


def flash_attn_installed() -> bool:
    """Whether the `flash_attn` package can be imported (without importing it: it loads CUDA libraries)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def choose_attention(*, device_type: str, capability: tuple[int, int] | None, dtype: str,
                     strategies: Iterable[str], flash_installed: bool | None = None) -> AttentionChoice:
    """FlashAttention 2 when it is installed, the device is a CUDA GPU of compute capability ≥ 8.0, the dtype
    is float16 or bfloat16 and every strategy in `strategies` works with it; otherwise Cachet's SDPA path,
    with the first reason that rules FlashAttention 2 out. `dtype` is a torch dtype's name ("bfloat16")."""
    installed = flash_attn_installed() if flash_installed is None else flash_installed
    dtype = dtype.removeprefix("torch.")
    if not installed:
        return AttentionChoice(SDPA, "SDPA: flash-attn is not installed (pip install 'cachet[flash]' on a CUDA GPU)")
    if device_type != "cuda":
        return AttentionChoice(SDPA, f"SDPA: FlashAttention 2 runs on CUDA GPUs only; the model runs on {device_type}")
    if capability is None or tuple(capability) < FLASH_MIN_CAPABILITY:
        have = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return AttentionChoice(SDPA, "SDPA: FlashAttention 2 needs a GPU of compute capability 8.0 or newer "
                                     f"(Ampere or later); this GPU's is {have}")
    if dtype not in FLASH_DTYPES:
        return AttentionChoice(SDPA, "SDPA: FlashAttention 2 computes in float16 or bfloat16; "
                                     f"the model runs in {dtype}")
    unsafe = sorted(set(strategies) - FLASH_STRATEGIES)
    if unsafe:
        return AttentionChoice(SDPA, f"SDPA: chats can use the {', '.join(unsafe)} cache, which hands attention its "
                                     "pre-allocated slots that only the SDPA path's mask hides (correctness first)")
    return AttentionChoice(FLASH, "FlashAttention 2: installed, and this GPU and dtype support it")
