"""A write the disk refuses (issue 12 item 2, the store's half): it raises StoreWriteError, which says
the disk is full, and leaves what was stored before intact. SQLite's max_page_count gives a real
SQLITE_FULL without filling a disk. A start on a full disk says the disk is full too (issue 23 §7
item 5), not SQLite's "disk I/O error"."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from engine import store as store_module
from engine.store import DISK_FULL, ChatStore, StoreError, StoreWriteError


def _fill_up(store: ChatStore) -> None:
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_raises_store_write_error_and_keeps_what_was_stored(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "chats.sqlite3")
    chat = store.create_chat()
    first = store.add_message(chat.id, "user", "before the disk filled up")
    reply = store.add_message(chat.id, "assistant", "partial", status="streaming")
    _fill_up(store)
    with pytest.raises(StoreWriteError) as info:
        store.add_message(chat.id, "user", "y" * 20_000)
    assert info.value.disk_full and "full" in str(info.value)
    with pytest.raises(StoreWriteError):
        store.update_message(reply.id, content="z" * 20_000, status="done")
    assert [m.content for m in store.messages(chat.id)] == [first.content, "partial"]
    assert not store.db.in_transaction  # nothing half-done left open
    store.db.execute("PRAGMA max_page_count = 1073741823")  # space freed
    store.update_message(reply.id, content="z" * 20_000, status="done")
    assert store.message(reply.id).status == "done"
    store.close()


class _FullDiskAtStart:
    """A connection on a full disk, as SQLite reports it when a WAL database is opened there: growing its
    shared-memory file fails with SQLITE_IOERR_SHMSIZE, "disk I/O error" (seen on a full tmpfs)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if sql.startswith("PRAGMA journal_mode"):
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"  # type: ignore[attr-defined]
            raise error
        return self.db.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@pytest.mark.parametrize("free, full", [(0, True), (50 * 2**30, False)])
def test_a_start_on_a_full_disk_says_the_disk_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      free: int, full: bool) -> None:
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    store.add_message(store.create_chat().id, "user", "kept")
    store.close()
    connect = sqlite3.connect
    monkeypatch.setattr(store_module.sqlite3, "connect", lambda *a, **k: _FullDiskAtStart(connect(*a, **k)))
    monkeypatch.setattr(store_module.shutil, "disk_usage",
                        lambda _folder: SimpleNamespace(total=2**30, used=2**30 - free, free=free))

    with pytest.raises(StoreError) as info:
        ChatStore(path)

    if full:  # before the fix: "Cannot open …/chats.sqlite3: disk I/O error."
        assert isinstance(info.value, StoreWriteError) and info.value.disk_full
        assert str(info.value).startswith(DISK_FULL) and str(tmp_path) in str(info.value)
        assert "I/O" not in str(info.value)
    else:  # an I/O error with space left is not called a full disk
        assert "disk I/O error" in str(info.value) and DISK_FULL not in str(info.value)
    monkeypatch.undo()
    again = ChatStore(path)  # nothing was changed by the refused start
    [chat] = again.chats()
    assert [m.content for m in again.messages(chat.id)] == ["kept"]
    again.close()
