"""Cachet's generation engine: models, per-conversation KV caches, sessions. No Qt here, ever."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any


class _LazyHQQQuantizer:
    """Stands for `hqq.core.quantize.Quantizer` in transformers' cache_utils and imports it at first use."""

    def __getattr__(self, name: str) -> Any:
        from hqq.core.quantize import Quantizer

        return getattr(Quantizer, name)


class _DeferHQQImport(importlib.abc.MetaPathFinder):
    """Keeps transformers' cache_utils from importing HQQ when it is imported itself.

    `transformers/cache_utils.py` runs `from hqq.core.quantize import Quantizer` at import whenever HQQ
    is installed, for its own `HQQQuantizedLayer`, which Cachet does not use (its HQQ cache blocks,
    engine/caches/hqq_blocks.py, import HQQ when a chat asks for them). That import pulls in
    torch._inductor and took 1.8 s of every start here (about 5 s of a frozen app's). While
    cache_utils runs, `is_hqq_available` answers False; afterwards the real function is back, and
    cache_utils' `HQQQuantizer` imports HQQ the first time something uses it.
    """

    TARGET = "transformers.cache_utils"

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != self.TARGET:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        spec.loader = _CacheUtilsLoader(loader)  # a wrapper: the loader may serve other modules too (frozen apps)
        return spec


class _CacheUtilsLoader(importlib.abc.Loader):
    """Runs transformers' cache_utils with `is_hqq_available` answering False (see `_DeferHQQImport`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.inner.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        from transformers import utils

        real = utils.is_hqq_available
        importing, running = threading.get_ident(), [True]

        def is_hqq_available(*args: Any, **kwargs: Any) -> bool:
            # False only to this import, while it runs: another thread importing a module that takes this name
            # meanwhile gets the real answer from it, then and later
            if running[0] and threading.get_ident() == importing:
                return False
            return bool(real(*args, **kwargs))

        utils.is_hqq_available = is_hqq_available
        try:
            self.inner.exec_module(module)
        finally:
            running[0] = False
            utils.is_hqq_available = real
        module.is_hqq_available = real  # type: ignore[attr-defined]
        module.HQQQuantizer = _LazyHQQQuantizer()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... (tracebacks, inspect)
        return getattr(self.inner, name)


if "transformers.cache_utils" not in sys.modules and not any(isinstance(f, _DeferHQQImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeferHQQImport())
