"""Chats on disk: one SQLite file (WAL mode) holding every conversation, its messages and settings.

Every change is committed at once, so a crash or a kill loses at most what had not been
written yet. A reply that was still streaming when the process died is found with status
"streaming" on the next open and marked "interrupted" (`StoredMessage.complete` is False).

Per-chat settings are stored with each chat: the system prompt, `SamplingSettings.to_dict()` and
`CacheSpec.to_dict()` (whose strategy may also be "auto") as JSON, the overflow policy and the
speculative decoding mode.
Assistant replies keep the token ids the model generated, so cache reuse survives a restart.

This module imports neither Qt nor torch: the app opens the store before the model loads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import stat
import struct
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine import paths, tempfiles
from engine.specs import AUTO, CacheSpec, SamplingSettings, validate_overflow, validate_speculative

DB_NAME = "chats.sqlite3"
EXPORT_FORMAT = "cachet-chat"
EXPORT_VERSION = 1
STATUSES = ("done", "streaming", "stopped", "error", "interrupted")
TITLE_CHARS = 48
# What one import may hold: past these a file is refused (a chat export of the app is far smaller;
# a hostile one would otherwise be stored whole and weigh on every later start).
MAX_IMPORT_BYTES = 64 * 1024 * 1024
MAX_IMPORT_MESSAGES = 20_000
MAX_IMPORT_NESTING = 64
DISK_FULL = "The disk is full"
# An I/O error with less free space than this on the database's disk is taken for a full disk (`_is_full`).
LOW_SPACE_BYTES = 1024 * 1024
# Bidirectional controls reorder what follows them on screen ("evil" shown as "live"); titles drop them.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class StoreError(RuntimeError):
    """The chat database or an imported file cannot be used; the message is meant for the user."""


class StoreWriteError(StoreError):
    """A change could not be written (disk full, folder read-only, database damaged); nothing of it
    was stored, and what was stored before is intact. `disk_full` tells the commonest case apart."""

    def __init__(self, message: str, disk_full: bool = False, damaged: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full
        self.damaged = damaged  # the database file itself is malformed (salvage helps; waiting does not)


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

    @classmethod
    def repaired(cls, data: Any) -> tuple[ChatSettings, list[str]]:
        """Settings from untrusted `to_dict`-shaped data (an import, a damaged row): every field
        checked against the typed specs, one that cannot work reset to its default. Returns the
        settings and a sentence per field reset (empty when everything was valid)."""
        problems: list[str] = []
        try:  # the common case, at the cost of two validations
            settings = cls.from_dict(data)
            settings.sampling.validate()
            settings.cache.validate()
            validate_overflow(settings.overflow)
            validate_speculative(settings.speculative)
            if isinstance(data.get("system_prompt", ""), str):
                return settings, problems
        except (StoreError, ValueError, TypeError, AttributeError):
            pass
        if not isinstance(data, dict):
            if data is not None:
                problems.append("the settings are not an object; the defaults are used")
            data = {}
        prompt = data.get("system_prompt", "")
        if not isinstance(prompt, str):
            problems.append("the system prompt is not text")
            prompt = ""
        sampling = _repaired_fields(SamplingSettings(), data.get("sampling"), "sampling", problems)
        cache = _repaired_fields(CacheSpec(AUTO), data.get("cache"), "cache", problems)
        overflow = _repaired_choice(data.get("overflow"), "stop", validate_overflow, problems)
        speculative = _repaired_choice(data.get("speculative"), "auto", validate_speculative, problems)
        # Every field of the class is passed here: a field added later and forgotten here is caught by
        # tests/engine/test_store_settings.py, which round-trips each field through every copy path.
        return cls(system_prompt=prompt, sampling=sampling, cache=cache, overflow=overflow,
                   speculative=speculative), problems


def _repaired_choice(value: Any, default: str, validate: Callable[[str], str], problems: list[str]) -> str:
    """`value` when `validate` accepts it (None: `default`), else `default` and a sentence in `problems`."""
    if value is None:
        return default
    try:
        return validate(value if isinstance(value, str) else repr(value))
    except ValueError as exc:
        problems.append(str(exc))
        return default


def _repaired_fields(default: Any, data: Any, what: str, problems: list[str]) -> Any:
    """`default` (a SamplingSettings or CacheSpec) with each valid field of `data` applied; a field
    whose value fails the spec's validation keeps its default and adds a sentence to `problems`."""
    if data is None:
        return default
    if not isinstance(data, dict):
        problems.append(f"the {what} settings are not an object; the defaults are used")
        return default
    names = {f.name for f in fields(default)}
    settings = default
    # the strategy first: which cache fields are checked depends on it
    for name in sorted((k for k in data if k in names), key=lambda k: k != "strategy"):
        try:
            settings = replace(settings, **{name: data[name]}).validate()
        except (ValueError, TypeError) as exc:
            problems.append(f"{what} {name.replace('_', ' ')}: {exc} The default is used.")
    return settings


@dataclass(frozen=True)
class StoredChat:
    id: int
    title: str
    title_is_auto: bool  # still named after its first message; a rename makes it False
    created_at: float
    updated_at: float  # last activity: a message added or changed
    settings: ChatSettings


@dataclass(frozen=True)
class ImportedChat:
    """An imported chat and a sentence per setting that could not work and was reset to its default."""

    chat: StoredChat
    repaired: tuple[str, ...] = ()


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


def _v3(db: sqlite3.Connection) -> None:
    # ChatSettings.speculative had no column: every chat read back as "auto" whatever was chosen.
    db.execute("ALTER TABLE chats ADD COLUMN speculative TEXT NOT NULL DEFAULT 'auto'")


# Migration i brings the schema from version i to i + 1. Append, never edit a released one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2, _v3)
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    return paths.data_dir() / DB_NAME


class ChatStore:
    """All chats of one data folder. Use from one thread (the GUI's); every method commits.

    Opening checks the database (`PRAGMA quick_check`); a damaged one is kept aside as
    `chats.sqlite3.damaged-<time>` and what SQLite can still read of it is copied into a fresh
    database (`salvaged` then says what happened, for the user; a damaged header is rebuilt on a copy to
    read the pages behind it). A write-ahead log left by a run that did not close is checked against what
    SQLite replays of it, and writes that were lost there or since the last clean close are reported in
    `lost_writes`. A write that fails (disk full, read-only folder) raises StoreWriteError and leaves the
    database as it was. Temporary files of writes a dead process never finished are removed (`swept`).

    While open, the file at `path` may stop being the open database (its folder deleted): `detached` says
    so, and `save_to` writes everything the store holds into a fresh file.
    """

    def __init__(self, path: Path | str | None = None, *, check: bool = True) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.salvaged: str | None = None  # a sentence for the user when the database had to be salvaged
        self.lost_writes: str | None = None  # a sentence when the last run's writes are missing
        self._identity: tuple[int, int] | None = None  # (device, inode) of the open database file
        in_memory = str(self.path) == ":memory:"
        # temporary files of writes a killed (or disk-full) run never finished, e.g. .chats.sqlite3.closed.PID.tmp
        self.swept: list[Path] = []
        if not in_memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.swept = tempfiles.remove_stale(self.path.parent)
        wal = _LeftoverLog(self.path) if check and not in_memory else None
        if check and not in_memory and _header_damaged(self.path):
            # Not opened: SQLite would checkpoint the -wal into a file it then refuses, changing the damaged
            # file kept for the user; salvage reads the log with a rebuilt header instead.
            problem: str | None = "its header, the first 100 bytes, is damaged"
        else:
            problem = self._open_and_check(check and not in_memory, wal)
        if problem is not None:
            if in_memory:
                raise StoreError(f"The chat database is not usable ({problem}).")
            self.salvaged = salvage(self.path, problem)
            try:
                self._open()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path} is not a usable chat database ({exc}).") from exc
        try:
            self.recovered = self._recover_interrupted()
        except sqlite3.DatabaseError as exc:
            error = _write_error(self.path, exc)
            raise (_full_at_start(self.path) if error.disk_full else error) from exc
        if wal is not None:
            wal.discard()
        if not in_memory and self.salvaged is None and self.lost_writes is None:
            self.lost_writes = self._compare_with_last_close()

    def _open_and_check(self, check: bool, wal: _LeftoverLog | None) -> str | None:
        """Open the database (and with `check`, check it); what is damaged, None when it is usable.
        Raises StoreError when it cannot be opened for another reason (a full disk: StoreWriteError)."""
        try:
            self._open()
            problem = self._check() if check else None
            if wal is not None and problem is None:
                self.lost_writes = wal.judge(self.db)
            return problem
        except StoreWriteError as exc:
            self._close_quietly()
            if exc.disk_full:
                raise _full_at_start(self.path) from exc
            if not exc.damaged:
                raise
            return str(exc.__cause__ or exc)
        except StoreError:
            self._close_quietly()
            raise
        except sqlite3.OperationalError as exc:
            self._close_quietly()
            if _error_name(exc) not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                if _is_full(exc, self.path.parent):
                    raise _full_at_start(self.path) from exc
                raise StoreError(f"Cannot open {self.path}: {exc}.") from exc
            return str(exc)
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            return str(exc)

    def _open(self) -> None:
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a process crash
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        # The identity of the file just opened (the migration has created it): `detached` compares the path's.
        self._identity = _file_identity(self.path) if str(self.path) != ":memory:" else None

    # ----- the file itself ------------------------------------------------------------------------
    def detached(self) -> str | None:
        """A sentence for the user when the file at `path` is no longer the database this store reads and
        writes (None while it is): the file or its folder was deleted, moved or replaced while open. SQLite
        goes on working on the open file — every chat and message is still here, and later writes succeed —
        but no other process can reach it, and it vanishes when the store closes: `save_to` writes it again."""
        if self._identity is None:
            return None
        try:
            now = _file_identity(self.path)
        except OSError:
            return None  # cannot tell (permissions): nothing to say
        if now == self._identity:
            return None
        folder = self.path.parent
        if now is None and not folder.exists():
            what = f"The data folder {folder} was deleted (or moved) while Cachet was running"
        elif now is None:
            what = f"The chat database {self.path} was deleted (or moved) while Cachet was running"
        else:
            what = f"The chat database {self.path} was replaced by another file while Cachet was running"
        return (f"{what}. Cachet still holds every chat and message, but nothing it writes is kept on disk any "
                "more: save them again, or they are lost when Cachet quits.")

    def save_to(self, path: Path | None = None) -> str:
        """Write everything this store holds (its open database, whatever happened to the file) into a fresh
        database at `path` (default: its own path, the folder created when missing) and go on with that file.
        A file already at `path` that is not this store's is kept aside as `<name>.found-<time>`, never
        overwritten. Returns a sentence for the user; raises StoreWriteError when it cannot be written (the
        store then goes on as it was, nothing lost)."""
        target = Path(path) if path is not None else self.path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreWriteError(f"Cannot create {target.parent}: {exc.strerror or exc}.") from exc
        if target == self.path and self.detached() is None:
            return f"The chats are saved in {target} already."
        tmp = self._backup_to_temp(target)
        found: Path | None = None
        try:
            if _file_identity(target) not in (None, self._identity):
                stamp = time.strftime("%Y%m%d-%H%M%S")
                found = target.with_name(f"{target.name}.found-{stamp}")
                for suffix in ("", "-wal", "-shm"):
                    if Path(str(target) + suffix).exists():
                        os.replace(Path(str(target) + suffix), Path(str(found) + suffix))
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreWriteError(f"Could not save the chats to {target} ({exc.strerror or exc}).") from exc
        # Closing the last connection of a WAL database deletes its -wal and -shm *by name*: the old one is
        # closed while nothing of the new database exists at those names yet (it is opened just after).
        self._close_quietly()
        for suffix in ("-wal", "-shm"):  # left at the names when only chats.sqlite3 was deleted: the old file's,
            with suppress(OSError):      # copied already; SQLite would replay that log into the new file
                Path(str(target) + suffix).unlink()
        self.path = target
        try:
            self._open()
        except sqlite3.Error as exc:
            raise _write_error(target, exc) from exc
        chats = int(self.db.execute("SELECT COUNT(*) FROM chats WHERE deleted_at IS NULL").fetchone()[0])
        messages = int(self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        aside = f" A database that was already there was kept as {found.name}." if found is not None else ""
        return f"{_counted(chats, 'chat')} with {_counted(messages, 'message')} saved again in {target}.{aside}"

    def copy_to(self, path: Path) -> None:
        """A copy of everything this store holds as a chat database at `path` (written atomically), e.g. to
        keep chats whose data folder was deleted; the store goes on with its own file."""
        target = Path(path)
        tmp = self._backup_to_temp(target)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreWriteError(f"Could not save the chats to {target} ({exc.strerror or exc}).") from exc

    def _backup_to_temp(self, target: Path) -> Path:
        """SQLite's online backup of the open database into a temporary file beside `target`."""
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            copy = sqlite3.connect(tmp)
            try:
                self.db.backup(copy)
            finally:
                copy.close()
        except sqlite3.Error as exc:
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(str(tmp) + suffix).unlink(missing_ok=True)
            raise _write_error(target, exc) from exc
        return tmp

    def _check(self) -> str | None:
        """What is wrong with the open database (None: nothing). quick_check reads every page but
        skips the index-to-table cross checks: milliseconds for a typical chat database."""
        rows = [r[0] for r in self.db.execute("PRAGMA quick_check(5)").fetchall()]
        if rows == ["ok"]:
            return None
        self._close_quietly()
        return "; ".join(str(r) for r in rows)

    def _close_quietly(self) -> None:
        with suppress(sqlite3.Error, AttributeError):
            self.db.close()

    # ----- housekeeping -----------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _write_error(self.path, exc) from exc
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                with suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
                    exc, sqlite3.IntegrityError):
                raise _write_error(self.path, exc) from exc
            raise

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement that changes the database (its own transaction)."""
        try:
            return self.db.execute(sql, params)
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
            if isinstance(exc, sqlite3.IntegrityError):
                raise
            raise _write_error(self.path, exc) from exc

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
        """Replies still "streaming" belong to a process that died: mark them interrupted. (The
        data folder's lock, engine.lock, guarantees no live process is writing them.)"""
        cur = self.db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
        return cur.rowcount

    # ----- what the last run wrote ---------------------------------------------------------------
    def _last_write(self) -> float:
        """The time of the newest change the database holds (activity, deletion, a message)."""
        row = self.db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(updated_at) FROM chats), 0), "
            "COALESCE((SELECT MAX(deleted_at) FROM chats), 0), "
            "COALESCE((SELECT MAX(updated_at) FROM messages), 0))").fetchone()
        return float(row[0] or 0.0)

    def _marker(self) -> Path:
        return self.path.with_name(self.path.name + ".closed")

    def _compare_with_last_close(self) -> str | None:
        """SQLite silently drops the transactions of a damaged write-ahead log. Each clean close
        records the newest change it left; a database that opens older than that has lost writes."""
        try:
            recorded = json.loads(self._marker().read_text(encoding="utf-8")).get("last_write")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(recorded, int | float) or not math.isfinite(recorded):
            return None
        if self._last_write() + 1e-3 < recorded:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(recorded))
            return (f"The chat database is older than when Cachet last closed ({when}): the latest changes "
                    "were lost, probably because its write-ahead log (chats.sqlite3-wal) was damaged.")
        return None

    def _record_close(self) -> None:
        try:
            marker = self._marker()
            tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"last_write": self._last_write()}), encoding="utf-8")
            os.replace(tmp, marker)
        except (OSError, sqlite3.Error):
            pass  # only a hint for the next start

    def close(self) -> None:
        if str(self.path) != ":memory:" and self.detached() is None:  # the record of a file still there
            self._record_close()
        self.db.close()

    # ----- chats ---------------------------------------------------------------------------------
    def create_chat(self, settings: ChatSettings | None = None, title: str = "") -> StoredChat:
        settings = settings or ChatSettings()
        now = time.time()
        title = clean_title(title)
        columns = {"title": title, "title_is_auto": 0 if title else 1, "created_at": now, "updated_at": now,
                   **_settings_columns(settings)}
        cur = self._write(*_insert("chats", columns))
        return self.chat(int(cur.lastrowid or 0))

    def chat(self, chat_id: int) -> StoredChat:
        row = self.db.execute("SELECT * FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if row is None:
            raise KeyError(chat_id)
        return self._chat_from_row(row)

    @staticmethod
    def _chat_from_row(row: sqlite3.Row) -> StoredChat:
        """A chat as stored; settings that cannot work (a damaged row, an older import) read as
        their defaults, so a start never depends on every chat being well-formed."""
        settings, _problems = ChatSettings.repaired({
            "system_prompt": row["system_prompt"], "overflow": row["overflow"], "speculative": row["speculative"],
            "sampling": _loads(row["sampling"]), "cache": _loads(row["cache"])})
        return StoredChat(
            id=int(row["id"]), title=clean_title(str(row["title"] or "")), title_is_auto=bool(row["title_is_auto"]),
            created_at=_finite(row["created_at"]), updated_at=_finite(row["updated_at"]), settings=settings,
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
        title = clean_title(title)
        self._write("UPDATE chats SET title = ?, title_is_auto = ? WHERE id = ?",
                        (title, 0 if title else 1, chat_id))

    def set_settings(self, chat_id: int, settings: ChatSettings) -> None:
        columns = _settings_columns(settings)
        self._write(f"UPDATE chats SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                    (*columns.values(), chat_id))

    def delete_chat(self, chat_id: int) -> None:
        """Hide a chat; `restore_chat` brings it back until `purge_deleted` removes it for good."""
        self._write("UPDATE chats SET deleted_at = ? WHERE id = ?", (time.time(), chat_id))

    def restore_chat(self, chat_id: int) -> None:
        self._write("UPDATE chats SET deleted_at = NULL WHERE id = ?", (chat_id,))

    def purge_deleted(self) -> int:
        cur = self._write("DELETE FROM chats WHERE deleted_at IS NOT NULL")
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
        """A message as stored; token ids or figures that do not parse read as unknown (the cache
        is then rebuilt from the text), a status this version does not know as "interrupted"."""
        ids = _loads(row["token_ids"])
        ids = tuple(ids) if isinstance(ids, list) and all(type(i) is int for i in ids) else None
        stats = _loads(row["stats"])
        tokens = row["tokens"]
        return StoredMessage(
            id=int(row["id"]), chat_id=int(row["chat_id"]), position=int(row["position"]), role=row["role"],
            content=str(row["content"] or ""), status=row["status"] if row["status"] in STATUSES else "interrupted",
            token_ids=ids, tokens=tokens if isinstance(tokens, int) else None,
            stats=stats if isinstance(stats, dict) else None, created_at=_finite(row["created_at"]),
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
        """Create a chat from `export_json` output; raises StoreError when `data` is not one (see `import_chat`)."""
        return self.import_chat(data).chat

    def import_chat(self, data: Any) -> ImportedChat:
        """Create a chat from `export_json` output, checked completely first: StoreError (naming the
        problem) when `data` is not a chat export or holds more than MAX_IMPORT_MESSAGES messages;
        settings that cannot work are reset to their defaults and listed in the result's `repaired`."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise StoreError("This file is not a Cachet chat export (its \"format\" is not cachet-chat).")
        bad_text = unencodable_text(data)
        if bad_text is not None:  # SQLite would refuse it halfway through storing the chat (UnicodeEncodeError)
            raise StoreError(f"{bad_text}; the chat export is damaged or was not written by Cachet.")
        version = data.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise StoreError(f"The chat export's version is not a whole number ({_shown(version)}).")
        if version > EXPORT_VERSION:
            raise StoreError("This chat was exported by a newer Cachet; update Cachet to import it.")
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise StoreError("The chat export has no list of messages.")
        if len(messages) > MAX_IMPORT_MESSAGES:
            raise StoreError(f"The chat export holds {len(messages):,} messages; Cachet imports at most "
                             f"{MAX_IMPORT_MESSAGES:,} per chat.")
        rows: list[tuple[str, str, str]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(
                    m.get("content"), str):
                raise StoreError(f"Message {i + 1} of the export needs a role (user or assistant) and a text.")
            complete = m.get("complete", True)
            if not isinstance(complete, bool):
                raise StoreError(f"Message {i + 1} of the export: \"complete\" must be true or false, "
                                 f"not {_shown(complete)}.")
            rows.append((m["role"], m["content"], "done" if complete else "stopped"))
        settings, repaired = ChatSettings.repaired(data.get("settings"))
        title = data.get("title") or ""
        if not isinstance(title, str):
            repaired.append(f"the title is not text ({_shown(title)}); the chat is named after its first message")
            title = ""
        title = clean_title(title)
        now = time.time()
        created = data.get("created_at")
        created_at = float(created) if isinstance(created, int | float) and not isinstance(created, bool) and \
            math.isfinite(created) and 0 <= created <= now else now
        with self._transaction() as db:
            cur = db.execute(*_insert("chats", {"title": title, "title_is_auto": 0 if title else 1,
                                                "created_at": created_at, "updated_at": now,
                                                **_settings_columns(settings)}))
            chat_id = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO messages (chat_id, position, role, content, status, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((chat_id, position, role, content, status, now, now)
                 for position, (role, content, status) in enumerate(rows)),
            )
            if not title:
                first = next((content for role, content, _ in rows if role == "user"), "")
                db.execute("UPDATE chats SET title = ? WHERE id = ?", (auto_title(first), chat_id))
        return ImportedChat(self.chat(chat_id), tuple(repaired))

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


def clean_title(text: str) -> str:
    """A title as shown: one line, single spaces, without bidirectional or other control characters
    (an embedded U+202E would show "evil" as "live" in the sidebar and header)."""
    kept = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text
                   if c not in BIDI_CONTROLS)
    return " ".join(kept.split())


def auto_title(text: str) -> str:
    """A chat's name from its first message: the first line, shortened at a word boundary."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = clean_title(line)
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0]
    return (cut if len(cut) > TITLE_CHARS // 2 else line[:TITLE_CHARS]).rstrip(" ,.;:") + "…"


def _settings_columns(settings: ChatSettings) -> dict[str, Any]:
    """The chats table's columns for `settings`: the one place a ChatSettings becomes a row (read back in
    `ChatStore._chat_from_row`), so each field is written the same way by every path that stores one."""
    return {"system_prompt": settings.system_prompt, "sampling": json.dumps(settings.sampling.to_dict()),
            "cache": json.dumps(settings.cache.to_dict()), "overflow": settings.overflow,
            "speculative": settings.speculative}


def _insert(table: str, columns: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """An INSERT statement of `columns` (names are ours, never the user's) and its parameters."""
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            tuple(columns.values()))


def _json_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def load_import(path: Path) -> Any:
    """The JSON of a file to import, bounded: StoreError with the reason when it is not a regular file (a named
    pipe would block the read forever, a link to /dev/zero fill the memory: both report a size of 0), holds
    more than MAX_IMPORT_BYTES (at most that many bytes and one more are read), is not UTF-8 text, not JSON,
    or nested deeper than MAX_IMPORT_NESTING (100k nested brackets would otherwise exhaust the parser's
    recursion). Call it off the GUI thread: a file on a slow or network drive takes its time."""
    path = Path(path)
    too_big = (f"{path.name} is larger than {MAX_IMPORT_BYTES // 2**20} MB; Cachet imports chat files of at most "
               f"{MAX_IMPORT_BYTES // 2**20} MB.")
    try:
        # Opened without waiting (a FIFO's open would block until a writer comes), then checked on what was
        # opened, links resolved: a file swapped for a pipe between a check and the open cannot pass.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                target = os.path.realpath(path)
                shown = f" ({target})" if target != str(path.absolute()) else ""
                raise StoreError(f"{path.name} is not a regular file but {_file_kind(st.st_mode)}{shown}; Cachet "
                                 "imports chat files (.json) only.")
            if st.st_size > MAX_IMPORT_BYTES:
                raise StoreError(too_big)
            raw = fh.read(MAX_IMPORT_BYTES + 1)  # the file may have grown since fstat
        if len(raw) > MAX_IMPORT_BYTES:
            raise StoreError(too_big)
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    except OSError as exc:
        raise StoreError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:  # bracket depth outside strings, before the recursive parser sees it
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_IMPORT_NESTING:
                    raise StoreError(f"{path.name} is nested more than {MAX_IMPORT_NESTING} levels deep; it is "
                                     "not a Cachet chat export.")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"{path.name} is not valid JSON ({exc}).") from exc


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def unencodable_text(data: Any) -> str | None:
    """Where the first text in `data` (any JSON value, keys included) is that cannot be stored as UTF-8 —
    a lone surrogate such as "\\ud800", which JSON's \\u escapes can write and Python keeps — in words for
    the user; None when every text can be. Iterative: `data` may be nested deeply."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(value[exc.start])
                what = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "a character"
                return (f"{_place(where)} holds {what} (U+{code:04X}) at character {exc.start + 1}, which is not "
                        "text that can be stored")
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                stack.append((item, f"{where}.{key}" if isinstance(key, str) else where))
                stack.append((key, f"{where} (a field name)"))
        elif isinstance(value, list):
            stack += [(item, f"{where}[{i}]") for i, item in reversed(list(enumerate(value)))]
    return None


def _place(where: str) -> str:
    """A JSON path of an export (".messages[2].content") in words: "Message 3's text"."""
    if where.startswith(".messages["):
        index, _, rest = where[len(".messages["):].partition("]")
        if index.isdigit():
            if rest == ".content":
                return f"Message {int(index) + 1}'s text"
            return f"Message {int(index) + 1}" + (f" ({rest.lstrip('.')})" if rest else "")
    names = {".title": "The title", ".settings.system_prompt": "The system prompt"}
    return names.get(where, f"The value at {where.lstrip('.') or 'the top'}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _loads(text: Any) -> Any:
    """JSON from a column, None when it is empty or damaged."""
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None


def _finite(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _error_name(exc: sqlite3.Error) -> str:
    return str(getattr(exc, "sqlite_errorname", "") or "")


def _is_full(exc: sqlite3.Error, folder: Path | None = None) -> bool:
    """Whether `exc` means the disk is full. SQLite says so itself for most writes, but growing the
    shared-memory file of a WAL database on a full disk fails as SQLITE_IOERR_SHMSIZE ("disk I/O error",
    what a start on a full disk used to show): an I/O error with next to no free space in `folder`
    counts as a full disk too."""
    if _error_name(exc) == "SQLITE_FULL" or "disk is full" in str(exc) or "No space left" in str(exc):
        return True
    if folder is None or not (_error_name(exc).startswith("SQLITE_IOERR") or "disk I/O error" in str(exc)):
        return False
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _counted(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _full_at_start(path: Path) -> StoreWriteError:
    return StoreWriteError(f"{DISK_FULL} ({path.parent}): Cachet cannot open its chats until some space is freed "
                           "there. Nothing was changed; free some space and start Cachet again.", disk_full=True)


def _write_error(path: Path, exc: sqlite3.Error) -> StoreWriteError:
    """The StoreWriteError (a sentence for the user) for a failed write."""
    name = _error_name(exc)
    if _is_full(exc, path.parent):
        return StoreWriteError(f"{DISK_FULL} ({path.parent}): the change could not be saved.", disk_full=True)
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return StoreWriteError(f"The chat database {path} is damaged ({exc}).", damaged=True)
    if name.startswith("SQLITE_READONLY"):
        return StoreWriteError(f"The chat database {path} cannot be written (read-only).")
    return StoreWriteError(f"Could not save to {path} ({exc}).")


_WAL_MAGIC = (0x377F0682, 0x377F0683)  # little- / big-endian checksums
_WAL_HEADER = 32
_FRAME_HEADER = 24


class _LeftoverLog:
    """A write-ahead log left by a run that did not close (a crash, a kill), judged before SQLite reads it.

    SQLite replays a log's frames up to the first one whose checksum fails and silently drops the rest,
    committed transactions included. Frames are told apart by the log header's salts: every frame that
    carries them up to the last one ending a transaction was committed by the last run. Once the database
    is open, SQLite says how many frames it kept (`PRAGMA wal_checkpoint`); fewer means committed writes
    were dropped, and a copy of the damaged log is kept beside the database.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = Path(str(db_path) + "-wal")
        self.committed = 0
        self.copy: Path | None = None
        with suppress(OSError, struct.error):
            self.committed = _committed_frames(self.path, _page_size(db_path))
            if self.committed:
                self.copy = self.path.with_name(f".{self.path.name}.{os.getpid()}.check")
                shutil.copyfile(self.path, self.copy)

    def judge(self, db: sqlite3.Connection) -> str | None:
        """A sentence for the user when SQLite kept fewer committed frames than the log holds."""
        if not self.committed:
            return None
        try:
            row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return None
        kept = int(row[1]) if row is not None and row[1] is not None else -1
        if kept < 0 or kept >= self.committed:
            return None
        name = self.path.name
        if self.copy is not None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            with suppress(OSError):
                self.copy = Path(shutil.move(self.copy, self.path.with_name(f"{name}.damaged-{stamp}")))
                name = self.copy.name
        self.copy = None
        return (f"The chat database's write-ahead log was damaged: SQLite could read {max(kept, 0):,} of its "
                f"{self.committed:,} committed pages, so the latest changes made before Cachet last stopped were "
                f"lost. A copy of the damaged log was kept as {name}.")

    def discard(self) -> None:
        if self.copy is not None:
            with suppress(OSError):
                self.copy.unlink()
            self.copy = None


def _page_size(db_path: Path) -> int:
    with db_path.open("rb") as fh:
        header = fh.read(100)
    size = struct.unpack(">H", header[16:18])[0]
    return 65536 if size == 1 else size


def _wal_checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    words = struct.unpack((">" if big_endian else "<") + f"{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _committed_frames(wal: Path, page_size: int) -> int:
    """How many frames of `wal` belong to transactions its writer committed: the frames that carry the
    log's salts (the header's, or the first frame's when the header itself is damaged), up to the last one
    that ends a transaction. Reads the frame headers only."""
    if not 512 <= page_size <= 65536 or wal.stat().st_size < _WAL_HEADER + _FRAME_HEADER + page_size:
        return 0
    with wal.open("rb") as fh:
        header = fh.read(_WAL_HEADER)
        magic = struct.unpack(">I", header[:4])[0]
        header_ok = magic in _WAL_MAGIC and _wal_checksum(header[:24], magic & 1 == 1) == struct.unpack(
            ">II", header[24:32])
        salts = header[16:24] if header_ok else None
        committed = frame = 0
        while True:
            fh.seek(_WAL_HEADER + frame * (_FRAME_HEADER + page_size))
            head = fh.read(_FRAME_HEADER)
            if len(head) < _FRAME_HEADER:
                return committed
            if salts is None:
                salts = head[8:16]
            frame += 1
            if head[8:16] == salts and struct.unpack(">I", head[4:8])[0] != 0:
                committed = frame


def salvage(path: Path, problem: str) -> str:
    """Keep the damaged database `path` aside (with its -wal and -shm) and copy what SQLite can
    still read of it, table by table and row by row, into a fresh database at `path`.

    A file whose 100-byte header is damaged reads as "not a database" however intact its pages are; then
    a copy of it is given a rebuilt header (`_read_with_rebuilt_header`) and read instead.

    Returns a sentence for the user: what was wrong, where the damaged copy is, what was saved.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(path) + suffix)
        if source.exists():
            shutil.move(source, Path(str(kept) + suffix))
    fresh = ChatStore(path, check=False)
    rebuilt: int | None = None
    try:
        try:
            old: sqlite3.Connection | None = sqlite3.connect(f"file:{kept}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error:
            old = None
        copied = _copy_rows(old, fresh.db) if old is not None else {"chats": 0, "messages": 0}
        if not any(copied.values()) and _header_damaged(kept):
            found = _read_with_rebuilt_header(kept, fresh.db)
            if found is not None:
                rebuilt, copied = found
    finally:
        fresh.close()
    how = "" if rebuilt is None else (
        f" Cachet rebuilt its header (the file's first 100 bytes) on a copy, from what the file shows (pages of "
        f"{rebuilt:,} bytes) and the standard values of a chat database, to read it.")
    return (f"The chat database was damaged ({problem}). A copy of the damaged file was kept as {kept.name}.{how} "
            f"{copied['chats']:,} chats and {copied['messages']:,} messages could be read from it and were "
            "saved into a fresh database.")


def _copy_rows(old: sqlite3.Connection, fresh: sqlite3.Connection) -> dict[str, int]:
    """Copy every readable row of `old`'s chats and messages into `fresh` (closing `old`); how many of each."""
    copied = {"chats": 0, "messages": 0}
    old.row_factory = sqlite3.Row
    try:
        try:
            old.execute("SELECT name FROM sqlite_schema").fetchall()
        except sqlite3.Error:
            return copied  # not even the schema can be read: no row can be (and trying each rowid takes seconds)
        for table in ("chats", "messages"):
            columns = [r[1] for r in fresh.execute(f"PRAGMA table_info({table})")]
            for row in _readable_rows(old, table):
                values = {k: row[k] for k in row.keys() if k in columns}  # noqa: SIM118 - sqlite3.Row
                if not values:
                    continue
                names = ", ".join(values)
                try:
                    cur = fresh.execute(f"INSERT OR IGNORE INTO {table} ({names}) VALUES "
                                        f"({', '.join('?' * len(values))})", tuple(values.values()))
                    copied[table] += max(cur.rowcount, 0)
                except sqlite3.Error:
                    continue  # a row whose chat was lost, or a column damaged beyond use
    finally:
        old.close()
    return copied


SQLITE_MAGIC = b"SQLite format 3\x00"
PAGE_SIZES = tuple(512 << i for i in range(8))  # 512 … 65536: what SQLite allows


def _header_damaged(path: Path) -> bool:
    """Whether the fixed fields of a database file's header (magic string, page size, payload fractions,
    schema format, text encoding) are not what every SQLite database holds. A database whose schema is
    still only in its write-ahead log (a new one, before a checkpoint) has 0 for both of the last two."""
    try:
        with path.open("rb") as fh:
            header = fh.read(100)
    except OSError:
        return False
    if len(header) < 100:
        return False
    size = struct.unpack(">H", header[16:18])[0]
    return (header[:16] != SQLITE_MAGIC or (65536 if size == 1 else size) not in PAGE_SIZES
            or header[21:24] != b"\x40\x20\x20" or struct.unpack(">I", header[44:48])[0] not in (0, 1, 2, 3, 4)
            or struct.unpack(">I", header[56:60])[0] not in (0, 1, 2, 3))


def _page_size_candidates(path: Path) -> list[int]:
    """The page sizes to try for a file whose header is damaged, the likeliest first, read from its layout:
    the page size its write-ahead log states; then the sizes that divide the file's length, that hold the
    first page's b-tree (whose cell content starts within the page, at offset 105 of the file) and after
    which a b-tree page begins (its type byte at the start of page 2); then every other valid size."""
    first: list[int] = []
    with suppress(OSError, struct.error):
        with Path(str(path) + "-wal").open("rb") as fh:
            wal = fh.read(32)
        if len(wal) == 32 and struct.unpack(">I", wal[:4])[0] in _WAL_MAGIC:
            first.append(struct.unpack(">I", wal[8:12])[0])
    length = path.stat().st_size
    with path.open("rb") as fh:
        data = fh.read(65536 + 1)
    start = 0  # where page 1's cell content begins (0 in the file means 65536)
    if len(data) >= 107:
        start = struct.unpack(">H", data[105:107])[0] or 65536
    fitting = [size for size in PAGE_SIZES if length % size == 0 and size >= start]
    fitting.sort(key=lambda size: (len(data) <= size or data[size] not in (2, 5, 10, 13), size))
    ordered = [s for s in first if s in PAGE_SIZES] + fitting + list(PAGE_SIZES)
    return list(dict.fromkeys(ordered))


def _standard_header(page_size: int, pages: int) -> bytes:
    """A database header with `page_size` and `pages` and every other field at the value SQLite writes for a
    new WAL database in UTF-8 (no freelist: free pages are only unused; the schema is read from page 1)."""
    header = bytearray(100)
    header[:16] = SQLITE_MAGIC
    header[16:18] = struct.pack(">H", 1 if page_size == 65536 else page_size)
    header[18:24] = bytes([2, 2, 0, 64, 32, 32])  # WAL read/write versions, no reserved bytes, payload fractions
    v = sqlite3.sqlite_version_info
    for offset, value in ((24, 1), (28, pages), (40, 1), (44, 4), (56, 1), (92, 1),
                          (96, v[0] * 1_000_000 + v[1] * 1000 + v[2])):
        header[offset:offset + 4] = struct.pack(">I", value)  # change counter = version-valid-for: size is valid
    return bytes(header)


def _read_with_rebuilt_header(kept: Path, fresh: sqlite3.Connection) -> tuple[int, dict[str, int]] | None:
    """Read a damaged database through a copy whose header is rebuilt (`_standard_header`), trying the page
    sizes `_page_size_candidates` gives until one shows the chats tables; copies what it reads into `fresh`.
    Returns the page size used and what was copied, None when no size gives a readable file. The damaged
    file is not changed; the copy (a temporary file swept if this is killed) is deleted."""
    length = kept.stat().st_size
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
    for page_size in _page_size_candidates(kept):
        try:
            shutil.copyfile(kept, tmp)
            if Path(str(kept) + "-wal").exists():
                shutil.copyfile(Path(str(kept) + "-wal"), Path(str(tmp) + "-wal"))
            with tmp.open("r+b") as fh:
                fh.write(_standard_header(page_size, length // page_size))
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
                db.execute("SELECT COUNT(*) FROM chats").fetchone()
            except sqlite3.Error:
                db.close()
                continue
            if not {"chats", "messages"} <= tables:
                db.close()
                continue
            return page_size, _copy_rows(db, fresh)
        except sqlite3.Error:
            continue
        except OSError:
            return None
        finally:
            for suffix in ("", "-wal", "-shm"):
                with suppress(OSError):
                    Path(str(tmp) + suffix).unlink()
    return None


def _readable_rows(db: sqlite3.Connection, table: str) -> Iterator[sqlite3.Row]:
    """Every row of `table` SQLite can still read: a plain scan, and when the scan breaks on a
    damaged page, each rowid after the last one read, one by one (a damaged page loses only its rows)."""
    last = 0
    try:
        for row in db.execute(f"SELECT rowid AS _rowid_, * FROM {table} ORDER BY rowid"):
            last = int(row["_rowid_"])
            yield row
        return
    except sqlite3.Error:
        pass
    try:
        top = int(db.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0] or 0)
    except sqlite3.Error:
        top = last + 100_000
    for rowid in range(last + 1, top + 1):
        try:
            row = db.execute(f"SELECT rowid AS _rowid_, * FROM {table} WHERE rowid = ?", (rowid,)).fetchone()
        except sqlite3.Error:
            continue
        if row is not None:
            yield row
