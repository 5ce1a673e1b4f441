"""Chats survive on disk: every message is committed when it exists, crashes leave replies marked
interrupted, and a chat round-trips through its JSON export."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from engine.specs import CacheSpec, SamplingSettings
from engine.store import SCHEMA_VERSION, ChatSettings, ChatStore, StoreError, auto_title


@pytest.fixture
def store(tmp_path: Path):
    s = ChatStore(tmp_path / "chats.sqlite3")
    yield s
    s.close()


def test_a_message_is_on_disk_as_soon_as_it_is_added(store: ChatStore, tmp_path: Path) -> None:
    chat = store.create_chat(ChatSettings(system_prompt="Be brief.", sampling=SamplingSettings(temperature=0.0),
                                          cache=CacheSpec("dynamic")))
    store.add_message(chat.id, "user", "Hello there")
    # A second connection (another process after a crash) sees it without any close or flush.
    other = sqlite3.connect(tmp_path / "chats.sqlite3")
    assert other.execute("SELECT content FROM messages").fetchall() == [("Hello there",)]
    other.close()


def test_database_uses_wal_foreign_keys_and_a_schema_version(store: ChatStore) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.schema_version() == SCHEMA_VERSION
    chat = store.create_chat()
    store.add_message(chat.id, "user", "x")
    store.delete_chat(chat.id)
    store.purge_deleted()
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0  # cascaded


def test_reopening_keeps_chats_settings_and_token_ids(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    first = ChatStore(path)
    settings = ChatSettings(system_prompt="S", sampling=SamplingSettings(temperature=0.2, top_k=5),
                            cache=CacheSpec("quantized", nbits=2))
    chat = first.create_chat(settings)
    first.add_message(chat.id, "user", "Question?")
    first.add_message(chat.id, "assistant", "Answer.", token_ids=[5, 6, 7], tokens=3, stats={"ttft_ms": 12.0})
    first.close()

    again = ChatStore(path)
    [loaded] = again.chats()
    assert loaded.settings == settings
    assert loaded.title == "Question?"
    user, reply = again.messages(chat.id)
    assert (user.role, user.content, user.complete) == ("user", "Question?", True)
    assert reply.token_ids == (5, 6, 7) and reply.tokens == 3 and reply.stats == {"ttft_ms": 12.0}
    again.close()


def test_a_reply_streaming_when_the_process_died_comes_back_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    first = ChatStore(path)
    chat = first.create_chat()
    first.add_message(chat.id, "user", "Tell me a story")
    reply = first.add_message(chat.id, "assistant", "Once upon", status="streaming")
    first.update_message(reply.id, content="Once upon a time")
    # no finalisation and no close: the process is gone
    again = ChatStore(path)
    assert again.recovered == 1
    restored = again.messages(chat.id)[1]
    assert restored.content == "Once upon a time"
    assert restored.status == "interrupted" and not restored.complete
    again.close()
    first.close()


def test_chats_are_listed_newest_activity_first_and_searchable(store: ChatStore) -> None:
    a = store.create_chat()
    store.add_message(a.id, "user", "About penguins")
    b = store.create_chat()
    store.add_message(b.id, "user", "About volcanoes")
    store.add_message(b.id, "assistant", "Lava is hot.")
    assert [c.id for c in store.chats()] == [b.id, a.id]
    store.add_message(a.id, "assistant", "They live in the south.")
    assert [c.id for c in store.chats()] == [a.id, b.id]
    assert [c.id for c in store.chats("LAVA")] == [b.id]
    assert [c.id for c in store.chats("penguin")] == [a.id]
    assert store.chats("100%") == []


def test_rename_delete_and_undo(store: ChatStore) -> None:
    chat = store.create_chat()
    store.add_message(chat.id, "user", "first message names the chat")
    store.rename(chat.id, "  My   chat ")
    assert store.chat(chat.id).title == "My chat" and not store.chat(chat.id).title_is_auto
    store.delete_chat(chat.id)
    assert store.chats() == []
    store.restore_chat(chat.id)
    assert [c.title for c in store.chats()] == ["My chat"]


def test_truncate_drops_the_edited_message_and_everything_after(store: ChatStore) -> None:
    chat = store.create_chat()
    for role, text in [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]:
        store.add_message(chat.id, role, text)
    store.truncate(chat.id, 2)
    store.add_message(chat.id, "user", "c2")
    assert [(m.position, m.content) for m in store.messages(chat.id)] == [(0, "a"), (1, "b"), (2, "c2")]


def test_json_export_round_trips_messages_and_settings(store: ChatStore) -> None:
    chat = store.create_chat(ChatSettings(system_prompt="Sys", sampling=SamplingSettings(top_p=0.5),
                                          cache=CacheSpec("auto")))
    store.add_message(chat.id, "user", "Hi")
    store.add_message(chat.id, "assistant", "Hel", status="stopped", token_ids=[1, 2])
    exported = json.loads(json.dumps(store.export_json(chat.id)))
    imported = store.import_json(exported)
    assert imported.id != chat.id
    assert imported.settings == store.chat(chat.id).settings
    assert imported.title == "Hi"
    msgs = store.messages(imported.id)
    assert [(m.role, m.content, m.complete) for m in msgs] == [("user", "Hi", True), ("assistant", "Hel", False)]
    assert msgs[1].token_ids is None  # ids belong to one model; an import recomputes them


def test_markdown_export(store: ChatStore) -> None:
    chat = store.create_chat(title="Code")
    store.add_message(chat.id, "user", "Show code")
    store.add_message(chat.id, "assistant", "```py\nprint(1)\n```")
    text = store.export_markdown(chat.id)
    assert text.startswith("# Code\n")
    assert "## You\n\nShow code" in text and "```py\nprint(1)\n```" in text


@pytest.mark.parametrize("bad", [[], {"format": "other"}, {"format": "cachet-chat", "messages": [{"role": "x"}]},
                                 {"format": "cachet-chat", "messages": "no"}])
def test_import_rejects_what_is_not_a_chat_export(store: ChatStore, bad: object) -> None:
    with pytest.raises(StoreError):
        store.import_json(bad)
    assert store.chats() == []


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    ChatStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        ChatStore(path)


def test_auto_title_uses_the_first_line_shortened_at_a_word() -> None:
    assert auto_title("\n  Hello   world \nsecond line") == "Hello world"
    long = "Explain how the key value cache of a transformer model is reused between turns"
    title = auto_title(long)
    assert title.endswith("…") and len(title) <= 49 and long.startswith(title[:-1])


def test_a_version_1_database_is_migrated_and_keeps_its_chats(tmp_path: Path) -> None:
    from engine import store as store_module

    path = tmp_path / "chats.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    store_module.MIGRATIONS[0](db)  # the schema as version 1 left it
    db.execute("INSERT INTO chats (title, created_at, updated_at) VALUES ('Old chat', 1, 1)")
    db.close()
    migrated = ChatStore(path)
    [chat] = migrated.chats()
    assert chat.title == "Old chat" and chat.settings == ChatSettings()  # "{}" in the old columns: the defaults
    assert migrated.schema_version() == SCHEMA_VERSION
    migrated.set_settings(chat.id, ChatSettings(overflow="truncate-middle"))
    assert migrated.chat(chat.id).settings.overflow == "truncate-middle"
    migrated.close()


def test_a_damaged_data_folder_choice_falls_back_to_the_default(tmp_path, monkeypatch) -> None:
    from engine import paths

    monkeypatch.delenv("CACHET_DATA_DIR")
    monkeypatch.setattr(paths, "default_data_dir", lambda: tmp_path / "default")
    paths.location_file().parent.mkdir(parents=True, exist_ok=True)
    for damaged in ("{not json", '{"data_dir": "relative/path"}', '["a list"]', '{"data_dir": 3}'):
        paths.location_file().write_text(damaged)
        assert paths.data_dir() == tmp_path / "default"
    paths.set_data_dir(tmp_path / "chosen")
    assert paths.data_dir() == tmp_path / "chosen"
    monkeypatch.setenv("CACHET_DATA_DIR", str(tmp_path / "flag"))  # --data-dir wins over the choice
    assert paths.data_dir() == tmp_path / "flag"


def test_settings_written_by_an_older_cachet_read_as_typed_settings(tmp_path: Path) -> None:
    """Older rows hold only the sampling values a user changed and no cache strategy ("auto"), or
    fields a newer Cachet added: they read as the defaults plus what is there."""
    store = ChatStore(tmp_path / "chats.sqlite3")
    chat = store.create_chat()
    store.db.execute("UPDATE chats SET sampling = ?, cache = ? WHERE id = ?",
                     (json.dumps({"temperature": 0.3, "min_p": 0.05}), json.dumps({"window": 256}), chat.id))
    settings = store.chat(chat.id).settings
    assert settings.sampling == SamplingSettings(temperature=0.3)
    assert settings.cache == CacheSpec("auto", window=256)
    store.close()
