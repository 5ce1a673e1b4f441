"""A database file deleted, moved or replaced under an open store (issue 23 §7 item 2, the store's half):
SQLite goes on with the open file, so the store must say so (`detached`) and be able to write what it
holds to a fresh file (`save_to`) without losing or overwriting anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.store import ChatStore


@pytest.fixture
def store(tmp_path: Path):
    s = ChatStore(tmp_path / "data" / "chats.sqlite3")
    chat = s.create_chat()
    s.add_message(chat.id, "user", "before")
    yield s
    s.close()


def _contents(path: Path) -> list[str]:
    other = ChatStore(path)
    try:
        return [m.content for c in other.chats() for m in other.messages(c.id)]
    finally:
        other.close()


def test_the_store_knows_when_its_file_is_gone_and_goes_on_in_memory_of_it(store: ChatStore) -> None:
    assert store.detached() is None
    store.path.unlink()
    assert "chat database" in (store.detached() or "") and "was deleted" in (store.detached() or "")
    shutil.rmtree(store.path.parent)
    assert "data folder" in (store.detached() or "")
    store.add_message(1, "assistant", "after")  # SQLite writes on into the unlinked file, silently
    assert [m.content for m in store.messages(1)] == ["before", "after"]


def test_a_replaced_file_is_noticed_and_kept_aside_when_saving_again(store: ChatStore) -> None:
    path = store.path
    for suffix in ("", "-wal", "-shm"):  # rm chats.sqlite3*, then another start made an empty database there
        Path(str(path) + suffix).unlink(missing_ok=True)
    ChatStore(path).close()
    assert "replaced" in (store.detached() or "")
    store.add_message(1, "assistant", "after")

    said = store.save_to()

    assert "1 chat with 2 messages saved again" in said and ".found-" in said
    [found] = list(path.parent.glob("chats.sqlite3.found-*[0-9]"))
    assert sorted(p.name for p in path.parent.iterdir() if "found" in p.name) == [found.name]
    assert _contents(found) == []  # the file that was there is kept, not overwritten
    assert store.detached() is None and store.path == path
    store.add_message(1, "user", "after saving again")
    assert _contents(path) == ["before", "after", "after saving again"]


def test_closing_a_detached_store_records_nothing_in_a_folder_made_meanwhile(store: ChatStore) -> None:
    folder = store.path.parent
    shutil.rmtree(folder)
    folder.mkdir()  # another program made the folder again
    store.close()
    assert list(folder.iterdir()) == []  # before: chats.sqlite3.closed, the record of a file that is not there
    store.db = ChatStore(folder / "x.sqlite3").db  # for the fixture's close


def test_only_the_database_file_deleted_is_saved_again_beside_its_old_log(store: ChatStore) -> None:
    """rm chats.sqlite3 leaves chats.sqlite3-wal and -shm of the open database at their names: they must not be
    replayed into the new file (SQLite would apply another database's pages to it)."""
    store.add_message(1, "assistant", "in the log")
    store.path.unlink()
    assert Path(str(store.path) + "-wal").exists()
    store.add_message(1, "user", "after")

    store.save_to()

    store.add_message(1, "assistant", "after saving again")
    assert _contents(store.path) == ["before", "in the log", "after", "after saving again"]
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
