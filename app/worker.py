"""The engine worker: one QObject in its own QThread that owns the `ChatService` and runs its
calls off the GUI thread, the way Anki's `qt/aqt/taskman.py` runs backend calls.

It is only ever invoked through queued signals (from `EngineClient`, app/client.py) and answers
with the signals of `EngineSignals`, carrying the dataclasses of app/protocol.py. All policy —
budgets, the memory pool, snapshots, `auto`, the out-of-memory fallback — is the service's
(engine/service.py); this module only translates slots into service calls and results into
signals. torch and transformers are imported here, in the worker thread, after the window is up.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Signal, Slot

from app.protocol import (
    Budgets,
    CacheChange,
    Loader,
    OpenChat,
    RebuildDone,
    TokenDelta,
    TurnDone,
    TurnRequest,
    TurnStarted,
)

if TYPE_CHECKING:
    from pathlib import Path

    from engine.service import ChatService

NO_MODEL = "No model is loaded. Choose one in Settings (Ctrl+,)."


class EngineSignals(QObject):
    """The worker's answers, declared once: the worker emits them in its thread and the GUI-thread
    client re-emits them (connected signal to signal, so they arrive queued).

    Signals:
        load_progress(str): a step of loading the model.
        model_ready(ModelInfo) / model_failed(str): the model is loaded, or why not.
        turn_started(TurnStarted), token_delta(TokenDelta), turn_done(TurnDone): one turn.
        cache_restored(CacheRestored): a chat was made active (opened, or before a turn).
        cache_state(CacheState): a chat's cache changed size or place.
        rebuild_started(int), rebuild_done(RebuildDone): a cache strategy switch.
        status(str): a one-line message for the status bar (e.g. a library being loaded).
    """

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


ANSWERS = ("load_progress", "model_ready", "model_failed", "turn_started", "token_delta", "turn_done",
           "cache_restored", "cache_state", "rebuild_started", "rebuild_done", "status")


class EngineWorker(EngineSignals):
    """Runs the ChatService in the worker thread (see the module docstring)."""

    def __init__(self, snapshot_dir: Path | None = None) -> None:
        super().__init__()
        self.snapshot_dir = snapshot_dir
        self.service: ChatService | None = None  # made in the worker thread: importing it imports torch
        self.budgets = Budgets()
        self.latest_open = 0  # written by the GUI thread: the newest OpenChat's seq
        self._closing = threading.Event()

    # ----- called from the GUI thread ----------------------------------------------------------
    def interrupt(self) -> None:
        """Thread-safe: the app quits; a load stops at its next step, turns are stopped or skipped."""
        self._closing.set()
        service = self.service
        if service is not None:
            service.interrupt()

    # ----- slots (worker thread) ---------------------------------------------------------------
    def _service(self) -> ChatService:
        if self.service is None:
            from engine.service import ChatService

            self.service = ChatService(snapshot_dir=self.snapshot_dir, budgets=self.budgets,
                                       on_status=self.status.emit, on_cache_state=self.cache_state.emit,
                                       on_cache_restored=self.cache_restored.emit)
            if self._closing.is_set():
                self.service.interrupt()
        return self.service

    @Slot(object)
    def load_model(self, loader: Loader) -> None:
        self.load_progress.emit("Starting the engine…")
        try:
            from engine.service import LoadInterrupted, describe_error  # imports torch: seconds, here
        except Exception as exc:  # a broken install must never take the app down
            self.model_failed.emit(f"The engine could not start ({type(exc).__name__}: {exc}).")
            return
        try:
            info = self._service().load_model(loader, progress=self.load_progress.emit)
        except LoadInterrupted:
            return
        except Exception as exc:  # a model that fails to load must never take the app down
            self.model_failed.emit(describe_error(exc))
            return
        self.model_ready.emit(info)

    @Slot(object)
    def set_budgets(self, budgets: Budgets) -> None:
        self.budgets = budgets
        if self.service is not None:
            self.service.set_budgets(budgets)

    @Slot()
    def shutdown(self) -> None:
        """Cachet quits: save every chat's cache as a snapshot, so it resumes after a restart."""
        if self.service is not None:
            self.service.close(save=True)

    @Slot(int)
    def forget(self, chat_id: int) -> None:
        if self.service is not None:
            self.service.forget(chat_id)

    @Slot(object)
    def open_chat(self, req: OpenChat) -> None:
        service = self.service
        if service is None or service.model is None or self._closing.is_set() or req.seq != self.latest_open:
            return  # no model yet, or another chat was opened since: skip this one
        try:
            service.open_chat(req.chat_id, req.history, req.settings)
        except Exception:  # the next turn tries again and reports what went wrong
            return

    @Slot(object)
    def run_turn(self, req: TurnRequest) -> None:
        service = self.service
        if req.stop.is_set() or self._closing.is_set():
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "cancelled"))
            return
        if service is None or service.model is None:
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "error", error=NO_MODEL))
            return
        self.turn_started.emit(TurnStarted(req.chat_id, req.turn_id))
        done = service.run_turn(
            req.chat_id, req.history, req.settings, stop=req.stop, turn_id=req.turn_id,
            on_delta=lambda text: self.token_delta.emit(TokenDelta(req.chat_id, req.turn_id, text)),
            on_retry=lambda _notice: self.token_delta.emit(TokenDelta(req.chat_id, req.turn_id, "", restart=True)),
        )
        self.turn_done.emit(done)

    @Slot(object)
    def change_cache(self, req: CacheChange) -> None:
        self.rebuild_started.emit(req.chat_id)
        service = self.service
        if service is None or service.model is None:
            self.rebuild_done.emit(RebuildDone(req.chat_id, False, req.settings.cache, error=NO_MODEL))
            return
        self.rebuild_done.emit(service.change_cache(req.chat_id, req.history, req.settings))
