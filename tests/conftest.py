"""Shared fixtures and helpers for every test.

* Every test runs against throwaway data and config folders, and a cache folder of this session
  (`shared_cache_dir`): what is not keyed by content (the CPU precision probe's record
  precision.json, the file-hash index hashes.json, discovery.json) lasts one session. Only what is
  keyed by content is kept across runs, in `kept_cache_dir()`: its models/ (the converted copy of the
  bundled GGUF model, keyed by the file's hash, reached through the session folder's models/) so that
  no run converts it twice, and mypy's cache. The session checks at its end that it added nothing
  else there (`kept_cache_strays`).
* `tiny_lm`: a tiny random model built from a config (tests/tiny.py), for speed.
* `real_lm`: the bundled SmolLM2-135M-Instruct, loaded once per session, for the few tests
  marked `real_model` (`pytest -m real_model` runs only them, `-m "not real_model"` skips them).
* `make_front`: chats driven through the engine service the way any front end drives it.
* `make_window` / `send_and_wait`: the desktop window, driven like a user would.
* `gate`: holds the model of a test's window or service at a known forward pass (tests/tiny.py
  ForwardGate), for every test that needs a reply still streaming: the tiny model writes thousands
  of tokens a second on a fast CPU, so no test may hope to catch a reply before it ends.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import platformdirs
import pytest

from engine.models import LoadedModel
from tests.tiny import ForwardGate, open_all_gates, tiny_loaded_model

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHORT = {"temperature": 0.0, "max_new_tokens": 12, "repetition_penalty": 1.0}
TURN_TIMEOUT_MS = 60_000


def kept_cache_dir() -> Path:
    """What test runs keep between runs (only what is keyed by content): CACHET_TEST_CACHE_DIR, else
    the user cache folder's Cachet/tests (never the app's own cache folder)."""
    base = os.environ.get("CACHET_TEST_CACHE_DIR")
    return Path(base) if base else Path(platformdirs.user_cache_dir("Cachet", appauthor=False)) / "tests"


KEPT_FOLDERS = ("models", "mypy")  # the only entries of the kept folder
# a GGUF's converted copy (engine.conversion.converted_dir: the file's SHA-256) and a quantized copy
# (engine.quantized_weights.quantized_dir), each possibly still being written (a hidden .<pid>.tmp folder)
_CONVERTED = re.compile(r"\.?[0-9a-f]{32}-v\d+(\.\d+\.tmp)?")
_QUANTIZED = re.compile(r"\.?[0-9a-f]{32}-int[48]-[a-z0-9]+-q\d+(\.\d+\.tmp)?")
# what earlier versions of these fixtures left in the kept folder: removed at the start of a session
_LEGACY = ("precision.json", "precision.tmp", "hashes.json", "discovery.json")


def kept_cache_strays(folder: Path) -> list[str]:
    """What in the kept test cache folder `folder` is not keyed by content: anything but models/ and mypy/,
    and in models/ anything but converted GGUF copies and quantized copies of a GGUF (a quantized copy of
    a folder model is keyed by the folder's path, a test's temporary folder)."""
    if not folder.is_dir():
        return []
    strays = [entry.name for entry in sorted(folder.iterdir())
              if entry.name not in KEPT_FOLDERS or not entry.is_dir()]
    models = folder / "models"
    for entry in sorted(models.iterdir()) if models.is_dir() else ():
        if _CONVERTED.fullmatch(entry.name):
            continue
        if _QUANTIZED.fullmatch(entry.name) and _quantized_from_a_gguf(entry):
            continue
        strays.append(f"models/{entry.name}")
    return strays


def _quantized_from_a_gguf(folder: Path) -> bool:
    """Whether a quantized copy (or one being written, not recorded yet) was made from a GGUF file."""
    if folder.name.endswith(".tmp"):
        return True
    try:
        source = json.loads((folder / "cachet-quantized.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(source, str) and source.startswith("gguf-sha256:")


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cache folder of every test (CACHET_CACHE_DIR): this session's own, its models/ the kept folder's
    (converted models). At the end of the session, the kept folder must hold nothing new that is not keyed
    by content."""
    kept = kept_cache_dir()
    (kept / "models").mkdir(parents=True, exist_ok=True)
    for name in _LEGACY:
        (kept / name).unlink(missing_ok=True)
    before = set(kept_cache_strays(kept))  # not ours to delete: only what this session adds is checked
    path = tmp_path_factory.mktemp("cache")
    (path / "models").symlink_to(kept / "models", target_is_directory=True)
    yield path
    added = [name for name in kept_cache_strays(kept) if name not in before]
    assert not added, (f"this test session left files that are not keyed by content in the kept cache folder "
                       f"{kept}: {added}")


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, shared_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CACHET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CACHET_CACHE_DIR", str(shared_cache_dir))
    monkeypatch.setenv("CACHET_CONFIG_DIR", str(tmp_path / "config"))  # the data-folder choice, never the user's
    yield


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return tiny_loaded_model(seed=0)


@pytest.fixture(scope="session")
def real_lm(shared_cache_dir: Path) -> LoadedModel:
    """The bundled SmolLM2-135M-Instruct, loaded once for the whole session."""
    from engine import models

    previous = os.environ.get("CACHET_CACHE_DIR")
    os.environ["CACHET_CACHE_DIR"] = str(shared_cache_dir)
    try:
        return models.load("default", device="cpu", dtype="float32")
    finally:
        if previous is None:
            os.environ.pop("CACHET_CACHE_DIR", None)
        else:
            os.environ["CACHET_CACHE_DIR"] = previous


# ----- chats through the engine service, as any front end drives them --------------------------------
class Front:
    """A front end in a few lines: each chat's messages in a ChatStore, turns through a ChatService.

    `states` is every CacheState the service reported, in order.
    """

    def __init__(self, lm: LoadedModel, store: Any, budgets: Any = None) -> None:
        from engine.service import ChatService

        self.lm, self.store = lm, store
        self.states: list[Any] = []
        self.service = ChatService(budgets=budgets, on_cache_state=self.states.append)
        self.service.load_model(lambda: lm)

    def new_chat(self, **settings: Any) -> int:
        from engine.specs import CacheSpec, SamplingSettings
        from engine.store import ChatSettings

        base = ChatSettings(sampling=SamplingSettings(**SHORT), cache=CacheSpec("dynamic"))
        return int(self.store.create_chat(replace(base, **settings)).id)

    def say(self, chat_id: int, text: str, **turn: Any) -> Any:
        """Keep the user's message, answer it, keep the reply; returns the TurnDone."""
        self.store.add_message(chat_id, "user", text)
        done = self.service.run_turn(chat_id, self.store.messages(chat_id), self.store.chat(chat_id).settings, **turn)
        if done.cache is not None:
            self.store.set_settings(chat_id, replace(self.store.chat(chat_id).settings, cache=done.cache))
        if done.has_reply:
            self.store.add_message(chat_id, "assistant", done.reply, token_ids=done.token_ids,
                                   status="done" if done.finish_reason in ("stop", "length") else "stopped")
        return done

    def open(self, chat_id: int) -> Any:
        return self.service.open_chat(chat_id, self.store.messages(chat_id), self.store.chat(chat_id).settings)

    def where(self, chat_id: int) -> str:
        return str(self.service.cache_state(chat_id).where)


@pytest.fixture
def make_front(tiny_lm: LoadedModel) -> Iterator[Callable[..., Front]]:
    """Fronts on this test's data folder; a second one after `front.service.close()` is a restart."""
    from engine.store import ChatStore

    made: list[Front] = []

    def make(budgets: Any = None, lm: LoadedModel | None = None) -> Front:
        front = Front(lm or tiny_lm, made[0].store if made else ChatStore(), budgets)
        made.append(front)
        return front

    yield make
    for front in made:
        front.service.close(save=False)
    if made:
        made[0].store.close()


@pytest.fixture
def tiny_server(tiny_lm: LoadedModel) -> Iterator[Callable[..., Any]]:
    """Start OpenAI-compatible servers on the tiny model, each on a free loopback port, with its own
    service (no snapshots): `start(model_id, defaults, **ServerConfig fields)`; stopped after the test."""
    from engine.reports import Budgets
    from engine.server import BackgroundServer, CachetServer, ServerConfig
    from engine.service import ChatService

    started: list[tuple[Any, Any]] = []

    def start(model_id: str, defaults: Any, **config: Any) -> BackgroundServer:
        service = ChatService(budgets=Budgets(disk=0))
        service.load_model(lambda: tiny_lm)
        http = BackgroundServer(CachetServer(service, ServerConfig(model_id=model_id, defaults=defaults, **config)),
                                port=0)
        http.start()
        started.append((http, service))
        return http

    yield start
    for http, service in started:
        http.stop()
        service.close(save=False)


# ----- replies held open ----------------------------------------------------------------------------------
@pytest.fixture
def gate() -> Iterator[ForwardGate]:
    """A ForwardGate for this test's model: attach it where the model is made (`lambda:
    gate.attach(tiny_loaded_model())` is a window's loader). Opened at the end, so that no worker
    thread stays held; a pass held longer than a turn's timeout fails that turn instead of hanging."""
    held = ForwardGate(timeout=TURN_TIMEOUT_MS / 1000)
    yield held
    held.open()


def stream_until(qtbot: Any, gate: ForwardGate, condition: Callable[[], bool], per_step: int = 1,
                 caught_up: Callable[[], bool] = lambda: True, timeout: int = 60_000) -> None:
    """Let a held reply go on until `condition()` holds: `per_step` more forward passes (tokens, with
    speculation off) whenever the model is held and `caught_up()` says the window has taken in what came
    before (its last render, say). The reply advances only as fast as the window shows it, so it cannot
    end, or outrun what the test waits to see, on however fast (or busy) a machine."""

    def reached() -> bool:
        if condition():
            return True
        if gate.held and caught_up():
            gate.step(per_step)
        return False

    qtbot.waitUntil(reached, timeout=timeout)


def speculation_off(store: Any, chat_id: int) -> None:
    """One token per forward pass in this chat (prompt-lookup guesses checked in one pass would make a
    ForwardGate's count of passes say nothing about the tokens)."""
    store.set_settings(chat_id, replace(store.chat(chat_id).settings, speculative="off"))


# ----- the desktop window, driven like a user would ---------------------------------------------------
@pytest.fixture
def make_window(qtbot: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Open main windows on this test's data folder (a second one is a restart); closing joins each
    one's worker thread. The window's search for models on this computer (its first-run hint) looks
    nowhere unless a test points `engine.discovery.default_locations` at a fake layout."""
    from PySide6.QtCore import QCoreApplication, QEvent

    from app.config import AppConfig
    from app.main_window import MainWindow
    from engine import discovery
    from engine.store import ChatStore

    monkeypatch.setattr(discovery, "default_locations", lambda *args, **kwargs: [])

    made: list[tuple[Any, Any]] = []

    def make(loader: Callable[..., Any] = tiny_loaded_model, sampling: dict[str, Any] | None = None,
             wait_ready: bool = True, **settings: Any) -> MainWindow:
        store = ChatStore()
        config = AppConfig(default_sampling=dict(SHORT if sampling is None else sampling), **settings)
        win = MainWindow(store, config, loader, save_settings=False)
        win.show()
        made.append((win, store))
        if wait_ready:
            with qtbot.waitSignal(win.engine.model_ready, timeout=TURN_TIMEOUT_MS):
                win.start_engine()
        return win

    yield make
    open_all_gates()  # a held reply would keep the worker thread that closing the window joins
    for win, store in made:
        win._quit_unsaved = lambda: True  # a failed test may leave changes unsaved: never wait on a dialog
        win.close()
        assert not win.engine.running
        win.deleteLater()  # later tests restyle the whole application: leave no windows behind
        store.close()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


@pytest.fixture
def send_and_wait(qtbot: Any) -> Callable[[Any, str], int]:
    """Type `text` in the window's current chat (a new one if none) and wait for the turn's end;
    returns the chat's id."""

    def send(win: Any, text: str) -> int:
        with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
            win.send(text)
        assert win.current_chat is not None
        return int(win.current_chat)

    return send
