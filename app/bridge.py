"""The one worker that owns the model and every chat's engine session, and its GUI-side facade.

`EngineBridge` lives in a `QThread`. It is only ever invoked through queued signals (from
`Engine`, which lives in the GUI thread), and answers with signals carrying small frozen
dataclasses. The GUI thread therefore never waits on the model. The single exception is
`Engine.cancel`, which calls `ChatSession.cancel()` directly: that only sets a
`threading.Event`, and the running turn stops before its next token.

Every chat's cache is kept by one `engine.pool.CachePool` per loaded model, keyed by the chat's
id: the active chat's cache on the device, idle ones moved (on the pool's own thread) to RAM,
then to disk snapshots, within the budgets set here. When Cachet quits, each chat's cache is
saved as a snapshot (engine.snapshots), so a chat resumes after a restart without recomputing.

torch and transformers are imported here, inside the worker thread, after the window is up:
importing them takes seconds.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

Loader = Callable[..., Any]  # returns engine.models.LoadedModel; may take a `progress` keyword

DELTA_STATE_EVERY_S = 0.5  # how often a streaming turn reports its cache's size
MIB = 1024**2
GIB = 1024**3


# ----- what goes to the worker -------------------------------------------------------------------
@dataclass(frozen=True)
class HistoryMessage:
    role: str
    content: str
    complete: bool = True
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TurnRequest:
    """One turn of one chat. `history` is the chat as it was before this action.

    kind: "send" (append `text`), "regenerate" (replace the last reply), "edit" (replace user
    message `index` with `text` and drop what followed), "answer" (reply to the last user message).
    """

    turn_id: int
    chat_id: int
    kind: str
    history: tuple[HistoryMessage, ...]
    system_prompt: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    index: int = -1
    overflow: str | None = None


@dataclass(frozen=True)
class CacheChange:
    """Switch a chat's cache strategy; the worker rebuilds the cache for `history`."""

    chat_id: int
    cache: dict[str, Any]
    history: tuple[HistoryMessage, ...]
    system_prompt: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OpenChat:
    """The user opened a chat: bring its cache back to the device before the next message.

    seq: set by Engine; an opening overtaken by a later one is skipped.
    """

    chat_id: int
    history: tuple[HistoryMessage, ...]
    system_prompt: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    seq: int = 0


@dataclass(frozen=True)
class Budgets:
    """How much the caches of all chats may hold, in bytes.

    device: on the compute device (RAM on a CPU-only machine); 0 = what the memory advisor
        finds free once the model is loaded. host: idle caches in RAM; None = automatic
        (see `resolve_budgets`). disk: snapshots; 0 = no snapshots (no resume after a restart).
    """

    device: int = 0
    host: int | None = None
    disk: int = 4 * GIB


# ----- what comes back ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineInfo:
    """What the engine offers, known once it is imported (before any model is loaded)."""

    strategies: tuple[str, ...]
    lossy: frozenset[str]
    spec_defaults: dict[str, Any]  # CacheSpec field -> default
    sampling_defaults: dict[str, Any]
    overflow_policies: dict[str, str | None]  # policy -> None when available, else why not


@dataclass(frozen=True)
class ModelInfo:
    name: str
    device: str  # "cpu", "cuda:0", ...
    dtype: str
    context_length: int
    weights_bytes: int
    load_seconds: float
    availability: dict[str, str | None]  # strategy -> None when usable, else the reason
    backend_availability: dict[str, str | None]
    auto_cache: dict[str, Any]  # what "auto" means on this machine (the advisor's choice, or dynamic)
    auto_reason: str
    config: Any = field(repr=False, compare=False)  # the model config, read-only, for memory estimates
    torch_dtype: Any = field(repr=False, compare=False)


@dataclass(frozen=True)
class TurnStarted:
    chat_id: int
    turn_id: int


@dataclass(frozen=True)
class TokenDelta:
    """Text streamed into a reply. restart: the reply starts over (a retry) and `text` replaces it."""

    chat_id: int
    turn_id: int
    text: str
    restart: bool = False


@dataclass(frozen=True)
class CacheRestored:
    """Where a chat's cache came from when it was made active, and how long that took.

    source: "device" (it was there already), "ram", "disk" (a snapshot), "recomputed" (from the
    messages) or "empty" (nothing to restore).
    """

    chat_id: int
    source: str
    seconds: float
    tokens: int
    on_gpu: bool = False

    @property
    def worth_telling(self) -> bool:
        return self.source in ("ram", "disk", "recomputed")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seconds": self.seconds, "tokens": self.tokens, "on_gpu": self.on_gpu}


def describe_restore(restore: dict[str, Any] | CacheRestored) -> str:
    """"cache restored from disk in 120 ms (1,234 tokens)", for the status bar and a reply's hover."""
    r = restore.to_dict() if isinstance(restore, CacheRestored) else restore
    source = str(r.get("source", ""))
    seconds = float(r.get("seconds", 0.0))
    took = f"{seconds * 1000:,.0f} ms" if seconds < 1 else f"{seconds:,.1f} s"
    tokens = int(r.get("tokens", 0))
    count = f" ({tokens:,} tokens)" if tokens else ""
    if source == "device":
        return "cache was already on the GPU" if r.get("on_gpu") else "cache was already in memory"
    if source == "ram":
        return f"cache restored from RAM in {took}{count}"
    if source == "disk":
        return f"cache restored from disk in {took}{count}"
    if source == "recomputed":
        return f"cache recomputed from the messages in {took}{count}"
    return "no cache yet"


@dataclass(frozen=True)
class TurnDone:
    """A turn's end. finish_reason: stop | length | cancelled | error | overflow."""

    chat_id: int
    turn_id: int
    reply: str
    finish_reason: str
    has_reply: bool = False  # the session stored a reply (possibly partial)
    token_ids: tuple[int, ...] = ()
    user_tokens: int | None = None
    stats: dict[str, Any] | None = None  # TurnStats as a dict, plus "restore": CacheRestored.to_dict()
    error: str | None = None
    prompt_tokens: int = 0
    context_length: int = 0
    notice: str | None = None  # something the worker did that the user should know, in one sentence
    cache: dict[str, Any] | None = None  # the chat's new cache settings, when the worker switched them


@dataclass(frozen=True)
class CacheState:
    """Where a chat's KV cache is and how big. where: "gpu" | "ram" | "disk" | "none"."""

    chat_id: int
    where: str
    tokens: int
    bytes: int
    strategy: str


@dataclass(frozen=True)
class RebuildDone:
    """A strategy switch ended. how: "converted" (the cache was converted in place), "recompute"
    (rebuilt from the messages) or "unchanged"."""

    chat_id: int
    ok: bool
    cache: dict[str, Any]
    how: str = "recompute"
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


def call_loader(loader: Loader, progress: Callable[[str], None]) -> Any:
    """Call `loader(progress=...)` when it takes a `progress` argument, else `loader()`."""
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    return loader(progress=progress) if "progress" in params else loader()


def resolve_budgets(budgets: Budgets, hardware: Any, advised_kv: int | None) -> tuple[int, int]:
    """(device, host) budgets in bytes for `hardware` (an engine.memory.HardwareProfile).

    Automatic device budget: what the advisor finds free for KV (half the free memory without
    advice). Automatic host budget: a quarter of the RAM with a GPU; on a CPU-only machine the
    device budget already is RAM, so only a small share (5%, at most 512 MiB).
    """
    if budgets.device > 0:
        device = budgets.device
    elif advised_kv is not None:
        device = max(advised_kv, 0)
    else:
        device = hardware.accelerator_free // 2
    if budgets.host is not None:
        host = budgets.host
    elif hardware.has_gpu:
        host = hardware.ram_total // 4
    else:
        host = min(hardware.ram_total // 20, 512 * MIB)
    return device, host


def effective_cache(cache: dict[str, Any], auto: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cache settings to build: "auto" becomes `auto` (the advisor's choice), else dynamic."""
    spec = dict(cache)
    if spec.get("strategy", "auto") == "auto":
        spec = {**spec, **(auto or {})}
        if spec.get("strategy", "auto") == "auto":
            spec["strategy"] = "dynamic"
    return spec


class _Closing(Exception):
    """The app is quitting while a model loads."""


class EngineSignals(QObject):
    """The worker's answers, declared once: the bridge emits them in the worker thread and the
    GUI-thread Engine re-emits them (connected signal to signal, so they arrive queued).

    Signals:
        engine_info(EngineInfo): the engine is imported.
        load_progress(str): a step of loading the model.
        model_ready(ModelInfo) / model_failed(str): the model is loaded, or why not.
        turn_started(TurnStarted), token_delta(TokenDelta), turn_done(TurnDone): one turn.
        cache_restored(CacheRestored): a chat was made active (opened, or before a turn).
        cache_state(CacheState): a chat's cache changed size or place.
        rebuild_started(int), rebuild_done(RebuildDone): a cache strategy switch.
        status(str): a one-line message for the status bar (e.g. a library being loaded).
    """

    engine_info = Signal(object)
    load_progress = Signal(str)
    model_ready = Signal(object)
    model_failed = Signal(str)
    turn_started = Signal(object)
    token_delta = Signal(object)
    turn_done = Signal(object)
    cache_restored = Signal(object)
    cache_state = Signal(object)
    rebuild_started = Signal(int)
    rebuild_done = Signal(object)
    status = Signal(str)


ANSWERS = ("engine_info", "load_progress", "model_ready", "model_failed", "turn_started", "token_delta", "turn_done",
           "cache_restored", "cache_state", "rebuild_started", "rebuild_done", "status")


class EngineBridge(EngineSignals):
    """Owns the LoadedModel, one ChatSession per chat and the pool that keeps their caches; runs
    in the worker thread and answers through the EngineSignals.
    """

    def __init__(self, snapshot_dir: Path | None = None) -> None:
        super().__init__()
        self.lm: Any = None
        self.pool: Any = None  # engine.pool.CachePool for the loaded model
        self.snapshot_dir = snapshot_dir
        self._sessions: dict[int, Any] = {}  # read by cancel() from the GUI thread: never pop-and-reinsert
        self._lock = threading.Lock()
        self._cancelled_turns: set[int] = set()
        self._running: tuple[int, int] | None = None  # (chat_id, turn_id)
        self._budgets = Budgets()
        self._advised_kv: int | None = None
        self._hardware: Any = None
        self._auto: dict[str, Any] = {"strategy": "dynamic"}
        self._shown: dict[int, CacheState] = {}  # the last place reported for each chat
        self._opened: dict[int, CacheRestored] = {}  # restores done on opening, told with the next reply
        self.latest_open = 0  # written by the GUI thread: the newest OpenChat's seq
        self.closing = False

    # ----- called from the GUI thread ----------------------------------------------------------
    def cancel(self, chat_id: int, turn_id: int | None) -> None:
        """Thread-safe: stop the chat's running turn, or skip it if it has not started yet."""
        if turn_id is not None:
            with self._lock:
                self._cancelled_turns.add(turn_id)
        session = self._sessions.get(chat_id)
        running = self._running
        if session is not None and running is not None and running[0] == chat_id:
            session.cancel()

    def cancel_all(self) -> None:
        self.closing = True
        for session in list(self._sessions.values()):
            session.cancel()

    def _is_cancelled(self, turn_id: int) -> bool:
        with self._lock:
            return self.closing or turn_id in self._cancelled_turns

    # ----- slots (worker thread) ---------------------------------------------------------------
    @Slot(object)
    def load_model(self, loader: Loader) -> None:
        self._close_pool(save=False)  # snapshots of another model would not fit it
        self.lm = None
        self._sessions.clear()
        self._shown.clear()
        self._opened.clear()
        try:
            self.load_progress.emit("Starting the engine…")
            self.engine_info.emit(self._engine_info())
            def progress(text: str) -> None:
                if self.closing:  # the app quits: stop at the loader's next step instead of finishing
                    raise _Closing
                self.load_progress.emit(text)

            lm = call_loader(loader, progress)
            info = self._model_info(lm)
            self.lm = lm
            self._start_pool()
        except _Closing:
            self.lm = None
            return
        except Exception as exc:  # a model that fails to load must never take the app down
            self.lm = None
            self.model_failed.emit(_describe(exc))
            return
        self.model_ready.emit(info)
        self._announce_snapshots()

    @Slot(object)
    def set_budgets(self, budgets: Budgets) -> None:
        self._budgets = budgets
        if self.pool is None:
            return  # applied when the pool is made
        self.pool.device_budget, self.pool.host_budget = self._resolved_budgets()
        if budgets.disk <= 0:
            self.pool.snapshots = None
        elif self.pool.snapshots is None:
            self.pool.snapshots = self._snapshot_store()
        else:
            self.pool.snapshots.budget_bytes = budgets.disk
            self.pool.snapshots.enforce_budget()
        self._rebalance()

    @Slot()
    def shutdown(self) -> None:
        """Cachet quits: save every chat's cache as a snapshot, so it resumes after a restart."""
        self._close_pool(save=True)

    @Slot(int)
    def forget(self, chat_id: int) -> None:
        """Drop a chat's session, cache and snapshot (the chat was deleted)."""
        self._sessions.pop(chat_id, None)
        self._shown.pop(chat_id, None)
        self._opened.pop(chat_id, None)
        if self.pool is not None:
            self.pool.remove(str(chat_id))

    @Slot(object)
    def open_chat(self, req: OpenChat) -> None:
        """Bring an opened chat's cache back to the device now, so its next reply starts at once."""
        if self.lm is None or self.pool is None or self.closing or req.seq != self.latest_open:
            return  # another chat was opened since: skip this one
        try:
            _session, restore, _how = self._open(req.chat_id, req.system_prompt, req.sampling, req.cache,
                                                 req.history)
        except Exception:  # the next turn tries again and reports what went wrong
            self._emit_state(req.chat_id)
            return
        if restore.source != "device":
            self._opened[req.chat_id] = restore
        self.cache_restored.emit(restore)
        self._emit_state(req.chat_id)
        self._emit_moves()

    @Slot(object)
    def run_turn(self, req: TurnRequest) -> None:
        if self._is_cancelled(req.turn_id):
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "cancelled"))
            return
        if self.lm is None or self.pool is None:
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "error",
                                         error="No model is loaded. Choose one in Settings (Ctrl+,)."))
            return
        from engine.session import ContextOverflowError

        self.turn_started.emit(TurnStarted(req.chat_id, req.turn_id))
        self._running = (req.chat_id, req.turn_id)
        notice: str | None = None
        switched: dict[str, Any] | None = None
        try:
            for attempt in (1, 2):  # a reply that runs out of memory is retried once with a leaner cache
                failure: Exception | None = None
                try:
                    session, restore, _how = self._open(req.chat_id, req.system_prompt, req.sampling, req.cache,
                                                        req.history, req.overflow)
                    restore = self._opened.pop(req.chat_id, restore) if restore.source == "device" else restore
                    self._opened.pop(req.chat_id, None)
                    self.cache_restored.emit(restore)
                    self._emit_moves()
                    result = self._act(session, req)
                    error = result.stats.error if result.stats.finish_reason == "error" else None
                except ContextOverflowError:
                    raise
                except Exception as exc:
                    if attempt == 2 or not _out_of_memory(exc):
                        raise
                    failure, error = exc, _describe(exc)
                if attempt == 1 and error is not None and _out_of_memory(error) and not self._is_cancelled(
                        req.turn_id):
                    leaner = self._go_leaner(req.chat_id)
                    if leaner is not None:
                        notice, spec = leaner
                        switched = spec
                        req = replace(req, cache=spec)
                        self.token_delta.emit(TokenDelta(req.chat_id, req.turn_id, "", restart=True))
                        continue
                if failure is not None:
                    raise failure
                break
        except ContextOverflowError as exc:
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "overflow", error=str(exc),
                                         prompt_tokens=exc.prompt_tokens, context_length=exc.context_length,
                                         notice=notice, cache=switched))
            return
        except Exception as exc:  # a strategy not written yet, a bad setting, ...: tell, never crash
            if self._is_cancelled(req.turn_id):  # Stop while the cache was being restored or recomputed
                self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "cancelled", notice=notice,
                                             cache=switched))
            else:
                self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "error", error=_describe(exc),
                                             notice=notice, cache=switched))
            return
        finally:
            self._running = None
            with self._lock:
                self._cancelled_turns.discard(req.turn_id)
        last = session.messages[-1] if session.messages else None
        has_reply = last is not None and last.role == "assistant"
        user = next((m for m in reversed(session.messages) if m.role == "user"), None)
        stats = result.stats
        asked = self._effective(req.cache).get("strategy")
        if switched is None and stats.overflow_action and session.settings.cache.strategy != asked:
            # The overflow policy moved the chat to another strategy (attention sinks): keep it, or the
            # next turn would switch back to the stored one and recompute the whole chat every time.
            switched = session.settings.cache.to_dict()
        self._emit_state(req.chat_id)  # before the turn's end, so that the end finds it current
        self.turn_done.emit(TurnDone(
            req.chat_id, req.turn_id, result.reply, stats.finish_reason, has_reply=has_reply,
            token_ids=tuple(last.token_ids or ()) if has_reply and last is not None else (),
            user_tokens=_count_tokens(self.lm, user.content) if user is not None else None,
            stats={**stats.to_dict(), "restore": restore.to_dict()}, error=stats.error, notice=notice,
            cache=switched,
        ))
        self._rebalance()

    @Slot(object)
    def change_cache(self, req: CacheChange) -> None:
        """Switch a chat's strategy: convert its cache where the engine can, else recompute it now."""
        self.rebuild_started.emit(req.chat_id)
        started = time.perf_counter()
        from engine import caches

        try:
            if self.lm is None or self.pool is None:
                raise RuntimeError("No model is loaded.")
            spec = caches.CacheSpec.from_dict(self._effective(req.cache)).validate()
            session, _restore, how = self._open(req.chat_id, req.system_prompt, req.sampling, req.cache,
                                                req.history)
            if how in ("new", "unchanged"):
                how = "recompute"
            if session.cache is None:
                how = "recompute"
                if session.messages:
                    session.next_token_logits()  # recompute the conversation into the new cache
                else:
                    session.cache = caches.build_cache(spec, self.lm.config)  # fail now if it cannot be built
        except Exception as exc:
            session = self._sessions.get(req.chat_id)
            if session is not None:
                session.reset_cache()
            self.rebuild_done.emit(RebuildDone(req.chat_id, False, req.cache, error=_describe(exc)))
            self._emit_state(req.chat_id)
            return
        self._emit_state(req.chat_id)  # before the notice, so that the meters show the new cache with it
        self.rebuild_done.emit(RebuildDone(
            req.chat_id, True, req.cache, how=how, tokens=len(session.cached_ids),
            bytes=caches.cache_bytes(session.cache), seconds=time.perf_counter() - started,
        ))
        self._rebalance()

    # ----- the pool ---------------------------------------------------------------------------------
    def _snapshot_store(self) -> Any:
        if self._budgets.disk <= 0:
            return None
        from engine import paths
        from engine.snapshots import SnapshotStore

        # Next to the chats they belong to: snapshots are named after chat ids, which only mean
        # something in their own data folder.
        return SnapshotStore(self.snapshot_dir or paths.data_dir() / "snapshots", self._budgets.disk)

    def _resolved_budgets(self) -> tuple[int, int]:
        hardware = self._hardware
        if hardware is None:
            from engine import memory

            hardware = self._hardware = memory.read_hardware(self.lm.device)
        return resolve_budgets(self._budgets, hardware, self._advised_kv)

    def _start_pool(self) -> None:
        from engine.pool import CachePool

        device, host = self._resolved_budgets()
        self.pool = CachePool(self.lm, device_budget=device, host_budget=host, snapshots=self._snapshot_store())

    def _close_pool(self, save: bool) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        pool.close()  # lets moves under way finish
        if save and pool.snapshots is not None:
            self._save_snapshots(pool)

    def _save_snapshots(self, pool: Any) -> None:
        """Save each chat whose cache is in memory, most recently used first, while the disk budget lasts."""
        from engine.caches.shape import KVShape

        store = pool.snapshots
        per_token = KVShape.of(self.lm.config).bytes_per_token(self.lm.dtype)
        used = store.total_bytes()
        saved: list[Path] = []
        for key, entry in reversed(pool.entries.items()):
            session = entry.session
            if entry.tier not in ("device", "ram") or session.cache is None or not session.cached_ids:
                continue
            size = per_token * len(session.cached_ids)  # snapshots hold full precision
            if saved and used + size > store.budget_bytes:
                continue  # saving it would push out a more recently used chat's snapshot
            try:
                path = store.save(key, session)
            except Exception:  # a full disk must not stop Cachet from quitting
                continue
            if path is not None:
                saved.append(path)
                used = store.total_bytes()
        for path in reversed(saved):  # the store evicts the oldest files first: date them by use
            if path.exists():
                os.utime(path)

    def _announce_snapshots(self) -> None:
        """Tell the window which chats have a snapshot on disk from an earlier run."""
        store = self.pool.snapshots if self.pool is not None else None
        if store is None:
            return
        for path in store.files():
            if path.stem.isdigit():
                chat_id = int(path.stem)
                self._report(CacheState(chat_id, "disk", _snapshot_tokens(path), 0, ""))

    def _open(self, chat_id: int, system_prompt: str, sampling: dict[str, Any], cache: dict[str, Any],
              history: tuple[HistoryMessage, ...], overflow: str | None = None) -> tuple[Any, CacheRestored, str]:
        """The chat's session, with its cache active on the device and the requested settings.

        Returns:
            (session, where its cache came from, how the cache strategy changed: "new" for a new
            session, else "unchanged", "converted" or "recompute").
        """
        from engine.caches import CacheSpec
        from engine.sampling import SamplingSettings
        from engine.session import ChatSession, SessionSettings

        known = {f.name for f in fields(SamplingSettings)}
        sampling_settings = SamplingSettings(**{k: v for k, v in sampling.items() if k in known}).validate()
        spec = CacheSpec.from_dict(self._effective(cache)).validate()
        if spec.strategy in ("quantized", "sink-quantized"):
            self._warm_quantization(spec.backend)
        key = str(chat_id)
        session = self._sessions.get(chat_id)
        created = session is None
        if session is None:
            session = ChatSession(self.lm, SessionSettings(system_prompt, sampling_settings, spec))
            self._sessions[chat_id] = session
            store = self.pool.snapshots
            # A snapshot from an earlier run: activating restores it (or, if it no longer fits this
            # model or strategy, deletes it and recomputes).
            on_disk = store is not None and store.path(key).is_file()
            self.pool.add(key, session, tier="disk" if on_disk else "device")
        else:
            session.set_system_prompt(system_prompt)
            session.set_sampling(sampling_settings)
        if overflow is not None and "overflow" in {f.name for f in fields(session.settings)}:
            session.settings.overflow = overflow
        session.messages = [_to_message(m) for m in history]
        restore = self._activate(chat_id, session)
        how = "new" if created else self._switch(session, spec)  # after activating: the cache is here now
        return session, restore, how

    def _warm_quantization(self, backend: str) -> None:
        """Import the quantization library once (seconds), telling the user why the first turn waits."""
        from engine.caches import quantized

        try:
            seconds = quantized.warm_up(backend, progress=self.status.emit)
        except Exception:  # an unusable backend is reported by the cache build with its reason
            return
        if seconds >= 0.5:
            self.status.emit(f"Quantization library ready ({seconds:.1f} s, once per run).")

    def _activate(self, chat_id: int, session: Any) -> CacheRestored:
        key = str(chat_id)
        # Nothing to restore and too long to recompute as it stands: the turn applies the overflow
        # policy first (or says it cannot), so do not prefill it here.
        warm = not (self.pool.tier(key) == "none" and session.messages and not session.context_status().fits)
        restore = self.pool.activate(key, warm=warm)
        return CacheRestored(chat_id, restore.source, restore.seconds, restore.tokens, on_gpu=self._on_gpu())

    def _rebalance(self) -> None:
        """Let the pool move idle caches within the budgets (on its own thread), and show where they went."""
        if self.pool is not None:
            self.pool.rebalance()
            self._emit_moves()

    def _go_leaner(self, chat_id: int) -> tuple[str, dict[str, Any]] | None:
        """The reply ran out of memory: move every idle cache off the device and give this chat a
        leaner strategy (4-bit quantized; if it already is, attention sinks).

        Returns:
            (one sentence for the user, the chat's new cache settings), or None when there is
            nothing leaner to switch to.
        """
        from engine import caches, memory

        session = self._sessions.get(chat_id)
        if session is None or self.pool is None:
            return None
        current = session.settings.cache.strategy
        available = caches.availability(self.lm.device)
        sink = next(s for _, s in memory.candidate_specs(self.lm.config, self.lm.context_length)
                    if s.strategy == "sink")
        if current in ("sink", "sink-quantized"):
            return None
        if current != "quantized" and available.get("quantized") is None:
            spec = caches.CacheSpec(strategy="quantized", **caches.quantization_defaults(4))
            what = "a 4-bit quantized cache"
        else:
            spec = sink
            what = f"attention sinks (it keeps the start and the last {sink.window:,} tokens)"
        budget, self.pool.device_budget = self.pool.device_budget, 0
        try:
            self.pool.rebalance(wait=True)
        finally:
            self.pool.device_budget = budget
        self._emit_moves()
        if self.lm.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        try:
            session.set_cache_spec(spec)
        except Exception:  # converting needs memory too: rebuild from the messages instead
            session.reset_cache()
            session.settings.cache = spec
        where = "the GPU" if self._on_gpu() else "memory"
        return (f"Memory ran out while writing this reply, so Cachet moved the other chats' caches out of {where}, "
                f"switched this chat to {what}, and wrote the reply again.", spec.to_dict())

    # ----- helpers ----------------------------------------------------------------------------------
    def _act(self, session: Any, req: TurnRequest) -> Any:
        on_delta = self._delta_sender(req, session)
        if req.kind == "send":
            return session.send(req.text, on_delta)
        if req.kind == "regenerate":
            return session.regenerate(on_delta)
        if req.kind == "edit":
            return session.edit(req.index, req.text, on_delta)
        return session.generate(on_delta)

    def _on_gpu(self) -> bool:
        return self.lm is not None and self.lm.device.type in ("cuda", "mps")

    def _engine_info(self) -> EngineInfo:
        from engine import caches, session
        from engine.sampling import SamplingSettings

        names = {f.name for f in fields(session.SessionSettings)}
        declared = getattr(session, "OVERFLOW_POLICIES", None)
        if "overflow" in names and declared:
            policies: dict[str, str | None] = dict.fromkeys(declared)
        else:
            reason = "Not available yet: this version of the engine has no overflow policies."
            policies = {"stop": None, "truncate-middle": reason, "sink": reason}
        return EngineInfo(
            strategies=tuple(caches.STRATEGIES), lossy=frozenset(caches.LOSSY),
            spec_defaults=caches.CacheSpec().to_dict(), sampling_defaults=SamplingSettings().to_dict(),
            overflow_policies=policies,
        )

    def _model_info(self, lm: Any) -> ModelInfo:
        from engine import caches

        availability = dict(caches.availability(lm.device))
        for strategy in caches.STRATEGIES:
            if availability.get(strategy):
                continue
            try:  # import now, in the worker: some strategies pull in heavy libraries
                caches.strategy_module(strategy)
            except Exception as exc:
                availability[strategy] = f"Not in this build yet ({type(exc).__name__}: {exc})."
        self._auto, reason, advice = _advise(lm)
        self._advised_kv = advice.kv_budget if advice is not None else None
        self._hardware = advice.hardware if advice is not None else None
        return ModelInfo(
            name=lm.source.display_name, device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."),
            context_length=lm.context_length, weights_bytes=lm.weights_bytes, load_seconds=lm.load_seconds,
            availability=availability, backend_availability=caches.backend_availability(),
            auto_cache=dict(self._auto), auto_reason=reason, config=lm.config, torch_dtype=lm.dtype,
        )

    def _effective(self, cache: dict[str, Any]) -> dict[str, Any]:
        return effective_cache(cache, self._auto)

    def _switch(self, session: Any, spec: Any) -> str:
        """Give a session another cache spec: converted by the engine where it can, else dropped."""
        if session.settings.cache == spec:
            return "unchanged"
        convert = getattr(session, "set_cache_spec", None)
        if callable(convert):
            return str(convert(spec))
        session.settings.cache = spec
        session.reset_cache()
        return "recompute"

    def _delta_sender(self, req: TurnRequest, session: Any) -> Callable[[str], None]:
        last_state = time.monotonic()

        def on_delta(text: str) -> None:
            nonlocal last_state
            self.token_delta.emit(TokenDelta(req.chat_id, req.turn_id, text))
            if self._is_cancelled(req.turn_id):
                session.cancel()  # a Stop that raced with the turn's start
            now = time.monotonic()
            if now - last_state >= DELTA_STATE_EVERY_S:
                last_state = now
                self._emit_state(req.chat_id)

        return on_delta

    def _state(self, chat_id: int) -> CacheState | None:
        """Where the pool keeps a chat's cache: "gpu" (the device, when it is a GPU), "ram", "disk" or "none"."""
        from engine import caches

        session = self._sessions.get(chat_id)
        if session is None or self.pool is None or str(chat_id) not in self.pool.entries:
            return None
        strategy = session.settings.cache.strategy
        tier = self.pool.tier(str(chat_id))
        device = "gpu" if self._on_gpu() and strategy != "offloaded" else "ram"  # a CPU's device is RAM
        where = device if tier == "device" else tier
        if where in ("disk", "none"):
            before = self._shown.get(chat_id)
            tokens = before.tokens if before is not None and where == "disk" else 0
            return CacheState(chat_id, where, tokens, 0, strategy)
        cache = session.cache  # the pool's mover may drop it meanwhile: read it once
        return CacheState(chat_id, where, len(session.cached_ids), caches.cache_bytes(cache), strategy)

    def _report(self, state: CacheState) -> None:
        self._shown[state.chat_id] = state
        self.cache_state.emit(state)

    def _emit_state(self, chat_id: int) -> None:
        state = self._state(chat_id)
        if state is None:
            session = self._sessions.get(chat_id)
            state = CacheState(chat_id, "none", 0, 0, session.settings.cache.strategy if session is not None else "")
        self._report(state)

    def _emit_moves(self) -> None:
        """Report every chat whose cache the pool has moved since it was last reported."""
        for chat_id in list(self._sessions):
            state = self._state(chat_id)
            before = self._shown.get(chat_id)
            if state is not None and (before is None or before.where != state.where):
                self._report(state)


def _out_of_memory(error: BaseException | str | None) -> bool:
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    return bool(error) and "OutOfMemoryError" in str(error)


def _snapshot_tokens(path: Path) -> int:
    """How many tokens a snapshot holds, from its header (0 when it cannot be read)."""
    try:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return len(json.loads((fh.metadata() or {}).get("token_ids", "[]")))
    except Exception:  # a damaged file: loading it later deletes it
        return 0


def _advise(lm: Any) -> tuple[dict[str, Any], str, Any]:
    """What "auto" means for this model here, and the advice itself (None when there is none)."""
    try:
        from engine import memory

        advice = memory.advise(lm.config, memory.read_hardware(lm.device), dtype=lm.dtype,
                               weights_bytes=lm.weights_bytes, weights_loaded=True)
    except Exception as exc:  # no advisor in this engine, or it failed: the full cache
        return {"strategy": "dynamic"}, f"auto means dynamic (no advice: {type(exc).__name__}).", None
    if advice.recommended is None:
        return {"strategy": "dynamic"}, f"auto means dynamic. {advice.explanation}", advice
    return (advice.recommended.spec.to_dict(), f"auto means {advice.recommended.label}: {advice.explanation}",
            advice)


def _count_tokens(lm: Any, text: str) -> int:
    return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _to_message(m: HistoryMessage) -> Any:
    from engine.session import Message

    return Message(m.role, m.content, complete=m.complete,
                   token_ids=list(m.token_ids) if m.token_ids is not None else None)


def _describe(exc: BaseException) -> str:
    """An error as the user should read it: our own errors by their message, others with their type."""
    ours: tuple[type[BaseException], ...] = ()
    try:
        from engine.caches import CacheConfigError
        from engine.models import ModelLoadError
        from engine.sampling import SamplingError

        ours = (ModelLoadError, CacheConfigError, SamplingError)
    except Exception:  # the engine itself failed to import
        pass
    if ours and isinstance(exc, ours):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Engine(EngineSignals):
    """The GUI thread's handle on the worker: starts it, sends it requests, re-emits its answers.

    The bridge's signals are connected signal-to-signal to these, whose owner lives in the GUI
    thread, so every answer arrives queued on the GUI thread.
    """

    _load = Signal(object)
    _turn = Signal(object)
    _open = Signal(object)
    _change_cache = Signal(object)
    _forget = Signal(int)
    _budgets = Signal(object)
    _shutdown = Signal()

    def __init__(self, loader: Loader, parent: QObject | None = None, snapshot_dir: Path | None = None) -> None:
        super().__init__(parent)
        self.loader = loader
        self.info: EngineInfo | None = None
        self.model: ModelInfo | None = None
        self.loading = False
        self.load_error: str | None = None
        self._thread = QThread()
        self._thread.setObjectName("cachet-engine")
        self._open_seq = 0
        self._bridge = EngineBridge(snapshot_dir)
        self._bridge.moveToThread(self._thread)
        self._thread.finished.connect(self._bridge.deleteLater)
        for name in ANSWERS:
            getattr(self._bridge, name).connect(getattr(self, name))
        self._load.connect(self._bridge.load_model)
        self._turn.connect(self._bridge.run_turn)
        self._open.connect(self._bridge.open_chat)
        self._change_cache.connect(self._bridge.change_cache)
        self._forget.connect(self._bridge.forget)
        self._budgets.connect(self._bridge.set_budgets)
        # shutdown() waits for the worker to save the caches before it stops the thread
        self._shutdown.connect(self._bridge.shutdown, Qt.ConnectionType.BlockingQueuedConnection)
        self.engine_info.connect(self._remember_info)
        self.model_ready.connect(self._remember_model)
        self.model_failed.connect(self._remember_failure)

    @property
    def ready(self) -> bool:
        return self.model is not None

    def start(self) -> None:
        if not self._thread.isRunning():
            self._thread.start()
        self.load(self.loader)

    def load(self, loader: Loader) -> None:
        self.loader = loader
        self.model = None
        self.loading = True
        self.load_error = None
        self._load.emit(loader)

    def run_turn(self, req: TurnRequest) -> None:
        self._turn.emit(req)

    def open_chat(self, req: OpenChat) -> None:
        """Restore an opened chat's cache ahead of its next turn; a later opening supersedes it."""
        self._open_seq += 1
        self._bridge.latest_open = self._open_seq
        self._open.emit(replace(req, seq=self._open_seq))

    def change_cache(self, req: CacheChange) -> None:
        self._change_cache.emit(req)

    def forget(self, chat_id: int) -> None:
        self._forget.emit(chat_id)

    def set_budgets(self, budgets: Budgets) -> None:
        self._budgets.emit(budgets)

    def cancel(self, chat_id: int, turn_id: int | None) -> None:
        self._bridge.cancel(chat_id, turn_id)

    def shutdown(self) -> None:
        """Stop every turn, save every chat's cache as a snapshot, and join the worker thread."""
        if self._thread.isRunning():
            self._bridge.cancel_all()
            self._shutdown.emit()  # blocks until the worker has saved them
            self._thread.quit()
            self._thread.wait()

    @Slot(object)
    def _remember_info(self, info: EngineInfo) -> None:
        self.info = info

    @Slot(object)
    def _remember_model(self, info: ModelInfo) -> None:
        self.model = info
        self.loading = False

    @Slot(str)
    def _remember_failure(self, message: str) -> None:
        self.loading = False
        self.load_error = message
