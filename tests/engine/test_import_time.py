"""Importing the engine does not import what only some chats use (start-up time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_transformers_cache_utils_no_longer_imports_hqq_at_start() -> None:
    """transformers' cache_utils imports HQQ (and with it torch._inductor) whenever it is installed; the engine
    defers that until a chat uses HQQ, and transformers' own HQQ name still reaches the real class. (HQQ chats
    themselves are tested in test_quantized_cache.py, in a process where the engine was imported first.)"""
    pytest.importorskip("hqq")
    out = _run(
        "import sys, engine, transformers.cache_utils as cu\n"
        "print('hqq.core.quantize' in sys.modules)\n"
        "from engine.caches import base, dynamic\n"
        "print('hqq.core.quantize' in sys.modules)\n"
        "from hqq.core.quantize import Quantizer\n"
        "print(cu.is_hqq_available(), cu.HQQQuantizer.quantize == Quantizer.quantize)\n"
    )
    assert out.splitlines() == ["False", "False", "True True"]



def test_only_the_cache_utils_import_itself_is_told_hqq_is_missing() -> None:
    """While cache_utils runs, another thread importing a module that takes `is_hqq_available` gets the real answer,
    then and afterwards; so does any later call through the name cache_utils' import saw."""
    import threading
    import types

    pytest.importorskip("hqq")
    from transformers import utils

    import engine

    seen: dict[str, object] = {}

    class Inner:
        def create_module(self, spec: object) -> None:
            return None

        def exec_module(self, module: object) -> None:
            stub = utils.is_hqq_available
            seen["this import"] = stub()
            other = threading.Thread(target=lambda: seen.__setitem__("another thread", stub()))
            other.start()
            other.join()
            seen["stub"] = stub

    module = types.ModuleType("fake_cache_utils")
    engine._CacheUtilsLoader(Inner()).exec_module(module)
    assert seen["this import"] is False and seen["another thread"] is True
    assert seen["stub"]() is True  # type: ignore[operator]  # after the import: the real answer
    assert utils.is_hqq_available is module.is_hqq_available  # type: ignore[attr-defined]  # the real one is back
