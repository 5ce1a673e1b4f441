"""Many conversations, one memory budget: where each conversation's KV cache lives.

The active conversation's cache is on the compute device. Idle caches move, least recently
used first, to host RAM (pinned when the device is a GPU), then to disk as snapshots
(engine.snapshots), then are dropped and recomputed from the messages when needed. Moves
run on a background thread and never touch the conversation that is generating.
Switching back restores the cache from wherever it is and reports where it came from.

On a CPU-only machine the device and host RAM are the same memory; the two budgets are
then two shares of it.

A model whose layers are split between a GPU and the CPU (engine/layer_split.py) keeps each layer's KV
where the layer runs: an active ("device") cache then holds its GPU layers' bytes against the device
(GPU) budget and its other layers' bytes against the host budget; moving it to RAM frees only the first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from engine import caches
from engine.caches.base import KVCache
from engine.caches.convert import fill
from engine.models import LoadedModel
from engine.reports import CacheRestored
from engine.session import ChatSession
from engine.snapshots import SnapshotStore
from engine.specs import CacheSpec

TIERS = ("device", "ram", "disk", "none")


log = logging.getLogger(__name__)

@dataclass
class _Entry:
    session: ChatSession
    tier: str = "device"
    pending: Future[None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class CachePool:
    """Keeps every conversation's cache within a device budget and a host-RAM budget."""

    def __init__(self, lm: LoadedModel, *, device_budget: int, host_budget: int,
                 snapshots: SnapshotStore | None = None) -> None:
        self.lm = lm
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.snapshots = snapshots
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self.active: int | None = None
        self._mutex = threading.RLock()
        self._mover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachet-cache-mover")
        self.host = torch.device("cpu")
        # The decoder layers that run on a GPU when the model is split (their KV lives there); empty otherwise.
        self.gpu_layers: frozenset[int] = frozenset()
        self.gpu_device = ""  # the GPU those layers run on ("cuda:0")
        if lm.gpu_layers is not None:
            from engine.layer_split import gpu_placement

            self.gpu_device, self.gpu_layers = gpu_placement(lm.model, lm.layers)

    def close(self) -> None:
        self._mover.shutdown(wait=True)

    # ----- bookkeeping -------------------------------------------------------------------------
    def add(self, key: int, session: ChatSession, tier: str = "device") -> None:
        """Register a conversation; `tier="disk"` when a snapshot from an earlier run may hold its cache."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, not {tier!r}")
        with self._mutex:
            self.entries[key] = _Entry(session, tier)
            self.entries.move_to_end(key)

    def session(self, key: int) -> ChatSession | None:
        """The conversation registered as `key`, if any (from any thread)."""
        with self._mutex:
            entry = self.entries.get(key)
        return entry.session if entry is not None else None

    def sessions(self) -> list[tuple[int, ChatSession]]:
        """Every registered conversation, least recently used first (from any thread)."""
        with self._mutex:
            return [(key, entry.session) for key, entry in self.entries.items()]

    def remove(self, key: int) -> None:
        with self._mutex:
            entry = self.entries.pop(key, None)
        if entry is not None and entry.pending is not None:
            entry.pending.result()
        if self.snapshots is not None:
            self.snapshots.delete(key)

    def tier(self, key: int) -> str:
        entry = self.entries[key]
        if entry.session.cache is None and entry.tier in ("device", "ram"):
            return "none"
        return entry.tier

    def bytes_in(self, tier: str) -> int:
        """Bytes the caches in `tier` hold (content; a cache growing in place may hold up to 25% more spare)."""
        with self._mutex:
            return sum(self._bytes(e) for e in self.entries.values() if e.tier == tier)

    def held_bytes(self) -> tuple[int, int]:
        """(device, host): the bytes the device budget and the host budget hold now (see `_placement`)."""
        with self._mutex:
            placed = [self._placement(e, e.tier) for e in self.entries.values()]
        return sum(d for d, _ in placed), sum(h for _, h in placed)

    @staticmethod
    def _bytes(entry: _Entry) -> int:
        # a draft model's cache moves with its chat
        return caches.cache_bytes(entry.session.cache) + entry.session.draft_cache_bytes()

    def _placement(self, entry: _Entry, tier: str) -> tuple[int, int]:
        """(device bytes, host bytes) of `entry` when in `tier`: all on the device, or all in RAM, except a split
        model's active cache, whose layers in RAM (and its draft model's cache) count against the host."""
        total = self._bytes(entry)
        if tier == "ram":
            return 0, total
        if tier != "device":
            return 0, 0
        if not self.gpu_layers:
            return total, 0
        from engine.layer_split import bytes_on_gpu

        on_gpu = bytes_on_gpu(entry.session.cache, self.gpu_layers)
        return on_gpu, total - on_gpu

    # ----- activation --------------------------------------------------------------------------
    def activate(self, key: int, warm: bool = True) -> CacheRestored:
        """Make `key` the active conversation with its cache on the device, ready to reuse.

        With `warm=False` a cache that must be recomputed is left for the next turn, which then
        prefills it as part of its own prompt (reported as "empty": nothing was restored).
        """
        with self._mutex:
            entry = self.entries[key]
            self.entries.move_to_end(key)
            self.active = key
        if entry.pending is not None:
            entry.pending.result()  # a move of this cache was under way: let it finish first
        started = time.perf_counter()
        with entry.lock:
            session = entry.session
            source = entry.tier
            if source in ("device", "ram") and session.cache is None:
                source = "none"
            if source == "ram" and session.cache is not None:
                self._to_device(session.cache)
                if session.draft is not None and session.draft.session.cache is not None:
                    session.draft.session.cache.to(self.lm.device)
            elif source == "disk":
                loaded = self.snapshots.load(key, session) if self.snapshots else None
                source = "disk" if loaded is not None and loaded.ok else "none"
                if source == "disk" and session.cache is not None:
                    self._to_device(session.cache)
            if source == "none":
                source = "recomputed" if session.messages and warm else "empty"
                session.reset_cache()
                entry.tier = "device"  # whatever warming does, the cache it builds is on the device
                if session.messages and warm:
                    session.warm()
            entry.tier = "device"
        restore = CacheRestored(key, source, time.perf_counter() - started, len(session.cached_ids),
                                on_gpu=self.lm.device.type in ("cuda", "mps"))
        self.rebalance()
        return restore

    def _to_device(self, cache: KVCache) -> None:
        """Put a cache back where its layers run: the device, or for a split model each layer on its own device
        (the GPU layers' on the GPU, the others in RAM) — state-space layers too, which their layers read before
        they write (`KVCache.update` moves attention layers back by itself, not those)."""
        if not self.gpu_layers:
            cache.to(self.lm.device)
            return
        gpu = torch.device(self.gpu_device)
        for i, layer in enumerate(cache.layers):
            if hasattr(layer, "to"):
                layer.to(gpu if i in self.gpu_layers else self.host)

    # ----- sharing -----------------------------------------------------------------------------
    def copy_prefix(self, key: int, length: int, spec: CacheSpec) -> KVCache | None:
        """A new cache of `spec`, on the device, holding a copy of the first `length` tokens of `key`'s cache.

        The source is left as it is (its chat goes on with it). Only an exact copy is made: None when
        the source no longer holds those tokens (moved to disk or dropped meanwhile), evicted some
        (attention sinks), or cannot give them back in full precision.
        """
        with self._mutex:
            entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.pending is not None:
            entry.pending.result()  # a move of the source was under way: let it finish
        with entry.lock:
            session, cache = entry.session, entry.session.cache
            if (cache is None or entry.tier not in ("device", "ram") or cache.evicted or length < 1
                    or length > len(session.cached_ids)):
                return None
            content = cache.full_kv()
            if any(kv is None for kv in content):
                return None
            device = self.lm.device
            copied = [(k[..., :length, :].to(device, copy=True), v[..., :length, :].to(device, copy=True))
                      for k, v in (kv for kv in content if kv is not None)]
        return fill(copied, length, spec, self.lm.config, self.lm.device)

    # ----- budgets -----------------------------------------------------------------------------
    def rebalance(self, wait: bool = False) -> None:
        """Schedule moves of idle caches until both budgets hold (in the background).

        Least recently used first at every step: the oldest idle caches leave the device for RAM,
        and the oldest of those in RAM (just moved there or not) go on to disk, so RAM always
        holds the most recently used idle chats.
        """
        with self._mutex:
            device, host = self.held_bytes()
            idle = [(key, entry, *self._placement(entry, entry.tier)) for key, entry in self.entries.items()
                    if key != self.active and entry.session.cache is not None]  # least recently used first
            target = {key: entry.tier for key, entry, _, _ in idle}
            for key, entry, on_device, _ in idle:
                if device <= self.device_budget:
                    break
                if entry.tier == "device" and on_device:
                    target[key] = "ram"
                    device -= on_device
                    host += on_device  # the rest of a split model's cache was in RAM already
            for key, entry, on_device, in_host in idle:
                if host <= self.host_budget:
                    break
                # to disk: those in RAM (moved there just now or before), and a split model's idle caches that
                # still hold layers in RAM
                if target[key] == "ram":
                    host -= in_host + (on_device if entry.tier == "device" else 0)
                elif target[key] == "device" and self.gpu_layers and in_host:
                    host -= in_host
                    device -= on_device
                else:
                    continue
                target[key] = "disk" if self.snapshots else "none"
            plan = [(key, target[key]) for key, entry, _, _ in idle if target[key] != entry.tier]
            for key, tier in plan:
                entry = self.entries[key]
                entry.tier = tier  # accounted at once; the move itself runs in the background
                entry.pending = self._mover.submit(self._move, key, entry, tier)
            futures = [e.pending for e in self.entries.values()]  # wait=True: every move under way, not only these
        if wait:
            for f in futures:
                if f is not None:
                    f.result()

    def _move(self, key: int, entry: _Entry, tier: str) -> None:
        with entry.lock:
            session = entry.session
            if session.cache is None:
                return
            try:
                if tier == "ram":
                    session.cache.to(self.host, pin_memory=self.lm.device.type == "cuda")
                    if session.draft is not None and session.draft.session.cache is not None:
                        session.draft.session.cache.to(self.host, pin_memory=self.lm.device.type == "cuda")
                    session.release_graphs()  # their buffers left the device: captured again on return
                    return
                if tier == "disk" and self.snapshots is not None and self.snapshots.save(key, session) is None:
                    entry.tier = "none"
            except Exception as exc:  # out of RAM, disk full, folder gone: the chat recomputes, never breaks
                log.warning("could not move the cache of %s to %s (%s: %s); it will be recomputed",
                            key, tier, type(exc).__name__, exc)
                entry.tier = "none"
            session.reset_cache()  # a snapshot restores cache and ids together, or the turn recomputes
