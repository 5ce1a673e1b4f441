"""Chats on disk: one SQLite file (WAL mode) holding every conversation, its messages and settings.

Every change is committed at once, so a crash or a kill loses at most what had not been
written yet. A reply that was still streaming when the process died is found with status
"streaming" on the next open and marked "interrupted" (`StoredMessage.complete` is False).

Per-chat settings are stored with each chat: the system prompt, `SamplingSettings.to_dict()` and
`CacheSpec.to_dict()` (whose strategy may also be "auto") as JSON, and the overflow policy.
Assistant replies keep the token ids the model generated, so cache reuse survives a restart.

This module imports neither Qt nor torch: the app opens the store before the model loads.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import paths
from engine.specs import AUTO, CacheSpec, SamplingSettings

DB_NAME = "chats.sqlite3"
EXPORT_FORMAT = "cachet-chat"
EXPORT_VERSION = 1
STATUSES = ("done", "streaming", "stopped", "error", "interrupted")
TITLE_CHARS = 48


class StoreError(RuntimeError):
    """The chat database or an imported file cannot be used; the message is meant for the user."""


@dataclass(frozen=True)
class ChatSettings:
    """What a chat remembers besides its messages: its system prompt, sampling, cache strategy
    (which may be "auto") and overflow policy, as the typed settings of engine.specs.

    They are stored as they were chosen; they are validated where they are used (a turn reports
    a setting that cannot work, and the chat keeps it until the user changes it).
    """

    system_prompt: str = ""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    cache: CacheSpec = field(default_factory=lambda: CacheSpec(AUTO))
    overflow: str = "stop"  # SessionSettings.overflow: what to do when the chat outgrows the context
    speculative: str = "auto"  # SessionSettings.speculative: guessed tokens checked several per step

    def to_dict(self) -> dict[str, Any]:
        return {"system_prompt": self.system_prompt, "sampling": self.sampling.to_dict(),
                "cache": self.cache.to_dict(), "overflow": self.overflow, "speculative": self.speculative}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatSettings:
        """From `to_dict` output (fields an older or newer Cachet wrote and this one does not know are ignored)."""
        sampling = data.get("sampling") or {}
        cache = data.get("cache") or {}
        if not isinstance(sampling, dict) or not isinstance(cache, dict):
            raise StoreError("The chat's settings are not in the expected form (sampling and cache must be objects).")
        try:
            return cls(system_prompt=str(data.get("system_prompt") or ""),
                       sampling=SamplingSettings.from_dict(sampling),
                       cache=CacheSpec.from_dict({"strategy": AUTO, **cache}),
                       overflow=str(data.get("overflow") or "stop"),
                       speculative=str(data.get("speculative") or "auto"))
        except TypeError as exc:
            raise StoreError(f"The chat's settings are not in the expected form ({exc}).") from exc


@dataclass(frozen=True)
class StoredChat:
    id: int
    title: str
    title_is_auto: bool  # still named after its first message; a rename makes it False
    created_at: float
    updated_at: float  # last activity: a message added or changed
    settings: ChatSettings


@dataclass(frozen=True)
class StoredMessage:
    id: int
    chat_id: int
    position: int  # 0, 1, 2, ... within the chat
    role: str  # "user" | "assistant"
    content: str
    status: str  # one of STATUSES
    token_ids: tuple[int, ...] | None = None  # assistant replies: the ids the model generated
    tokens: int | None = None  # the message's length in tokens, when known
    stats: dict[str, Any] | None = None  # assistant replies: TurnStats.to_dict() of the turn
    created_at: float = 0.0

    @property
    def complete(self) -> bool:
        """False for a reply that was stopped, failed, or cut off by a crash."""
        return self.status == "done"


def _v1(db: sqlite3.Connection) -> None:
    _run_script(
        db,
        """
        CREATE TABLE chats (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            title_is_auto INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            system_prompt TEXT NOT NULL DEFAULT '',
            sampling TEXT NOT NULL DEFAULT '{}',
            cache TEXT NOT NULL DEFAULT '{}',
            deleted_at REAL
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'done',
            token_ids TEXT,
            tokens INTEGER,
            stats TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (chat_id, position)
        );
        CREATE INDEX messages_by_chat ON messages(chat_id, position);
        CREATE INDEX chats_by_activity ON chats(updated_at DESC);
        """
    )


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the migration's transaction halfway; run statement by statement.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _v2(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE chats ADD COLUMN overflow TEXT NOT NULL DEFAULT 'stop'")


# Migration i brings the schema from version i to i + 1. Append, never edit a released one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    return paths.data_dir() / DB_NAME


class ChatStore:
    """All chats of one data folder. Use from one thread (the GUI's); every method commits."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a process crash
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable chat database ({exc}).") from exc
        self.recovered = self._recover_interrupted()

    # ----- housekeeping -----------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def schema_version(self) -> int:
        row = self.db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        with self._transaction() as db:
            if db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer Cachet (schema {current}, this one knows {SCHEMA_VERSION})."
                )
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](db)
                db.execute("UPDATE schema_version SET version = ?", (version + 1,))

    def _recover_interrupted(self) -> int:
        """Replies still "streaming" belong to a process that died: mark them interrupted."""
        cur = self.db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
        return cur.rowcount

    def close(self) -> None:
        self.db.close()

    # ----- chats ---------------------------------------------------------------------------------
    def create_chat(self, settings: ChatSettings | None = None, title: str = "") -> StoredChat:
        settings = settings or ChatSettings()
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO chats (title, title_is_auto, created_at, updated_at, system_prompt, sampling, cache, "
            "overflow) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (title, 0 if title else 1, now, now, settings.system_prompt, json.dumps(settings.sampling.to_dict()),
             json.dumps(settings.cache.to_dict()), settings.overflow),
        )
        return self.chat(int(cur.lastrowid or 0))

    def chat(self, chat_id: int) -> StoredChat:
        row = self.db.execute("SELECT * FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if row is None:
            raise KeyError(chat_id)
        return self._chat_from_row(row)

    @staticmethod
    def _chat_from_row(row: sqlite3.Row) -> StoredChat:
        return StoredChat(
            id=int(row["id"]), title=row["title"], title_is_auto=bool(row["title_is_auto"]),
            created_at=float(row["created_at"]), updated_at=float(row["updated_at"]),
            settings=ChatSettings.from_dict({"system_prompt": row["system_prompt"], "overflow": row["overflow"],
                                             "sampling": json.loads(row["sampling"]),
                                             "cache": json.loads(row["cache"])}),
        )

    def chats(self, search: str = "") -> list[StoredChat]:
        """Chats newest activity first; `search` matches titles and message text (case-insensitive)."""
        if not search.strip():
            rows = self.db.execute(
                "SELECT * FROM chats WHERE deleted_at IS NULL ORDER BY updated_at DESC, id DESC"
            ).fetchall()
        else:
            pattern = "%" + search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = self.db.execute(
                "SELECT * FROM chats c WHERE deleted_at IS NULL AND (c.title LIKE ?1 ESCAPE '\\' OR EXISTS "
                "(SELECT 1 FROM messages m WHERE m.chat_id = c.id AND m.content LIKE ?1 ESCAPE '\\')) "
                "ORDER BY updated_at DESC, id DESC",
                (pattern,),
            ).fetchall()
        return [self._chat_from_row(r) for r in rows]

    def rename(self, chat_id: int, title: str) -> None:
        title = " ".join(title.split())
        self.db.execute("UPDATE chats SET title = ?, title_is_auto = ? WHERE id = ?",
                        (title, 0 if title else 1, chat_id))

    def set_settings(self, chat_id: int, settings: ChatSettings) -> None:
        self.db.execute(
            "UPDATE chats SET system_prompt = ?, sampling = ?, cache = ?, overflow = ? WHERE id = ?",
            (settings.system_prompt, json.dumps(settings.sampling.to_dict()), json.dumps(settings.cache.to_dict()),
             settings.overflow, chat_id),
        )

    def delete_chat(self, chat_id: int) -> None:
        """Hide a chat; `restore_chat` brings it back until `purge_deleted` removes it for good."""
        self.db.execute("UPDATE chats SET deleted_at = ? WHERE id = ?", (time.time(), chat_id))

    def restore_chat(self, chat_id: int) -> None:
        self.db.execute("UPDATE chats SET deleted_at = NULL WHERE id = ?", (chat_id,))

    def purge_deleted(self) -> int:
        cur = self.db.execute("DELETE FROM chats WHERE deleted_at IS NOT NULL")
        return cur.rowcount

    def _touch(self, chat_id: int, now: float) -> None:
        self.db.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id))

    # ----- messages ------------------------------------------------------------------------------
    def messages(self, chat_id: int) -> list[StoredMessage]:
        rows = self.db.execute("SELECT * FROM messages WHERE chat_id = ? ORDER BY position", (chat_id,)).fetchall()
        return [self._message_from_row(r) for r in rows]

    def message(self, message_id: int) -> StoredMessage:
        row = self.db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise KeyError(message_id)
        return self._message_from_row(row)

    @staticmethod
    def _message_from_row(row: sqlite3.Row) -> StoredMessage:
        ids = json.loads(row["token_ids"]) if row["token_ids"] else None
        return StoredMessage(
            id=int(row["id"]), chat_id=int(row["chat_id"]), position=int(row["position"]), role=row["role"],
            content=row["content"], status=row["status"], token_ids=tuple(ids) if ids is not None else None,
            tokens=row["tokens"], stats=json.loads(row["stats"]) if row["stats"] else None,
            created_at=float(row["created_at"]),
        )

    def add_message(
        self,
        chat_id: int,
        role: str,
        content: str,
        *,
        status: str = "done",
        token_ids: Sequence[int] | None = None,
        tokens: int | None = None,
        stats: dict[str, Any] | None = None,
    ) -> StoredMessage:
        """Append a message (committed before this returns). The first user message names the chat."""
        if status not in STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        now = time.time()
        with self._transaction() as db:
            position = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE chat_id = ?",
                                  (chat_id,)).fetchone()[0]
            cur = db.execute(
                "INSERT INTO messages (chat_id, position, role, content, status, token_ids, tokens, stats, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (chat_id, position, role, content, status, _json_or_none(token_ids), tokens,
                 _json_or_none(stats), now, now),
            )
            if role == "user":
                row = db.execute("SELECT title_is_auto, title FROM chats WHERE id = ?", (chat_id,)).fetchone()
                if row is not None and row["title_is_auto"] and (position == 0 or not row["title"]):
                    db.execute("UPDATE chats SET title = ? WHERE id = ?", (auto_title(content), chat_id))
            self._touch(chat_id, now)
        return self.message(int(cur.lastrowid or 0))

    def update_message(
        self,
        message_id: int,
        *,
        content: str | None = None,
        status: str | None = None,
        token_ids: Sequence[int] | None = None,
        tokens: int | None = None,
        stats: dict[str, Any] | None = None,
    ) -> StoredMessage | None:
        """Change the given fields of a message (None leaves a field as it is); returns it as stored
        now (None when there is no such message)."""
        sets: list[str] = []
        values: list[Any] = []
        for column, value in (("content", content), ("status", status), ("token_ids", _json_or_none(token_ids)),
                              ("tokens", tokens), ("stats", _json_or_none(stats))):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        if not sets:
            return self._find(message_id)
        now = time.time()
        with self._transaction() as db:
            db.execute(f"UPDATE messages SET {', '.join(sets)}, updated_at = ? WHERE id = ?",
                       (*values, now, message_id))
            row = db.execute("SELECT chat_id FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is not None:
                self._touch(int(row[0]), now)
        return self._find(message_id)

    def _find(self, message_id: int) -> StoredMessage | None:
        row = self.db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        return self._message_from_row(row) if row is not None else None

    def truncate(self, chat_id: int, position: int) -> None:
        """Delete message `position` and every later one (editing or regenerating starts there)."""
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE chat_id = ? AND position >= ?", (chat_id, position))
            self._touch(chat_id, time.time())

    # ----- export / import -------------------------------------------------------------------
    def export_json(self, chat_id: int) -> dict[str, Any]:
        """The chat's messages and settings as a JSON-able object (token ids left out: they are
        specific to one model)."""
        chat = self.chat(chat_id)
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "title": chat.title,
            "created_at": chat.created_at,
            "settings": chat.settings.to_dict(),
            "messages": [
                {"role": m.role, "content": m.content, "complete": m.complete}
                for m in self.messages(chat_id)
            ],
        }

    def import_json(self, data: Any) -> StoredChat:
        """Create a chat from `export_json` output; raises StoreError when `data` is not one."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise StoreError("This file is not a Cachet chat export (its \"format\" is not cachet-chat).")
        if int(data.get("version", 0)) > EXPORT_VERSION:
            raise StoreError("This chat was exported by a newer Cachet; update Cachet to import it.")
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise StoreError("The chat export has no list of messages.")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(
                    m.get("content"), str):
                raise StoreError(f"Message {i + 1} of the export needs a role (user or assistant) and a text.")
        settings = ChatSettings.from_dict(data.get("settings") or {})
        title = str(data.get("title") or "").strip()
        with self._transaction() as db:
            now = time.time()
            cur = db.execute(
                "INSERT INTO chats (title, title_is_auto, created_at, updated_at, system_prompt, sampling, cache, "
                "overflow) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (title, 0 if title else 1, float(data.get("created_at") or now), now, settings.system_prompt,
                 json.dumps(settings.sampling.to_dict()), json.dumps(settings.cache.to_dict()), settings.overflow),
            )
            chat_id = int(cur.lastrowid or 0)
            for position, m in enumerate(messages):
                db.execute(
                    "INSERT INTO messages (chat_id, position, role, content, status, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (chat_id, position, m["role"], m["content"], "done" if m.get("complete", True) else "stopped",
                     now, now),
                )
            if not title:
                first = next((m["content"] for m in messages if m["role"] == "user"), "")
                db.execute("UPDATE chats SET title = ? WHERE id = ?", (auto_title(first), chat_id))
        return self.chat(chat_id)

    def export_markdown(self, chat_id: int) -> str:
        chat = self.chat(chat_id)
        lines = [f"# {chat.title or 'Untitled chat'}", ""]
        if chat.settings.system_prompt:
            lines += ["> **System:** " + chat.settings.system_prompt.replace("\n", "\n> "), ""]
        for m in self.messages(chat_id):
            who = "You" if m.role == "user" else "Assistant"
            note = "" if m.complete else f" *({m.status})*"
            lines += [f"## {who}{note}", "", m.content.rstrip(), ""]
        return "\n".join(lines)


def auto_title(text: str) -> str:
    """A chat's name from its first message: the first line, shortened at a word boundary."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0]
    return (cut if len(cut) > TITLE_CHARS // 2 else line[:TITLE_CHARS]).rstrip(" ,.;:") + "…"


def _json_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(list(value) if isinstance(value, tuple) else value)
