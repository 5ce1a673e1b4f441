"""Hostile or large imports (issue 12 items 3 and 7): every value is checked against the typed specs
before anything is stored, wrong types and deep nesting are refused with a sentence naming the
problem, and what one import may hold is bounded. Text that cannot be stored (a lone surrogate), named
pipes and links to devices are refused with a sentence, and every file is read bounded (issue 23 §7 item 3)."""

from __future__ import annotations

import json
import os
import re
import threading
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


@pytest.mark.parametrize("where, data, says", [
    ("content", _export(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\ud800b"}]),
     "Message 2's text holds a lone surrogate (U+D800)"),
    ("title", _export(title="\udfff"), "The title holds a lone surrogate (U+DFFF)"),
    ("system prompt", _export(settings={"system_prompt": "x\ud83d"}), "The system prompt holds a lone surrogate"),
    ("a key", _export(settings={"sampling": {"\ud800": 1}}), "lone surrogate"),
])
def test_text_that_cannot_be_stored_is_refused_before_anything_is_written(
        store: ChatStore, tmp_path: Path, where: str, data: Any, says: str) -> None:
    """The probe's attack: "\\ud800" in a JSON string passed validation, then executemany raised
    UnicodeEncodeError halfway through storing the chat — no dialog, no chat."""
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(data))  # json escapes it as \\ud800: valid JSON, not valid text
    parsed = load_import(path)
    with pytest.raises(StoreError, match=re.escape(says)):
        store.import_chat(parsed)  # before the fix: UnicodeEncodeError
    assert store.chats() == []
    assert store.import_chat(_export()).chat.title == "Imported"  # the store is usable afterwards


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "chat.json"
    os.mkfifo(fifo)
    # Before the fix the read blocked until something wrote to the pipe (the GUI thread hung): a writer
    # thread unblocks it if it does, so this test ends either way and fails on the content.
    unblock = threading.Timer(30, lambda: fifo.write_bytes(json.dumps(_export()).encode()))
    unblock.start()
    try:
        with pytest.raises(StoreError, match="not a regular file but a named pipe"):
            load_import(fifo)
    finally:
        unblock.cancel()


def test_a_link_to_a_device_is_refused_and_nothing_is_read_from_it(tmp_path: Path) -> None:
    """The probe's link named .json to /dev/zero: the size check read st_size 0 and the read filled the
    memory. The test links to /dev/null, a device that ends, so that without the fix it fails (on the
    message) instead of filling this machine's memory."""
    link = tmp_path / "chat.json"
    link.symlink_to("/dev/null")
    with pytest.raises(StoreError, match=r"not a regular file but a device \(/dev/null\)"):
        load_import(link)


def test_a_file_that_reports_no_size_is_still_read_bounded(tmp_path: Path, monkeypatch) -> None:
    """The size check alone trusted st_size: a regular file that reports 0 bytes and holds more (as files
    under /proc do, or one that grows after the check) was read whole. Now at most the limit + 1 byte is."""
    monkeypatch.setattr(store_module, "MAX_IMPORT_BYTES", 100)
    maps = Path(f"/proc/{os.getpid()}/maps")
    assert maps.stat().st_size == 0 and len(maps.read_bytes()) > 100
    link = tmp_path / "chat.json"
    link.symlink_to(maps)
    with pytest.raises(StoreError, match="larger than"):  # before the fix: read whole, then "not valid JSON"
        load_import(link)
    small = tmp_path / "small.json"  # a link to a regular file within the limit is read as the file
    small.write_text(json.dumps({"format": "cachet-chat"}))
    (tmp_path / "small-link.json").symlink_to(small)
    assert load_import(tmp_path / "small-link.json") == {"format": "cachet-chat"}
