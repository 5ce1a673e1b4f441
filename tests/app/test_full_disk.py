"""A full disk during a reply and on send (issue 12 item 2): every write failure is caught where it
happens, the chat stays usable with everything in memory, the user is told, and it is all written —
nothing left marked streaming — once the disk has space again.

The disk is filled by injection: the store's connection refuses every change with SQLite's own
"database or disk is full" while `full` is set."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from engine.store import ChatStore
from tests.conftest import TURN_TIMEOUT_MS

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class FullDisk:
    """Wraps a sqlite3.Connection; while `full`, statements that change the database fail as SQLite
    fails them on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.full = False
        self.refused = 0

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self.full and sql.lstrip().upper().startswith(WRITES):
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        if self.full:
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _fill(store: ChatStore) -> FullDisk:
    disk = FullDisk(store.db)
    store.db = disk  # type: ignore[assignment]
    return disk


def _rows(store: ChatStore, chat_id: int) -> list[tuple[str, str, str]]:
    return [(m.role, m.status, m.content) for m in store.messages(chat_id)]


def test_a_disk_that_fills_up_during_a_reply_loses_nothing(qtbot: Any, make_window: Any) -> None:
    win = make_window(sampling={"temperature": 0.0, "max_new_tokens": 40, "repetition_penalty": 1.0})
    disk = _fill(win.store)
    chat_id = win.new_chat()
    disk.full = True

    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
        win.send("Tell me about the sea")  # before the fix: OperationalError in every slot, "generating…" forever

    assert disk.refused > 0
    rt = win.controller.runtime(chat_id)
    assert not rt.busy and not win.composer.generating  # the Stop button is Send again
    shown = win.controller.messages(chat_id)
    assert [m.role for m in shown] == ["user", "assistant"]
    assert shown[0].content == "Tell me about the sea" and shown[1].status == "done" and shown[1].content
    assert "Disk full" in (win.banner_text("unsaved") or "")
    assert _rows(win.store, chat_id) == []  # nothing could be written yet

    disk.full = False
    with qtbot.waitSignal(win.controller.save_state_changed, timeout=10_000):
        pass  # retried every RETRY_MS
    assert not win.controller.unsaved and win.banner_text("unsaved") is None
    assert _rows(win.store, chat_id) == [(m.role, m.status, m.content) for m in shown]
    assert win.store.db.execute("SELECT COUNT(*) FROM messages WHERE status = 'streaming'").fetchone()[0] == 0
    assert win.store.chat(chat_id).title == "Tell me about the sea"

    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
        win.send("And the mountains?")  # usable again
    assert [m.status for m in win.store.messages(chat_id)] == ["done"] * 4


def test_the_disk_filling_mid_stream_keeps_the_partial_row_and_finishes_it_later(
        qtbot: Any, make_window: Any) -> None:
    win = make_window(sampling={"temperature": 0.0, "max_new_tokens": 60, "repetition_penalty": 1.0})
    disk = _fill(win.store)
    chat_id = win.new_chat()
    def fill_up(_chat: int) -> None:  # after the first token's row was written
        disk.full = True

    win.controller.stream_changed.connect(fill_up)
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
        win.send("Stream to a full disk")
    stored = _rows(win.store, chat_id)
    assert [s for _, s, _ in stored] == ["done", "streaming"]  # the first token's row, then the disk filled
    win.controller.stream_changed.disconnect(fill_up)
    disk.full = False
    assert win.controller.flush_unsaved()
    final = win.controller.messages(chat_id)[-1]
    assert _rows(win.store, chat_id)[-1] == ("assistant", "done", final.content)
    assert final.id > 0 and len(final.content) >= len(stored[1][2])


def test_a_failed_rename_or_new_chat_says_so(qtbot: Any, make_window: Any) -> None:
    win = make_window()
    disk = _fill(win.store)
    chat_id = win.new_chat()
    disk.full = True
    win.controller.rename(chat_id, "New name")
    assert "Could not save the new title" in (win.banner_text("write") or "")
    assert win.new_chat() is None
    assert "Could not start a new chat" in (win.banner_text("write") or "")
    disk.full = False
