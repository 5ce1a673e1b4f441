"""One owner per data folder: an OS file lock held for as long as a process uses the folder.

Two processes writing one chat database corrupt each other's chats (a second window marks the
first's live reply interrupted, SQLite hands both the same message id...). So the app, the terminal
chat and the server each take `DataFolderLock` on the data folder before they open its store, and
keep it until they exit; whoever does not get it says the folder is in use (or, the terminal,
opens the store read-only).

The lock is an advisory OS lock (`fcntl.flock` on POSIX, `msvcrt.locking` on Windows) on the file
`cachet.lock` in the folder. The OS drops it when its process dies however it dies (a kill, a
crash, a power cut), so a lock left behind by a crash is never "stale": the next start simply gets
it. The file itself stays; it also holds the owner's pid and what it is ("app", "chat", "server"),
so the one refused can say who holds the folder.

Usage::

    lock = DataFolderLock(paths.data_dir(), owner="server")
    lock.acquire()          # raises FolderInUseError naming the holder
    ...
    lock.release()          # or use it as a context manager

Keep a reference to the lock for as long as it must be held: a DataFolderLock that is garbage
collected closes its file, and the OS then drops the lock.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

LOCK_NAME = "cachet.lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a data folder, as it wrote itself into the lock file (best effort)."""

    pid: int | None
    owner: str

    def describe(self) -> str:
        what = {"app": "the Cachet app", "chat": "a terminal chat (python -m engine chat)",
                "server": "the Cachet server"}.get(self.owner, "another Cachet process")
        return f"{what} (process {self.pid})" if self.pid else what


class FolderInUseError(RuntimeError):
    """Another process holds the data folder's lock; `holder` says who, when it could be read."""

    def __init__(self, folder: Path, holder: LockHolder) -> None:
        self.folder = folder
        self.holder = holder
        super().__init__(f"The data folder {folder} is in use by {holder.describe()}. "
                         "Close it first, or use another data folder.")


class DataFolderLock:
    """The exclusive lock of one data folder (see the module docstring). Not re-entrant."""

    def __init__(self, folder: Path | str, owner: str = "app") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owner = owner
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> DataFolderLock:
        """Take the lock now or raise FolderInUseError (never waits); OSError when the folder
        cannot hold a lock file at all (e.g. read-only)."""
        if self._file is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        # "a+b": never truncate before holding the lock, so a refused process cannot erase the
        # holder's name from the file.
        handle = open(self.path, "a+b")  # noqa: SIM115 - kept open for the lock's lifetime
        try:
            _lock(handle)
        except OSError:
            handle.close()
            raise FolderInUseError(self.folder, read_holder(self.folder)) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "owner": self.owner}).encode())
            handle.flush()
        except OSError:
            pass  # a full disk must not stop the owner from owning: the name is only informative
        self._file = handle
        return self

    def intact(self) -> bool:
        """Whether the lock file at `path` is still the file this lock holds. False once it (or its folder)
        was deleted, moved or replaced while held: the OS lock then guards a file no other process can
        open, and a process starting now would lock a new file at `path` beside this one (`renew`)."""
        if self._file is None:
            return False
        try:
            held, there = os.fstat(self._file.fileno()), os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell (a permission error): assume nothing changed
        return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    def renew(self) -> DataFolderLock:
        """Hold the lock of the file now at `path` instead of a file that is no longer there (`intact()`
        False), so a later process is refused again. The folder must exist: it is not created here (an empty
        data folder made behind the user's back would look as if every chat were lost). Raises
        FolderInUseError when another process holds the new file, FileNotFoundError without the folder; the
        old lock is kept then."""
        if self.intact():
            return self
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} does not exist")
        fresh = DataFolderLock(self.folder, self.owner)
        fresh.acquire()
        old, self._file, fresh._file = self._file, fresh._file, None
        if old is not None:
            with suppress(OSError):
                _unlock(old)
            old.close()
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: deleting it could race with a process taking it)."""
        handle, self._file = self._file, None
        if handle is None:
            return
        try:
            _unlock(handle)
        finally:
            handle.close()

    def __enter__(self) -> DataFolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def read_holder(folder: Path | str) -> LockHolder:
    """Who wrote itself into `folder`'s lock file (pid None when it cannot be read)."""
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
        pid = data.get("pid")
        owner = data.get("owner")
        return LockHolder(pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                          owner if isinstance(owner, str) else "")
    except (OSError, ValueError, AttributeError):
        return LockHolder(None, "")


def is_locked(folder: Path | str) -> bool:
    """True when some process holds `folder`'s lock right now (a probe: takes and drops it)."""
    probe = DataFolderLock(folder, owner="probe")
    try:
        probe.acquire()
    except FolderInUseError:
        return True
    except OSError:
        return False
    probe.release()
    return False


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(handle: IO[bytes]) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]

    def _unlock(handle: IO[bytes]) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]

else:
    import fcntl

    def _lock(handle: IO[bytes]) -> None:
        # flock, not lockf: an flock belongs to the open file, so a second DataFolderLock in the
        # same process is refused too (lockf's per-process locks would let it through).
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(handle: IO[bytes]) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
