"""The data folder under the running app: noticed when it is deleted, moved or replaced, and what the
app holds saved again.

SQLite keeps working on a database file that was deleted while open: replies go on streaming and being
"saved" into a file nothing can reach any more, which vanishes when the app quits, and the next start
finds an empty folder (or none) and no chats. `DataFolderGuard` compares the database file and the
folder's lock file at their paths with the files this process holds open (`ChatStore.detached`,
`DataFolderLock.intact`) every `CHECK_MS` and when the window closes; when they differ it says so once
(`lost`), and `save_again` re-creates the folder where it was, takes its lock again and writes every
chat and message the store holds (its still-open database) into a fresh database there. The folder is
never re-created without the user asking.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from engine.lock import DataFolderLock, FolderInUseError
from engine.store import ChatStore, StoreError

CHECK_MS = 2000  # an os.stat of two files: nothing next to a turn


class DataFolderGuard(QObject):
    """Watches `store`'s database file (and `lock`'s file, when the app holds the folder's lock).

    Signals:
        lost(str): the database or its folder is gone or replaced (the sentence for the user), once per loss.
        saved(str): what was held was written again (`save_again`): the sentence for the user.
    """

    lost = Signal(str)
    saved = Signal(str)

    def __init__(self, store: ChatStore, lock: DataFolderLock | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.store = store
        self.lock = lock
        self.problem: str | None = None  # what is wrong now (None: the files are where they were)
        self.timer = QTimer(self)
        self.timer.setInterval(CHECK_MS)
        self.timer.timeout.connect(self.check)
        self.timer.start()

    @property
    def folder(self) -> Path:
        return self.store.path.parent

    def check(self) -> str | None:
        """Compare the files with the open ones now; emits `lost` when something is newly wrong."""
        problem = self.store.detached()
        if problem is None and self.lock is not None and self.lock.held and not self.lock.intact():
            # Only the lock file went (the database is where it was): hold the one at the path again, so a
            # second start is refused instead of locking a new file beside ours.
            try:
                self.lock.renew()
            except FolderInUseError as exc:
                problem = (f"Another process, {exc.holder.describe()}, took the data folder {self.folder} while "
                           "this Cachet was using it (its lock file had been deleted). Quit one of them: two "
                           "programs writing the same chats damage each other's.")
            except OSError:
                pass  # checked again at the next tick
        if problem != self.problem:
            self.problem = problem
            if problem is not None:
                self.lost.emit(problem)
        return problem

    def save_again(self) -> str:
        """Re-create the data folder where it was, hold its lock, and write every chat and message the
        store holds into a fresh database there; returns the sentence for the user. Raises StoreError with
        the reason when that cannot be done (the chats stay held, nothing lost)."""
        folder = self.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create {folder}: {exc.strerror or exc}. Save a copy elsewhere.") from exc
        if self.lock is not None and not self.lock.intact():
            try:
                self.lock.renew()
            except FolderInUseError as exc:
                raise StoreError(f"{folder} is now used by {exc.holder.describe()}, so Cachet did not write "
                                 "its chats there. Save a copy elsewhere.") from exc
            except OSError as exc:
                raise StoreError(f"Cannot lock {folder}: {exc.strerror or exc}. Save a copy elsewhere.") from exc
        sentence = self.store.save_to()
        self.problem = None
        self.saved.emit(sentence)
        return sentence

    def save_copy(self, path: Path) -> str:
        """A copy of every chat and message the store holds, as a chat database at `path`; the sentence
        for the user. Raises StoreError with the reason."""
        self.store.copy_to(path)
        return (f"A copy of every chat was saved as {path}. To use it, put it in a data folder as "
                "chats.sqlite3 and choose that folder in Settings.")
