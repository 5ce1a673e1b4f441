"""Importing a chat file from the window (issue 23 §7 item 3): the file is read off the GUI thread, and
whatever is wrong with it ends in a dialog naming the problem, never in an exception that vanishes."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtWidgets import QMessageBox

from app import controller as controller_module

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen

EXPORT = {"format": "cachet-chat", "version": 1, "title": "Imported",
          "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def dialogs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The dialogs shown, (title, text), each answered at once."""
    shown: list[tuple[str, str]] = []

    def record(parent: Any, title: str, text: str, *args: Any, **kwargs: Any) -> QMessageBox.StandardButton:
        shown.append((title, text))
        return QMessageBox.StandardButton.Ok

    monkeypatch.setattr(QMessageBox, "warning", record)
    monkeypatch.setattr(QMessageBox, "information", record)
    return shown


def test_the_file_is_read_off_the_gui_thread(qtbot: Any, make_window: Any, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, dialogs: list[tuple[str, str]]) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(EXPORT))
    release = threading.Event()
    readers: list[threading.Thread] = []
    real = controller_module.load_import

    def slow_read(p: Path) -> Any:  # a file on a slow drive, held until the test lets it go
        readers.append(threading.current_thread())
        release.wait(30)
        return real(p)

    monkeypatch.setattr(controller_module, "load_import", slow_read)
    win = make_window()

    win.import_file(path)  # before the fix: read here, on the GUI thread, which waited with it

    assert readers and readers[0] is not threading.main_thread()
    assert [e.title for e in win.sidebar.entries()] == []  # not there yet; the window goes on meanwhile
    with qtbot.waitSignal(win.import_done, timeout=30_000) as done:
        release.set()
    assert done.args[0].imported is not None and dialogs == []
    assert [e.title for e in win.sidebar.entries()] == ["Imported"]
    assert win.current_chat == done.args[0].imported.chat.id


def _hostile(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    files = {"surrogate": folder / "surrogate.json", "fifo": folder / "fifo.json", "zero": folder / "zero.json"}
    files["surrogate"].write_text(json.dumps({**EXPORT, "messages": [{"role": "user", "content": "a\ud800"}]}))
    os.mkfifo(files["fifo"])
    files["zero"].symlink_to("/dev/null")  # the probe linked /dev/zero; /dev/null ends if the fix is missing
    return files


def test_hostile_files_each_end_in_a_dialog_and_the_window_goes_on(
        qtbot: Any, make_window: Any, tmp_path: Path, dialogs: list[tuple[str, str]],
        send_and_wait: Any) -> None:
    win = make_window()
    chat_id = send_and_wait(win, "Still here?")
    for name, path in _hostile(tmp_path / "imports").items():
        with qtbot.waitSignal(win.import_done, timeout=30_000) as done:
            win.import_file(path)
        assert done.args[0].imported is None, name
    assert [title for title, _ in dialogs] == ["Import failed"] * 3
    said = [text for _, text in dialogs]
    assert "lone surrogate" in said[0] and "named pipe" in said[1] and "device" in said[2]
    assert [e.chat_id for e in win.sidebar.entries()] == [chat_id]  # nothing half-imported
    send_and_wait(win, "And now?")  # the window answers as before
