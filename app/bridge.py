"""The one worker that owns the model and every chat's engine session, and its GUI-side facade.

`EngineBridge` lives in a `QThread`. It is only ever invoked through queued signals (from
`Engine`, which lives in the GUI thread), and answers with signals carrying small frozen
dataclasses. The GUI thread therefore never waits on the model. The single exception is
`Engine.cancel`, which calls `ChatSession.cancel()` directly: that only sets a
`threading.Event`, and the running turn stops before its next token.

torch and transformers are imported here, inside the worker thread, after the window is up:
importing them takes seconds.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

Loader = Callable[..., Any]  # returns engine.models.LoadedModel; may take a `progress` keyword

DELTA_STATE_EVERY_S = 0.5  # how often a streaming turn reports its cache's size


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
    chat_id: int
    turn_id: int
    text: str


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
    stats: dict[str, Any] | None = None
    error: str | None = None
    prompt_tokens: int = 0
    context_length: int = 0


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


def effective_cache(cache: dict[str, Any], auto: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cache settings to build: "auto" becomes `auto` (the advisor's choice), else dynamic."""
    spec = dict(cache)
    if spec.get("strategy", "auto") == "auto":
        spec = {**spec, **(auto or {})}
        if spec.get("strategy", "auto") == "auto":
            spec["strategy"] = "dynamic"
    return spec


class EngineBridge(QObject):
    """Owns the LoadedModel and one ChatSession per chat; runs in the worker thread.

    Signals:
        engine_info(EngineInfo): the engine is imported.
        load_progress(str): a step of loading the model.
        model_ready(ModelInfo) / model_failed(str): the model is loaded, or why not.
        turn_started(TurnStarted), token_delta(TokenDelta), turn_done(TurnDone): one turn.
        cache_state(CacheState): a chat's cache changed size or place.
        rebuild_started(int), rebuild_done(RebuildDone): a cache strategy switch.
    """

    engine_info = Signal(object)
    load_progress = Signal(str)
    model_ready = Signal(object)
    model_failed = Signal(str)
    turn_started = Signal(object)
    token_delta = Signal(object)
    turn_done = Signal(object)
    cache_state = Signal(object)
    rebuild_started = Signal(int)
    rebuild_done = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.lm: Any = None
        self._sessions: dict[int, Any] = {}  # read by cancel() from the GUI thread: never pop-and-reinsert
        self._used_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._cancelled_turns: set[int] = set()
        self._running: tuple[int, int] | None = None  # (chat_id, turn_id)
        self._kv_budget = 0
        self._auto: dict[str, Any] = {"strategy": "dynamic"}
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
        self.lm = None
        self._sessions.clear()
        self._used_at.clear()
        try:
            self.load_progress.emit("Starting the engine…")
            self.engine_info.emit(self._engine_info())
            lm = call_loader(loader, self.load_progress.emit)
            info = self._model_info(lm)
        except Exception as exc:  # a model that fails to load must never take the app down
            self.model_failed.emit(_describe(exc))
            return
        self.lm = lm
        self.model_ready.emit(info)

    @Slot(int)
    def set_kv_budget(self, budget_bytes: int) -> None:
        self._kv_budget = max(0, int(budget_bytes))
        self._enforce_budget(keep=None)

    @Slot(int)
    def forget(self, chat_id: int) -> None:
        """Drop a chat's session and cache (the chat was deleted)."""
        self._sessions.pop(chat_id, None)
        self._used_at.pop(chat_id, None)

    @Slot(object)
    def run_turn(self, req: TurnRequest) -> None:
        if self._is_cancelled(req.turn_id):
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "cancelled"))
            return
        if self.lm is None:
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "error",
                                         error="No model is loaded. Choose one in Settings (Ctrl+,)."))
            return
        from engine.session import ContextOverflowError

        self.turn_started.emit(TurnStarted(req.chat_id, req.turn_id))
        self._running = (req.chat_id, req.turn_id)
        try:
            session = self._session(req.chat_id, req.system_prompt, req.sampling, req.cache)
            if req.overflow is not None and "overflow" in {f.name for f in fields(session.settings)}:
                session.settings.overflow = req.overflow
            session.messages = [_to_message(m) for m in req.history]
            on_delta = self._delta_sender(req, session)
            if req.kind == "send":
                result = session.send(req.text, on_delta)
            elif req.kind == "regenerate":
                result = session.regenerate(on_delta)
            elif req.kind == "edit":
                result = session.edit(req.index, req.text, on_delta)
            else:
                result = session.generate(on_delta)
        except ContextOverflowError as exc:
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "overflow", error=str(exc),
                                         prompt_tokens=exc.prompt_tokens, context_length=exc.context_length))
            return
        except Exception as exc:  # a strategy not written yet, a bad setting, ...: tell, never crash
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "error", error=_describe(exc)))
            return
        finally:
            self._running = None
            with self._lock:
                self._cancelled_turns.discard(req.turn_id)
        last = session.messages[-1] if session.messages else None
        has_reply = last is not None and last.role == "assistant"
        user = next((m for m in reversed(session.messages) if m.role == "user"), None)
        stats = result.stats
        self.turn_done.emit(TurnDone(
            req.chat_id, req.turn_id, result.reply, stats.finish_reason, has_reply=has_reply,
            token_ids=tuple(last.token_ids or ()) if has_reply and last is not None else (),
            user_tokens=_count_tokens(self.lm, user.content) if user is not None else None,
            stats=stats.to_dict(), error=stats.error,
        ))
        self._emit_state(req.chat_id)
        self._enforce_budget(keep=req.chat_id)

    @Slot(object)
    def change_cache(self, req: CacheChange) -> None:
        """Switch a chat's strategy: convert its cache where the engine can, else recompute it now."""
        self.rebuild_started.emit(req.chat_id)
        started = time.perf_counter()
        from engine import caches

        try:
            if self.lm is None:
                raise RuntimeError("No model is loaded.")
            spec = caches.CacheSpec.from_dict(self._effective(req.cache)).validate()
            session = self._sessions.get(req.chat_id)
            if session is None:
                session = self._session(req.chat_id, req.system_prompt, req.sampling, req.cache)
                how = "recompute"
            else:
                how = self._switch(session, spec)
            session.messages = [_to_message(m) for m in req.history]
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
        self.rebuild_done.emit(RebuildDone(
            req.chat_id, True, req.cache, how=how, tokens=len(session.cached_ids),
            bytes=caches.cache_bytes(session.cache), seconds=time.perf_counter() - started,
        ))
        self._emit_state(req.chat_id)
        self._enforce_budget(keep=req.chat_id)

    # ----- helpers ----------------------------------------------------------------------------------
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
        self._auto, reason = _advise(lm)
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

    def _session(self, chat_id: int, system_prompt: str, sampling: dict[str, Any], cache: dict[str, Any]) -> Any:
        from engine.caches import CacheSpec
        from engine.sampling import SamplingSettings
        from engine.session import ChatSession, SessionSettings

        known = {f.name for f in fields(SamplingSettings)}
        sampling_settings = SamplingSettings(**{k: v for k, v in sampling.items() if k in known}).validate()
        spec = CacheSpec.from_dict(self._effective(cache)).validate()
        session = self._sessions.get(chat_id)
        if session is None:
            session = ChatSession(self.lm, SessionSettings(system_prompt, sampling_settings, spec))
            self._sessions[chat_id] = session
        else:
            session.set_system_prompt(system_prompt)
            session.set_sampling(sampling_settings)
            self._switch(session, spec)
        self._used_at[chat_id] = time.monotonic()
        return session

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

    def _emit_state(self, chat_id: int) -> None:
        from engine import caches

        session = self._sessions.get(chat_id)
        if session is None or session.cache is None:
            strategy = session.settings.cache.strategy if session is not None else ""
            self.cache_state.emit(CacheState(chat_id, "none", 0, 0, strategy))
            return
        strategy = session.settings.cache.strategy
        on_gpu = self.lm.device.type in ("cuda", "mps") and strategy != "offloaded"
        self.cache_state.emit(CacheState(chat_id, "gpu" if on_gpu else "ram", len(session.cached_ids),
                                         caches.cache_bytes(session.cache), strategy))

    def _enforce_budget(self, keep: int | None) -> None:
        """Beyond the KV budget, drop the caches of the chats used longest ago (recomputed on demand)."""
        if self._kv_budget <= 0:
            return
        from engine import caches

        sizes = {cid: caches.cache_bytes(s.cache) for cid, s in self._sessions.items() if s.cache is not None}
        total = sum(sizes.values())
        for cid in sorted(sizes, key=lambda c: self._used_at.get(c, 0.0)):
            if total <= self._kv_budget:
                break
            if cid == keep:
                continue
            self._sessions[cid].reset_cache()
            total -= sizes[cid]
            self._emit_state(cid)


def _advise(lm: Any) -> tuple[dict[str, Any], str]:
    """What "auto" means for this model here: the engine's memory advisor, where it exists."""
    try:
        from engine import memory

        advice = memory.advise(lm.config, memory.read_hardware(lm.device), dtype=lm.dtype,
                               weights_bytes=lm.weights_bytes, weights_loaded=True)
    except Exception as exc:  # no advisor in this engine, or it failed: the full cache
        return {"strategy": "dynamic"}, f"auto means dynamic (no advice: {type(exc).__name__})."
    if advice.recommended is None:
        return {"strategy": "dynamic"}, f"auto means dynamic. {advice.explanation}"
    return advice.recommended.spec.to_dict(), f"auto means {advice.recommended.label}: {advice.explanation}"


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


class Engine(QObject):
    """The GUI thread's handle on the worker: starts it, sends it requests, re-emits its answers.

    The bridge's signals are connected signal-to-signal to these, whose owner lives in the GUI
    thread, so every answer arrives queued on the GUI thread.
    """

    engine_info = Signal(object)
    load_progress = Signal(str)
    model_ready = Signal(object)
    model_failed = Signal(str)
    turn_started = Signal(object)
    token_delta = Signal(object)
    turn_done = Signal(object)
    cache_state = Signal(object)
    rebuild_started = Signal(int)
    rebuild_done = Signal(object)

    _load = Signal(object)
    _turn = Signal(object)
    _change_cache = Signal(object)
    _forget = Signal(int)
    _budget = Signal(int)

    def __init__(self, loader: Loader, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.loader = loader
        self.info: EngineInfo | None = None
        self.model: ModelInfo | None = None
        self.loading = False
        self.load_error: str | None = None
        self._thread = QThread()
        self._thread.setObjectName("cachet-engine")
        self._bridge = EngineBridge()
        self._bridge.moveToThread(self._thread)
        self._thread.finished.connect(self._bridge.deleteLater)
        for name in ("engine_info", "load_progress", "model_ready", "model_failed", "turn_started",
                     "token_delta", "turn_done", "cache_state", "rebuild_started", "rebuild_done"):
            getattr(self._bridge, name).connect(getattr(self, name))
        self._load.connect(self._bridge.load_model)
        self._turn.connect(self._bridge.run_turn)
        self._change_cache.connect(self._bridge.change_cache)
        self._forget.connect(self._bridge.forget)
        self._budget.connect(self._bridge.set_kv_budget)
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

    def change_cache(self, req: CacheChange) -> None:
        self._change_cache.emit(req)

    def forget(self, chat_id: int) -> None:
        self._forget.emit(chat_id)

    def set_kv_budget(self, budget_bytes: int) -> None:
        self._budget.emit(budget_bytes)

    def cancel(self, chat_id: int, turn_id: int | None) -> None:
        self._bridge.cancel(chat_id, turn_id)

    def shutdown(self) -> None:
        """Stop every turn and join the worker thread."""
        if self._thread.isRunning():
            self._bridge.cancel_all()
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
