"""Per-conversation KV cache strategies and the operations the session needs on any of them.

The contract, declared once in `base.py`: every cache Cachet builds is a `KVCache` (a transformers
`Cache`) whose layers are all `KVLayer`s, and every layer, whatever the strategy, answers
`get_seq_length()`, `crop_to(n) -> bool` (stand for the first n conversation tokens again, or say
it cannot and change nothing), `full_kv()` (everything held in full precision, keys rotated for
slots 0..n-1: what conversions and snapshots copy), `nbytes()` (the bytes really held) and
`to(device, pin_memory)` (the pool's moves); the cache does the same over its layers, plus
`ensure_room(n)` (a pre-allocated cache refuses before anything is written) and `evicted`.
Nobody probes a cache with `getattr`. The quantized and sink-quantized layers store through one
`Quantizer` per backend (quantizers.py: quanto, HQQ). The settings themselves (`CacheSpec`, the
strategy names, which fields each reads) are torch-free, in `engine/specs.py`.

Each strategy lives in its own module, exposing

    build(config, spec, device) -> KVCache            # an empty cache for a model on `device`
    bytes_for(tokens, config, spec, dtype) -> int     # what a cache of `tokens` tokens allocates

The session only talks to caches through this package and the `KVCache` contract (base.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import torch

from engine.caches.base import KVCache
from engine.specs import (  # noqa: F401  (re-exported: the cache settings, where cache code looks for them)
    BACKENDS,
    LOSSY,
    STRATEGIES,
    CacheConfigError,
    CacheSpec,
    quantization_defaults,
)

_MODULES = {
    "dynamic": "engine.caches.dynamic",
    "sink": "engine.caches.sink",
    "quantized": "engine.caches.quantized",
    "sink-quantized": "engine.caches.sink",
    "offloaded": "engine.caches.offloaded",
    "static": "engine.caches.static",
}


def strategy_module(strategy: str) -> ModuleType:
    return importlib.import_module(_MODULES[strategy])


def build_cache(spec: CacheSpec, config: Any, device: torch.device | None = None) -> KVCache:
    """An empty cache of `spec` for a model with `config` running on `device`."""
    spec.validate()
    if spec.strategy not in _MODULES:
        raise CacheConfigError(f"Cannot build a cache for {spec.strategy!r}: resolve it to a strategy first.")
    cache: KVCache = strategy_module(spec.strategy).build(config, spec, device=device)
    return cache


def bytes_for(spec: CacheSpec, tokens: int, config: Any, dtype: torch.dtype = torch.float32) -> int:
    """Estimated bytes a cache of `spec` holds after `tokens` tokens (for the advisor and the UI)."""
    return int(strategy_module(spec.strategy).bytes_for(tokens, config, spec, dtype))


def seq_length(cache: KVCache | None) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def cache_bytes(cache: KVCache | None) -> int:
    """Bytes the cache's tensors really hold now (not an estimate); 0 without a cache."""
    return 0 if cache is None else cache.nbytes()


def cache_reserved_bytes(cache: KVCache | None) -> int:
    """Bytes allocated for the cache, spare capacity included; 0 without a cache."""
    return 0 if cache is None else cache.reserved_nbytes()


def availability(device: torch.device) -> dict[str, str | None]:
    """For each strategy: None when usable on `device`, else the reason it is not (for the UI)."""
    reasons: dict[str, str | None] = dict.fromkeys(STRATEGIES)
    if device.type != "cuda":
        reasons["offloaded"] = ("Offloading moves the KV cache from GPU memory to RAM; the model does not run on a "
                                "CUDA GPU here.")
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        reasons["quantized"] = reasons["sink-quantized"] = "optimum-quanto is not installed."
    return reasons


def backend_availability() -> dict[str, str | None]:
    """For each quantization backend: None when installed, else why not."""
    return {
        "quanto": None if importlib.util.find_spec("optimum.quanto") else "optimum-quanto is not installed.",
        "hqq": None if importlib.util.find_spec("hqq") else "HQQ is not installed (pip install hqq).",
    }
