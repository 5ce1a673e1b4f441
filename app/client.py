"""The GUI thread's handle on the engine worker (app/worker.py): starts its thread, sends it
requests as queued signals, re-emits its answers in the GUI thread, and remembers what the
window asks about (the model's facts, whether it is loading).

The one call that does not go through the queue is stopping a turn: `cancel` sets the turn's
own `threading.Event`, which the engine checks before every token (and before the turn starts).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from app.protocol import (
    Budgets,
    CacheChange,
    Loader,
    ModelInfo,
    OpenChat,
    ServeRequest,
    ServerState,
    TurnDone,
    TurnRequest,
)
from app.worker import ANSWERS, EngineSignals, EngineWorker


class EngineClient(EngineSignals):
    """Starts and talks to the engine worker; every answer arrives here, queued, in the GUI thread."""

    _load = Signal(object)
    _turn = Signal(object)
    _open = Signal(object)
    _change_cache = Signal(object)
    _forget = Signal(int)
    _budgets = Signal(object)
    _serve = Signal(object)
    _shutdown = Signal()

    def __init__(self, loader: Loader, parent: QObject | None = None, snapshot_dir: Path | None = None) -> None:
        super().__init__(parent)
        self.loader = loader
        self.model: ModelInfo | None = None
        self.loading = False
        self.load_error: str | None = None
        self.server = ServerState(False)  # the local server, as last reported
        self._stops: dict[int, threading.Event] = {}  # turns sent and not answered yet
        self._open_seq = 0
        self._thread = QThread()
        self._thread.setObjectName("cachet-engine")
        self._worker = EngineWorker(snapshot_dir)
        self._worker.moveToThread(self._thread)
        self._thread.finished.connect(self._worker.deleteLater)
        for name in ANSWERS:
            getattr(self._worker, name).connect(getattr(self, name))
        self._load.connect(self._worker.load_model)
        self._turn.connect(self._worker.run_turn)
        self._open.connect(self._worker.open_chat)
        self._change_cache.connect(self._worker.change_cache)
        self._forget.connect(self._worker.forget)
        self._budgets.connect(self._worker.set_budgets)
        self._serve.connect(self._worker.set_server)
        # shutdown() waits for the worker to save the caches before it stops the thread
        self._shutdown.connect(self._worker.shutdown, Qt.ConnectionType.BlockingQueuedConnection)
        self.model_ready.connect(self._remember_model)
        self.model_failed.connect(self._remember_failure)
        self.turn_done.connect(self._forget_turn)
        self.server_state.connect(self._remember_server)

    @property
    def ready(self) -> bool:
        return self.model is not None

    @property
    def running(self) -> bool:
        return self._thread.isRunning()

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
        self._stops[req.turn_id] = req.stop
        self._turn.emit(req)

    def open_chat(self, req: OpenChat) -> None:
        """Restore an opened chat's cache ahead of its next turn; a later opening supersedes it."""
        self._open_seq += 1
        self._worker.latest_open = self._open_seq
        self._open.emit(replace(req, seq=self._open_seq))

    def change_cache(self, req: CacheChange) -> None:
        self._change_cache.emit(req)

    def forget(self, chat_id: int) -> None:
        self._forget.emit(chat_id)

    def set_budgets(self, budgets: Budgets) -> None:
        self._budgets.emit(budgets)

    def set_server(self, port: int | None) -> None:
        """Serve the loaded model to other apps on 127.0.0.1:`port` (None stops it); `server_state` answers."""
        self._serve.emit(ServeRequest(port))

    def cancel(self, turn_id: int) -> None:
        """Stop a turn: at its next token if it runs, before it starts if it waits in the queue."""
        stop = self._stops.get(turn_id)
        if stop is not None:
            stop.set()

    def pending_turns(self) -> int:
        """Turns sent to the worker whose end has not come back yet."""
        return len(self._stops)

    def shutdown(self) -> None:
        """Stop every turn, save every chat's cache as a snapshot, and join the worker thread."""
        if self._thread.isRunning():
            for stop in self._stops.values():
                stop.set()
            self._worker.interrupt()
            self._shutdown.emit()  # blocks until the worker has saved them
            self._thread.quit()
            self._thread.wait()

    @Slot(object)
    def _remember_model(self, info: ModelInfo) -> None:
        self.model = info
        self.loading = False

    @Slot(str)
    def _remember_failure(self, message: str) -> None:
        self.loading = False
        self.load_error = message

    @Slot(object)
    def _remember_server(self, state: ServerState) -> None:
        self.server = state

    @Slot(object)
    def _forget_turn(self, done: TurnDone) -> None:
        self._stops.pop(done.turn_id, None)
