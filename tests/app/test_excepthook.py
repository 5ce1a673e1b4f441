"""An exception no code catches is logged and shown, and the app goes on (issue 23 §7 item 3).

app/ had no sys.excepthook: an exception in a slot (the probe's import with a lone surrogate raised
UnicodeEncodeError in one) was printed to a terminal nobody reads, and the user saw nothing happen."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QCoreApplication, QTimer
from PySide6.QtWidgets import QMessageBox

from app.excepthook import ExceptionHook

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen


@pytest.fixture
def hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The hook installed for one test (the previous hooks back afterwards), its dialogs answered at once
    and recorded as (text, the thread that showed it)."""
    shown: list[tuple[str, str]] = []

    def answer(box: QMessageBox) -> int:
        shown.append((box.text(), threading.current_thread().name))
        return 0

    monkeypatch.setattr(QMessageBox, "exec", answer)
    installed = ExceptionHook(log=tmp_path / "cachet.log").install()
    installed.shown = shown
    yield installed
    installed.uninstall()


def _boom(message: str = "boom") -> None:
    raise ValueError(message)


def test_an_exception_in_a_slot_is_logged_and_shown(qtbot: Any, hook: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with qtbot.waitSignal(hook.reported, timeout=10_000) as reported:
        QTimer.singleShot(0, _boom)
    assert reported.args[0].startswith("ValueError: boom (in test_excepthook.py, line")
    [(text, thread)] = hook.shown
    assert "ValueError: boom" in text and "chats and messages are kept" in text and str(tmp_path) in text
    assert thread == "MainThread"
    log = (tmp_path / "cachet.log").read_text()
    assert "Traceback (most recent call last)" in log and "ValueError: boom" in log and "_boom" in log
    assert "ValueError: boom" in capsys.readouterr().err  # still on stderr for whoever runs it from a terminal


def test_an_exception_in_a_thread_is_shown_on_the_gui_thread(qtbot: Any, hook: Any, tmp_path: Path) -> None:
    worker = threading.Thread(target=_boom, args=("in a worker",), name="cachet-worker-test")
    with qtbot.waitSignal(hook.reported, timeout=10_000):
        worker.start()
        worker.join()
    [(text, thread)] = hook.shown
    assert "ValueError: in a worker" in text and thread == "MainThread"
    assert "thread cachet-worker-test" in (tmp_path / "cachet.log").read_text()


def test_the_same_exception_again_is_logged_but_shown_once(qtbot: Any, hook: Any, tmp_path: Path) -> None:
    for n in range(1, 4):
        QTimer.singleShot(0, _boom)
        qtbot.waitUntil(lambda n=n: hook.escaped == n, timeout=10_000)
        QCoreApplication.processEvents()  # the queued dialog request, if any
    assert len(hook.shown) == 1
    assert (tmp_path / "cachet.log").read_text().count("ValueError: boom") == 3


def test_no_log_is_written_into_a_deleted_data_folder(qtbot: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from app import excepthook

    monkeypatch.setattr(excepthook.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    written = excepthook.write_log("trace\n", tmp_path / "deleted" / "cachet.log")
    assert written is not None and written.parent == tmp_path / "tmp" and not (tmp_path / "deleted").exists()


CHILD = """
import json, sys
from PySide6.QtCore import QCoreApplication, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox
from app.__main__ import main
from tests.tiny import tiny_loaded_model

shown = []
QMessageBox.exec = lambda box: shown.append((box.windowTitle(), box.text())) or 0

def after_start(window):
    def finished(_chat):
        QTimer.singleShot(0, lambda: (window.close(), QApplication.instance().quit()))
        raise ValueError("a slot that raised")  # after the reply was stored
    window.controller.turn_finished.connect(finished)
    window.new_chat()
    window.send("Keep me")

code = main(["--data-dir", sys.argv[1]], loader=tiny_loaded_model, after_start=after_start)
print("DIALOGS " + json.dumps(shown), flush=True)
sys.exit(code)
"""


def test_the_app_installs_the_hook_and_keeps_the_chat(tmp_path: Path) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    [line] = [ln for ln in out.stdout.splitlines() if ln.startswith("DIALOGS ")]
    dialogs = json.loads(line.removeprefix("DIALOGS "))
    assert [title for title, _ in dialogs] == ["Something went wrong in Cachet"]  # before the fix: none
    assert "ValueError: a slot that raised" in dialogs[0][1]
    log = (tmp_path / "data" / "cachet.log").read_text()
    assert "ValueError: a slot that raised" in log and "finished" in log
    db = sqlite3.connect(tmp_path / "data" / "chats.sqlite3")
    try:
        rows = db.execute("SELECT role, status FROM messages ORDER BY position").fetchall()
    finally:
        db.close()
    assert rows == [("user", "done"), ("assistant", "done")]  # the chat is kept
