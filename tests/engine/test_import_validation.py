"""Hostile or large imports (issue 12 items 3 and 7): every value is checked against the typed specs
before anything is stored, wrong types and deep nesting are refused with a sentence naming the
problem, and what one import may hold is bounded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine import store as store_module
from engine.store import ChatStore, StoreError, load_import


@pytest.fixture
def store(tmp_path: Path):
    s = ChatStore(tmp_path / "chats.sqlite3")
    yield s
    s.close()


def _export(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"format": "cachet-chat", "version": 1, "title": "Imported",
                            "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "hello", "complete": True}]}
    data.update(changes)
    return data


def test_settings_that_cannot_work_are_reset_with_a_sentence_each(store: ChatStore) -> None:
    imported = store.import_chat(_export(settings={
        "sampling": {"temperature": "hot", "top_p": float("nan"), "max_new_tokens": 64},
        "cache": {"strategy": "sink", "window": "wide", "max_cache_len": 1e12, "sink_tokens": 8},
        "overflow": "explode", "system_prompt": ["not", "text"]}))
    settings = store.chat(imported.chat.id).settings  # before the fix: stored as given, a crash on every start
    assert settings.sampling.temperature == 0.7 and settings.sampling.top_p == 0.95
    assert settings.sampling.max_new_tokens == 64  # the valid values are kept
    assert settings.cache.strategy == "sink" and settings.cache.window == 1024 and settings.cache.sink_tokens == 8
    assert settings.overflow == "stop" and settings.system_prompt == ""
    settings.sampling.validate()
    settings.cache.validate()
    text = " ".join(imported.repaired)
    for name in ("temperature", "top p", "window", "max cache len", "overflow", "system prompt"):
        assert name in text


@pytest.mark.parametrize("bad, says", [
    (_export(version="1"), "version"),
    (_export(version=[1]), "version"),
    (_export(messages=[{"role": "user", "content": 3}]), "Message 1"),
    (_export(messages=[{"role": "system", "content": "x"}]), "Message 1"),
    (_export(messages=[{"role": "user", "content": "x", "complete": "yes"}]), "complete"),
    (_export(messages={"0": "x"}), "list of messages"),
    ([1, 2], "not a Cachet chat export"),
])
def test_wrong_types_are_refused_with_a_message_naming_the_problem(store: ChatStore, bad: Any, says: str) -> None:
    with pytest.raises(StoreError, match=says):
        store.import_chat(bad)
    assert store.chats() == []


def test_an_import_is_bounded(store: ChatStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(store_module, "MAX_IMPORT_MESSAGES", 10)
    with pytest.raises(StoreError, match="at most 10"):
        store.import_chat(_export(messages=[{"role": "user", "content": "x"}] * 11))
    assert store.chats() == []
    monkeypatch.setattr(store_module, "MAX_IMPORT_BYTES", 100)
    big = tmp_path / "big.json"
    big.write_text(json.dumps(_export(title="x" * 200)))
    with pytest.raises(StoreError, match="at most"):
        load_import(big)


@pytest.mark.parametrize("text, says", [
    ("[" * 100_000 + "]" * 100_000, "nested"),  # before the fix: RecursionError, no dialog
    ('{"format": "cachet-chat", "messages": [' + "{" * 70 + "}" * 70 + "]}", "nested"),
    ("{not json", "not valid JSON"),
    ('{"a": NaN', "not valid JSON"),
])
def test_unparseable_or_deeply_nested_files_are_refused(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "chat.json"
    path.write_text(text)
    with pytest.raises(StoreError, match=says):
        load_import(path)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path: Path, store: ChatStore) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(_export(messages=[{"role": "user", "content": "[" * 1000 + '\\"{' * 100}])))
    imported = store.import_chat(load_import(path))
    assert store.messages(imported.chat.id)[0].content.startswith("[[[")


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(StoreError, match="UTF-8"):
        load_import(path)


def test_bidi_controls_are_removed_from_titles(store: ChatStore) -> None:
    imported = store.import_chat(_export(title="a \u202elive\u202c chat\u2066x\u2069"))
    assert imported.chat.title == "a live chatx"
    chat = store.create_chat()
    store.add_message(chat.id, "user", "\u202eevil\nsecond line")
    assert store.chat(chat.id).title == "evil"
    store.rename(chat.id, "re\u200fnamed\u0007")
    assert store.chat(chat.id).title == "renamed"
    # a title stored by an older version is cleaned when read
    store.db.execute("UPDATE chats SET title = ? WHERE id = ?", ("old \u202etitle", chat.id))
    assert store.chat(chat.id).title == "old title"
