"""A damaged chat database never stops a start (issue 12 item 4): the damaged file is kept aside,
what SQLite can still read is salvaged into a fresh database, and the user is told; writes lost with
a damaged write-ahead log are noticed. A damaged header is rebuilt to read the pages behind it
(issue 23 §7 item 4)."""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from engine.store import ChatStore

PAGE = 4096


def _filled(path: Path, chats: int = 20, per_chat: int = 20) -> dict[int, str]:
    store = ChatStore(path)
    texts: dict[int, str] = {}
    for c in range(chats):
        chat = store.create_chat()
        for i in range(per_chat):
            m = store.add_message(chat.id, "user" if i % 2 == 0 else "assistant", f"chat {c} message {i} " + "x" * 300)
            texts[m.id] = m.content
    store.close()
    return texts


def test_a_damaged_page_is_salvaged_and_the_damaged_file_kept(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    texts = _filled(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // PAGE // 2
    data[middle * PAGE:(middle + 1) * PAGE] = b"\xa5" * PAGE
    path.write_bytes(bytes(data))

    store = ChatStore(path)  # before the fix: sqlite3.DatabaseError at start-up

    assert store.salvaged is not None and "damaged" in store.salvaged
    [kept] = list(tmp_path.glob("chats.sqlite3.damaged-*[0-9]"))
    assert kept.read_bytes() == bytes(data)  # the damaged file is kept as it was
    assert kept.name in store.salvaged
    salvaged = [m for chat in store.chats() for m in store.messages(chat.id)]
    assert len(salvaged) >= len(texts) - 2 * PAGE // 300  # one page of rows lost at most
    assert all(texts[m.id] == m.content for m in salvaged)  # what was read is intact
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    chat = store.create_chat()
    store.add_message(chat.id, "user", "still works")
    store.close()
    assert ChatStore(path).salvaged is None  # the fresh database opens cleanly next time


def test_a_file_that_is_not_a_database_opens_as_an_empty_salvaged_store(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    path.write_bytes(b"this is not a database" * 200)
    store = ChatStore(path)
    assert store.salvaged is not None and store.chats() == []
    assert list(tmp_path.glob("chats.sqlite3.damaged-*"))
    store.close()


def test_writes_lost_with_a_damaged_write_ahead_log_are_noticed(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    chat = store.create_chat()
    store.add_message(chat.id, "user", "kept")
    store.close()
    before = path.read_bytes()
    store = ChatStore(path)
    store.add_message(chat.id, "user", "written in the last session")
    store.close()
    # What a damaged -wal does: the last session's transactions vanish and the file is as before.
    path.write_bytes(before)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    store = ChatStore(path)
    assert store.lost_writes is not None and "lost" in store.lost_writes
    store.close()
    assert ChatStore(path).lost_writes is None  # told once: this close records the state as it is


def test_a_damaged_settings_row_or_token_ids_do_not_stop_reading_the_chats(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    chat = store.create_chat()
    store.add_message(chat.id, "assistant", "reply", token_ids=[1, 2, 3])
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE chats SET sampling = '{\"temperature\": \"hot\"}', cache = 'not json', overflow = 'x'")
    db.execute("UPDATE messages SET token_ids = '[1, \"a\"]', stats = '[[[', status = 'weird'")
    db.commit()
    db.close()
    store = ChatStore(path)
    [read] = store.chats()
    assert read.settings.sampling.temperature == 0.7 and read.settings.cache.strategy == "auto"
    assert read.settings.overflow == "stop"
    [message] = store.messages(chat.id)
    assert message.content == "reply" and message.token_ids is None and message.stats is None
    assert message.status == "interrupted"
    store.close()


def _crash_image(path: Path, image: Path) -> None:
    """What a kill leaves: the database and its write-ahead log as they were on disk, never checkpointed."""
    store = ChatStore(path)
    chat = store.create_chat()
    store.add_message(chat.id, "user", "kept")
    store.close()  # a clean close: checkpointed into the database
    store = ChatStore(path)
    store.add_message(chat.id, "user", "written before the kill")
    store.add_message(chat.id, "assistant", "also written before the kill")
    image.mkdir()
    for suffix in ("", "-wal"):
        (image / (path.name + suffix)).write_bytes(Path(str(path) + suffix).read_bytes())
    store.close()


def test_a_damaged_write_ahead_log_left_by_a_kill_is_noticed_and_kept(tmp_path: Path) -> None:
    """The fault-injection run found it: a kill leaves the last turn in the -wal only; damage there made
    SQLite drop it silently (the last clean close's record agreed with what was left)."""
    _crash_image(tmp_path / "chats.sqlite3", tmp_path / "killed")
    intact = ChatStore(tmp_path / "killed" / "chats.sqlite3", check=True)
    [chat] = intact.chats()
    assert [m.content for m in intact.messages(chat.id)] == ["kept", "written before the kill",
                                                             "also written before the kill"]
    assert intact.lost_writes is None  # an intact log left by a kill is replayed, nothing to say
    intact.close()

    _crash_image(tmp_path / "again.sqlite3", tmp_path / "damaged")
    path = tmp_path / "damaged" / "again.sqlite3"
    wal = Path(str(path) + "-wal")
    data = bytearray(wal.read_bytes())
    for i in range(32 + 24 + 100, 32 + 24 + 164):  # inside the first frame's page: its checksum fails
        data[i] ^= 0x5A
    wal.write_bytes(bytes(data))

    store = ChatStore(path)

    assert [m.content for m in store.messages(chat.id)] == ["kept"]  # SQLite dropped the log
    assert store.lost_writes is not None and "write-ahead log was damaged" in store.lost_writes
    [kept] = list(path.parent.glob("again.sqlite3-wal.damaged-*"))
    assert kept.read_bytes() == bytes(data) and kept.name in store.lost_writes
    assert not list(path.parent.glob(".*.check"))
    store.close()
    assert ChatStore(path).lost_writes is None  # told once


def _with_page_size(path: Path, page_size: int) -> None:
    """An empty WAL database of `page_size` (ChatStore creates its tables in it), as another SQLite build
    or a future Cachet may make."""
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA page_size = {page_size}")  # applies when the first table makes the file
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")  # as ChatStore creates it
    db.close()
    assert len(path.read_bytes()) % page_size == 0 and path.read_bytes()[16:18] == (page_size % 65536 or 1).to_bytes(2)


@pytest.mark.parametrize("page_size", [1024, 4096, 8192, 65536])
@pytest.mark.parametrize("killed", [False, True], ids=["closed", "killed"])
def test_a_damaged_header_is_rebuilt_and_every_chat_read(tmp_path: Path, page_size: int, killed: bool) -> None:
    """The probe's attack: 100 garbled bytes at the start of chats.sqlite3. The pages are intact, but
    SQLite reads it as "not a database": salvage found 0 chats. Restoring a standard header reads all."""
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "chats.sqlite3"
    _with_page_size(path, page_size)
    store = ChatStore(path)
    chats = {}
    for c in range(2):
        chat = store.create_chat(title=f"chat {c}")
        for i in range(3):
            store.add_message(chat.id, "user" if i % 2 == 0 else "assistant", f"chat {c} message {i}")
        chats[chat.id] = [m.content for m in store.messages(chat.id)]
    if killed:  # the last changes only in the write-ahead log, as a kill leaves them
        store.close()
        store = ChatStore(path)
        store.add_message(1, "user", "written just before the kill")
        chats[1].append("written just before the kill")
        image = tmp_path / "image"
        image.mkdir()
        for suffix in ("", "-wal"):
            (image / (path.name + suffix)).write_bytes(Path(str(path) + suffix).read_bytes())
        store.close()
        shutil.rmtree(folder)
        image.rename(folder)
        assert Path(str(path) + "-wal").stat().st_size > 0
    else:
        store.close()
    data = bytearray(path.read_bytes())
    data[:100] = random.Random(page_size).randbytes(100)
    path.write_bytes(bytes(data))

    salvaged = ChatStore(path)

    assert salvaged.salvaged is not None and "header" in salvaged.salvaged and "rebuilt" in salvaged.salvaged
    assert f"pages of {page_size:,} bytes" in salvaged.salvaged
    assert {c.id: [m.content for m in salvaged.messages(c.id)] for c in salvaged.chats()} == chats  # before: {}
    assert f"{len(chats)} chats and {sum(map(len, chats.values()))} messages" in salvaged.salvaged
    [kept] = list(folder.glob("chats.sqlite3.damaged-*[0-9]"))
    assert kept.read_bytes() == bytes(data)  # the damaged file is kept as it was
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the rebuilt copy is gone
    salvaged.close()


def test_a_new_database_still_in_its_write_ahead_log_is_not_taken_for_a_damaged_one(tmp_path: Path) -> None:
    """A new database's schema is only in its -wal until a checkpoint: the main file's header then reads 0 for
    the schema format and the text encoding. A second opening (another store, a restart after a kill) must use
    it as it is, not salvage it: salvage replaced the file under the first store, which then said the chats
    were no longer on disk."""
    path = tmp_path / "chats.sqlite3"
    first = ChatStore(path)
    chat = first.create_chat()
    first.add_message(chat.id, "user", "hello")
    second = ChatStore(path)
    try:
        assert first.detached() is None and second.detached() is None
        assert [m.content for m in second.messages(chat.id)] == ["hello"]
        assert not list(tmp_path.glob("*.damaged-*"))
    finally:
        second.close()
        first.close()
