"""The data folder deleted while the app runs (issue 23 §7 item 2).

The probe deleted the data folder mid-chat: the app went on streaming and "saving" into the unlinked
database, said nothing, and re-created an almost empty folder at quit (a snapshot); the next start showed
no chats and no banner, and the 4 messages written after the delete were lost. Now the window notices
(the database at its path is not the open file), says so in a banner, and writes everything it holds —
the messages written after the delete included — into the folder again when asked, or when quitting.
Nothing re-creates the folder without the user's word.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtWidgets import QMessageBox

from app.data_folder import DataFolderGuard
from engine import paths
from engine.lock import DataFolderLock, FolderInUseError
from engine.store import ChatStore, StoreError

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen


def _stored(folder: Path) -> list[tuple[str, str]]:
    """Every message in the folder's database, read as the next start would."""
    db = sqlite3.connect(f"file:{folder / 'chats.sqlite3'}?mode=ro", uri=True)
    try:
        return [(r, c) for r, c in db.execute("SELECT role, content FROM messages ORDER BY chat_id, position")]
    finally:
        db.close()


def _held(win: Any, chat_id: int) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in win.controller.messages(chat_id)]


def _delete_and_chat_on(win: Any, send_and_wait: Callable[[Any, str], int]) -> tuple[Path, int]:
    chat_id = send_and_wait(win, "Written before the delete")
    folder = paths.data_dir()
    shutil.rmtree(folder)  # the user deletes the data folder while the app runs
    send_and_wait(win, "Written after the delete, one")
    send_and_wait(win, "Written after the delete, two")
    assert len(_held(win, chat_id)) == 6  # the app went on: the 4 messages after the delete are held
    return folder, chat_id


def test_the_window_says_the_folder_was_deleted_and_saves_everything_again(
        qtbot: Any, make_window: Any, send_and_wait: Callable[[Any, str], int]) -> None:
    win = make_window()
    folder, chat_id = _delete_and_chat_on(win, send_and_wait)
    assert win.data_guard.timer.isActive()  # checked every CHECK_MS; here at once, to be deterministic

    win.data_guard.check()

    text = win.banner_text("data-folder") or ""  # before the fix: nothing said at all
    assert "was deleted" in text and str(folder) in text and "save them again" in text
    assert not folder.exists()  # nothing re-created it behind the user's back
    banner = win.banners["data-folder"]
    assert banner.action_button is not None and banner.action_button.text() == "Save them again"
    assert [b.text() for b in banner.extra_buttons] == ["Save a copy as…"]

    banner.action_button.click()

    assert _stored(folder) == _held(win, chat_id)  # every message, the 4 written after the delete too
    assert win.banner_text("data-folder") is None
    assert "1 chat with 6 messages saved again" in (win.banner_text("data-folder-saved") or "")
    assert win.data_guard.check() is None
    send_and_wait(win, "Written after saving again")  # the app writes to the new file from now on
    assert _stored(folder) == _held(win, chat_id) and len(_stored(folder)) == 8


@pytest.mark.parametrize("answer", ["Save them again in", "Quit without saving"])
def test_quitting_asks_and_never_recreates_an_empty_folder(
        qtbot: Any, make_window: Any, send_and_wait: Callable[[Any, str], int], monkeypatch: pytest.MonkeyPatch,
        answer: str) -> None:
    win = make_window()
    folder, chat_id = _delete_and_chat_on(win, send_and_wait)
    held = _held(win, chat_id)
    asked: list[str] = []

    def click(box: QMessageBox) -> int:
        asked.append(box.text())
        next(b for b in box.buttons() if b.text().startswith(answer)).click()
        return 0

    monkeypatch.setattr(QMessageBox, "exec", click)
    win.close()  # before the fix: no question; the snapshot written at quit re-created data/snapshots/

    assert len(asked) == 1 and "was deleted" in asked[0]
    if answer == "Quit without saving":  # the user's choice: the chats go, and no empty folder stands in for them
        assert not folder.exists()
        return
    assert _stored(folder) == held
    again = make_window()  # the next start shows every chat
    [entry] = again.sidebar.entries()
    assert _held(again, entry.chat_id) == held
    assert again.banner_text("data-folder") is None


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, DataFolderLock, ChatStore]]:
    """A data folder as the app holds it: its lock and its store (closed and released afterwards)."""
    folder = tmp_path / "data"
    lock = DataFolderLock(folder, owner="app").acquire()
    store = ChatStore(folder / "chats.sqlite3")
    try:
        yield folder, lock, store
    finally:
        store.close()
        lock.release()


def test_the_guard_takes_the_new_folders_lock_so_a_second_start_is_refused(
        qtbot: Any, held: tuple[Path, DataFolderLock, ChatStore]) -> None:
    folder, lock, store = held
    store.add_message(store.create_chat().id, "user", "kept")
    guard = DataFolderGuard(store, lock)
    shutil.rmtree(folder)
    assert not lock.intact()
    assert guard.check() is not None and "was deleted" in (guard.problem or "")

    guard.save_again()

    assert lock.intact() and guard.problem is None
    with pytest.raises(FolderInUseError):  # another process would be refused the re-created folder
        DataFolderLock(folder, owner="app").acquire()
    assert _stored(folder) == [("user", "kept")]


def test_only_the_lock_file_deleted_is_taken_again_quietly(
        qtbot: Any, held: tuple[Path, DataFolderLock, ChatStore]) -> None:
    folder, lock, store = held
    guard = DataFolderGuard(store, lock)
    (folder / "cachet.lock").unlink()
    beside = DataFolderLock(folder, owner="probe").acquire()  # the hole: another lock beside ours was possible
    beside.release()

    assert guard.check() is None  # nothing to tell: the chats are where they were

    assert lock.intact()
    with pytest.raises(FolderInUseError):
        DataFolderLock(folder, owner="app").acquire()


def test_a_folder_taken_meanwhile_is_not_written_and_the_chats_stay_held(
        qtbot: Any, tmp_path: Path, held: tuple[Path, DataFolderLock, ChatStore]) -> None:
    folder, lock, store = held
    chat = store.create_chat()
    store.add_message(chat.id, "user", "kept")
    guard = DataFolderGuard(store, lock)
    shutil.rmtree(folder)
    guard.check()
    other = DataFolderLock(folder, owner="chat").acquire()  # e.g. a terminal chat started on the new folder
    try:
        with pytest.raises(StoreError, match="now used by a terminal chat"):
            guard.save_again()
    finally:
        other.release()

    assert [m.content for m in store.messages(chat.id)] == ["kept"] and guard.problem is not None
    copy = tmp_path / "rescued.sqlite3"
    assert str(copy) in guard.save_copy(copy)
    rescued = ChatStore(copy)
    assert [m.content for m in rescued.messages(chat.id)] == ["kept"]
    rescued.close()
