"""The engine worker: one QObject in its own QThread that owns the `ChatService` and runs its
calls off the GUI thread, the way Anki's `qt/aqt/taskman.py` runs backend calls.

It is only ever invoked through queued signals (from `EngineClient`, app/client.py) and answers
with the signals of `EngineSignals`, carrying the dataclasses of app/protocol.py. All policy —
budgets, the memory pool, snapshots, `auto`, the out-of-memory fallback — is the service's
(engine/service.py); this module only translates slots into service calls and results into
signals. torch and transformers are imported here, in the worker thread, after the window is up.

Two more things run here. A remote engine (the model source "OpenAI-compatible server",
engine/remote.py) answers turns in place of the service when the window's loader is an `Endpoint`.
And the local server (engine/server.py) can serve the window's own model and pool to other apps:
its requests run on the server's thread, so every service call here and there holds `service.lock`.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Signal, Slot

from app.protocol import (
    Budgets,
    CacheChange,
    Loader,
    ModelInfo,
    OpenChat,
    RebuildDone,
    ServeRequest,
    ServerState,
    TokenDelta,
    TurnDone,
    TurnRequest,
    TurnStarted,
)
from engine.remote import Endpoint, RemoteEngine, RemoteError
from engine.specs import STRATEGIES, CacheSpec

if TYPE_CHECKING:
    from pathlib import Path

    from engine.server import BackgroundServer
    from engine.service import ChatService

NO_MODEL = "No model is loaded. Choose one in Settings (Ctrl+,)."
REMOTE_CACHE = "The server manages its own cache (vLLM's prefix caching, llama.cpp's slots, Cachet's pool)."


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
        server_state(ServerState): the local server started, stopped, or could not start.
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
    server_state = Signal(object)


ANSWERS = ("load_progress", "model_ready", "model_failed", "turn_started", "token_delta", "turn_done",
           "cache_restored", "cache_state", "rebuild_started", "rebuild_done", "status", "server_state")


class EngineWorker(EngineSignals):
    """Runs the ChatService in the worker thread (see the module docstring)."""

    def __init__(self, snapshot_dir: Path | None = None) -> None:
        super().__init__()
        self.snapshot_dir = snapshot_dir
        self.service: ChatService | None = None  # made in the worker thread: importing it imports torch
        self.budgets = Budgets()
        self.latest_open = 0  # written by the GUI thread: the newest OpenChat's seq
        self.remote: RemoteEngine | None = None  # set while a remote engine answers the turns
        self._server: BackgroundServer | None = None
        self._serve_port: int | None = None  # what the window asked for (None: no server)
        self._closing = threading.Event()

    # ----- called from the GUI thread ----------------------------------------------------------
    def interrupt(self) -> None:
        """Thread-safe: the app quits; a load stops at its next step, turns are stopped or skipped."""
        self._closing.set()
        service = self.service
        if service is not None:
            service.interrupt()
        server = self._server
        if server is not None:
            server.server.worker.cancel_all()

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
    def load_model(self, loader: Loader | Endpoint) -> None:
        self.load_progress.emit("Starting the engine…")
        self._stop_server()  # it serves the model it was started on; it comes back with the new one
        if isinstance(loader, Endpoint):
            self._connect_remote(loader)
            return
        self.remote = None
        try:
            from engine.service import LoadInterrupted, describe_error  # imports torch: seconds, here
        except Exception as exc:  # a broken install must never take the app down
            self.model_failed.emit(f"The engine could not start ({type(exc).__name__}: {exc}).")
            return
        try:
            service = self._service()
            with service.lock:
                info = service.load_model(loader, progress=self.load_progress.emit)
        except LoadInterrupted:
            return
        except Exception as exc:  # a model that fails to load must never take the app down
            self.model_failed.emit(describe_error(exc))
            return
        self.model_ready.emit(info)
        self._start_server()

    def _connect_remote(self, endpoint: Endpoint) -> None:
        """Answer turns on a remote OpenAI-compatible server: check it answers and offers the model."""
        self.load_progress.emit(f"Connecting to {endpoint.root}…")
        started = time.perf_counter()
        try:
            engine = RemoteEngine(endpoint)
            offered = engine.models()
        except RemoteError as exc:
            self.remote = None
            self.model_failed.emit(str(exc))
            return
        if not offered:
            self.model_failed.emit(f"The server at {endpoint.root} offers no model.")
            return
        if not endpoint.model:
            engine = RemoteEngine(Endpoint(endpoint.base_url, offered[0], endpoint.api_key))
        elif endpoint.model not in offered:
            self.model_failed.emit(f"The server at {endpoint.root} does not offer {endpoint.model!r}; it offers "
                                   f"{', '.join(offered[:8])}{' …' if len(offered) > 8 else ''}.")
            return
        if self.service is not None:  # the local model's memory is given back while the server answers
            with self.service.lock:
                self.service.close(save=True)
            self.service = None
        self.remote = engine
        self.model_ready.emit(ModelInfo(
            name=engine.endpoint.model, device="remote", dtype="server", context_length=0, weights_bytes=0,
            load_seconds=time.perf_counter() - started, availability=dict.fromkeys(STRATEGIES, REMOTE_CACHE),
            backend_availability={}, auto_cache=CacheSpec("dynamic"), auto_reason=REMOTE_CACHE, config=None,
            torch_dtype=None, precision_note="chosen by the server", remote=engine.endpoint.root))
        self._start_server()  # says why it cannot serve a remote engine, when the window wants a server

    @Slot(object)
    def set_budgets(self, budgets: Budgets) -> None:
        self.budgets = budgets
        if self.service is not None:
            with self.service.lock:
                self.service.set_budgets(budgets)

    @Slot()
    def shutdown(self) -> None:
        """Cachet quits: stop the local server, save every chat's cache as a snapshot, so it resumes
        after a restart."""
        self._stop_server()
        if self.service is not None:
            with self.service.lock:
                self.service.close(save=True)

    @Slot(int)
    def forget(self, chat_id: int) -> None:
        if self.service is not None:
            with self.service.lock:
                self.service.forget(chat_id)

    @Slot(object)
    def open_chat(self, req: OpenChat) -> None:
        service = self.service
        if service is None or service.model is None or self._closing.is_set() or req.seq != self.latest_open:
            return  # no model yet, or another chat was opened since: skip this one
        try:
            with service.lock:
                service.open_chat(req.chat_id, req.history, req.settings)
        except Exception:  # the next turn tries again and reports what went wrong
            return

    @Slot(object)
    def run_turn(self, req: TurnRequest) -> None:
        service = self.service
        if req.stop.is_set() or self._closing.is_set():
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "cancelled"))
            return

        def delta(text: str) -> None:
            self.token_delta.emit(TokenDelta(req.chat_id, req.turn_id, text))

        if self.remote is not None:
            self.turn_started.emit(TurnStarted(req.chat_id, req.turn_id))
            self.turn_done.emit(self.remote.run_turn(req.chat_id, req.history, req.settings, on_delta=delta,
                                                     stop=req.stop, turn_id=req.turn_id))
            return
        if service is None or service.model is None:
            self.turn_done.emit(TurnDone(req.chat_id, req.turn_id, "", "error", error=NO_MODEL))
            return
        self.turn_started.emit(TurnStarted(req.chat_id, req.turn_id))
        with service.lock:  # a request of the local server may be answering: this turn waits for it
            done = service.run_turn(
                req.chat_id, req.history, req.settings, stop=req.stop, turn_id=req.turn_id, on_delta=delta,
                on_retry=lambda _notice: self.token_delta.emit(TokenDelta(req.chat_id, req.turn_id, "", restart=True)),
            )
        self.turn_done.emit(done)

    @Slot(object)
    def change_cache(self, req: CacheChange) -> None:
        self.rebuild_started.emit(req.chat_id)
        service = self.service
        if self.remote is not None:
            self.rebuild_done.emit(RebuildDone(req.chat_id, False, req.settings.cache, error=REMOTE_CACHE))
            return
        if service is None or service.model is None:
            self.rebuild_done.emit(RebuildDone(req.chat_id, False, req.settings.cache, error=NO_MODEL))
            return
        with service.lock:
            done = service.change_cache(req.chat_id, req.history, req.settings)
        self.rebuild_done.emit(done)

    # ----- the local server ------------------------------------------------------------------------
    @Slot(object)
    def set_server(self, req: ServeRequest) -> None:
        """Serve the window's model to other apps on 127.0.0.1:`req.port`, or stop (port None)."""
        self._serve_port = req.port
        self._stop_server()
        self._start_server()

    def _start_server(self) -> None:
        port = self._serve_port
        if port is None or self._closing.is_set():
            return
        service = self.service
        if self.remote is not None:
            self.server_state.emit(ServerState(False, error="The server serves a model loaded here; the chats "
                                                            "are answered by a remote engine now."))
            return
        if service is None or service.lm is None:
            self.server_state.emit(ServerState(False, error="It starts once a model is loaded."))
            return
        from engine.server import BackgroundServer, CachetServer, ServerConfig, model_id

        server = CachetServer(service, ServerConfig(model_id=model_id(service.lm.source.display_name)))
        http = BackgroundServer(server, "127.0.0.1", port)
        try:
            http.start()
        except OSError as exc:
            self.server_state.emit(ServerState(False, error=f"{exc} Is another program using port {port}? "
                                                            "Choose another port in Settings."))
            return
        self._server = http
        self.server_state.emit(ServerState(True, url=http.base_url, stats=server.stats))

    def _stop_server(self) -> None:
        http, self._server = self._server, None
        if http is not None:
            http.stop()  # its requests end; their slots leave the pool
            self.server_state.emit(ServerState(False))
