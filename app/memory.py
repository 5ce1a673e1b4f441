"""Free memory now, and what each cache strategy would cost: the numbers the settings panel and
the status bar show.

Sizes come from the engine (`engine.caches.bytes_for`); this module only asks how many tokens
fit in the memory that is free. It imports the engine lazily: by the time these functions run,
the worker has imported it (and the strategy modules) already, so nothing slow happens here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import psutil

SEARCH_CAP = 10_000_000  # tokens; beyond this a cache is "as long as you like" (as engine.memory)


@dataclass(frozen=True)
class Estimate:
    strategy: str
    bytes_at: int | None  # for the reference length
    tokens_fit: int | None  # None: no limit (the cache's size is bounded)
    error: str | None = None


def free_bytes(device: str) -> int:
    """Memory available for new KV caches on `device` ("cpu", "cuda:0", ...)."""
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return int(psutil.virtual_memory().available)


def process_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def estimate(spec: dict[str, Any], tokens: int, config: Any, dtype: Any, free: int) -> Estimate:
    """Bytes of `spec` at `tokens` tokens and the longest chat that fits in `free` bytes."""
    strategy = str(spec.get("strategy", "dynamic"))
    try:
        from engine import caches

        cache_spec = caches.CacheSpec.from_dict(spec).validate()
        size = caches.bytes_for(cache_spec, tokens, config, dtype)
        engine_fit = _engine_tokens_that_fit()
        if engine_fit is not None:
            fit = engine_fit(cache_spec, config, dtype, free)
        elif strategy == "static":
            length = cache_spec.max_cache_len
            fit: int | None = length if caches.bytes_for(cache_spec, length, config, dtype) <= free else 0
        elif caches.bytes_for(cache_spec, SEARCH_CAP, config, dtype) <= free:
            fit = None if cache_spec.bounded_length else SEARCH_CAP
        else:
            lo, hi = 0, SEARCH_CAP  # bytes_for grows with tokens: the last length that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if caches.bytes_for(cache_spec, mid, config, dtype) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            fit = lo
    except Exception as exc:  # a strategy whose module is not written yet, a bad parameter
        return Estimate(strategy, None, None, f"{type(exc).__name__}: {exc}")
    return Estimate(strategy, size, fit)


def _engine_tokens_that_fit() -> Any:
    """The engine's own search (engine.memory), when this engine has it."""
    try:
        from engine.memory import tokens_that_fit
    except ImportError:
        return None
    return tokens_that_fit


def human_tokens(n: int | None) -> str:
    if n is None:
        return "any length"
    if n >= SEARCH_CAP:
        return f"≥ {SEARCH_CAP // 1_000_000}M tokens"
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M tokens"
    if n >= 10_000:
        return f"{n / 1000:.0f}k tokens"
    return f"{n:,} tokens"


def human_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:,.1f} {unit}"
