"""A write the disk refuses (issue 12 item 2, the store's half): it raises StoreWriteError, which says
the disk is full, and leaves what was stored before intact. SQLite's max_page_count gives a real
SQLITE_FULL without filling a disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.store import ChatStore, StoreWriteError


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
