"""Choosing the attention kernel (engine/kernels.py): FlashAttention 2 only where it is installed, the GPU
and dtype support it and every cache strategy a chat can use is safe with it; else Cachet's SDPA path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine import kernels, models
from engine.kernels import FLASH, SDPA, choose_attention
from engine.specs import STRATEGIES
from tests.gguf_files import write_gguf

SAFE = sorted(kernels.FLASH_STRATEGIES)
GPU = {"device_type": "cuda", "capability": (8, 0), "dtype": "bfloat16", "strategies": SAFE, "flash_installed": True}


def test_flash_attention_2_where_installed_on_ampere_or_later_in_half_precision() -> None:
    for capability in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0)]:
        for dtype in ["bfloat16", "float16", "torch.float16"]:
            choice = choose_attention(**{**GPU, "capability": capability, "dtype": dtype})
            assert (choice.kernel, choice.label) == (FLASH, "FlashAttention 2"), (capability, dtype)


@pytest.mark.parametrize("change, reason", [
    ({"flash_installed": False}, "flash-attn is not installed (pip install 'cachet[flash]'"),
    ({"device_type": "cpu", "capability": None}, "runs on CUDA GPUs only; the model runs on cpu"),
    ({"device_type": "mps", "capability": None}, "runs on CUDA GPUs only; the model runs on mps"),
    ({"capability": (7, 5)}, "compute capability 8.0 or newer (Ampere or later); this GPU's is 7.5"),
    ({"capability": None}, "this GPU's is unknown"),
    ({"dtype": "float32"}, "float16 or bfloat16; the model runs in float32"),
    ({"strategies": list(STRATEGIES)}, "chats can use the static cache"),
])
def test_otherwise_cachet_sdpa_with_the_reason(change: dict, reason: str) -> None:
    choice = choose_attention(**{**GPU, **change})
    assert choice.kernel == SDPA and choice.label == "SDPA"
    assert choice.reason.startswith("SDPA: ") and reason in choice.reason


def test_every_strategy_but_static_is_safe_with_flash_attention() -> None:
    assert set(STRATEGIES) - kernels.FLASH_STRATEGIES == {"static"}


def test_whether_flash_attn_is_installed_is_asked_without_importing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert kernels.flash_attn_installed()
    assert choose_attention(**{**GPU, "flash_installed": None}).kernel == FLASH
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not kernels.flash_attn_installed()
    assert choose_attention(**{**GPU, "flash_installed": None}).kernel == SDPA


def test_a_loaded_model_says_which_kernel_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHET_CACHE_DIR", str(tmp_path / "cache"))
    lm = models.load(str(write_gguf(tmp_path / "Tiny.gguf", loadable=True)), device="cpu", dtype="float32")
    assert lm.attention == SDPA == lm.config._attn_implementation
    assert lm.attention_note.startswith("SDPA: ")
