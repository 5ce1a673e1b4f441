"""One app per data folder, and a data folder that can be used, settled before the chats are opened.

`claim_data_folder()` runs at start-up, before the store. When a Cachet app already runs on the folder
(it answers on a local socket named after the folder), its window is brought to the front and this
start ends — asked first, so that an app whose folder was deleted under it is found too, and this start
neither re-creates the folder nor locks a new one beside it. Otherwise it checks the data folder (a
chosen folder that is missing, a path that is a file, a folder that cannot be written) and asks the user
what to do; it then takes the folder's lock (engine.lock). When the lock is held by an app that did not
answer at first, it is asked again; when something else holds it (a terminal chat, the server), the
user is told and offered another folder.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from PySide6.QtCore import QObject
from PySide6.QtNetwork import QLocalServer, QLocalSocket
from PySide6.QtWidgets import QFileDialog, QMessageBox, QWidget

from engine import paths
from engine.lock import DataFolderLock, FolderInUseError

RAISE = b"raise\n"
CONNECT_MS = 1500
# Once connected an owner is listening, but its GUI thread may be busy for a while (a reply streaming on a
# loaded machine answered only after ~3 s): wait for its answer longer than for the connection. Only an
# owner that hangs makes a second start wait this long, and then it says the folder is in use.
ANSWER_MS = 10_000


def server_name(folder: Path) -> str:
    """The local socket of the app owning `folder` (per user and folder)."""
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return f"cachet-{os.getuid() if hasattr(os, 'getuid') else 0}-{digest}"


class FolderClaim(QObject):
    """This process's hold on its data folder: the lock, and the socket that lets a second start
    bring this window to the front."""

    def __init__(self, folder: Path, lock: DataFolderLock) -> None:
        super().__init__()
        self.folder = folder
        self.lock = lock
        self.server: QLocalServer | None = None
        self.window: QWidget | None = None

    def serve(self, window: QWidget) -> None:
        """Listen for later starts on the same folder and bring `window` to the front for them."""
        self.window = window
        name = server_name(self.folder)
        server = QLocalServer(self)
        if not server.listen(name):
            # A socket file left by a crashed owner: ours to replace, since we hold the folder's lock.
            QLocalServer.removeServer(name)
            if not server.listen(name):
                return  # only the convenience is lost: a second start then says the folder is in use
        server.newConnection.connect(self._connected)
        self.server = server

    def _connected(self) -> None:
        assert self.server is not None
        while (socket := self.server.nextPendingConnection()) is not None:
            socket.write(b"ok\n")
            socket.flush()
            # The asking start hangs up once it has read the answer: hanging up here first could drop the
            # answer before it was read (QLocalSocket discards what it had not read when the peer closes).
            socket.disconnected.connect(socket.deleteLater)
            if self.window is not None:
                self.window.showNormal()
                self.window.raise_()
                self.window.activateWindow()

    def release(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.lock.release()


def ask_running_app_to_show(folder: Path) -> bool:
    """True when a Cachet app owning `folder` answered and brought its window to the front."""
    socket = QLocalSocket()
    socket.connectToServer(server_name(folder))
    if not socket.waitForConnected(CONNECT_MS):
        return False
    socket.write(RAISE)
    socket.flush()
    # The answer may already be buffered (the owner replies and hangs up at once): waitForReadyRead waits for
    # *new* data only, and would miss it.
    arrived = socket.bytesAvailable() > 0 or socket.waitForReadyRead(ANSWER_MS)
    answered = arrived and bytes(socket.readAll().data()).startswith(b"ok")
    socket.disconnectFromServer()
    return answered


def claim_data_folder(parent: QWidget | None = None) -> FolderClaim | None:
    """Settle which data folder this run uses and take its lock; None when this start should end
    (the user quit, or the running app that owns the folder was brought to the front)."""
    while True:
        folder = paths.data_dir()
        # Asked first, before the folder is checked (which creates a missing one) or locked: an app whose folder
        # was deleted under it still listens, and this start would otherwise lock a new folder beside it.
        if ask_running_app_to_show(folder):
            _already_running(folder)
            return None
        problem = paths.data_dir_problem()
        if problem is not None:
            if not _resolve_problem(problem, parent):
                return None
            continue
        lock = DataFolderLock(folder, owner="app")
        try:
            lock.acquire()
        except FolderInUseError as exc:
            if exc.holder.owner in ("app", "") and ask_running_app_to_show(folder):
                _already_running(folder)
                return None
            if not _offer_another_folder(str(exc), parent):
                return None
            continue
        except OSError as exc:
            problem = paths.DataDirProblem(folder, f"The data folder {folder} cannot be used: {exc}")
            if not _resolve_problem(problem, parent):
                return None
            continue
        return FolderClaim(folder, lock)


def _already_running(folder: Path) -> None:
    print(f"Cachet is already running with the data folder {folder}; its window was brought to the front.",
          file=sys.stderr)


def _resolve_problem(problem: paths.DataDirProblem, parent: QWidget | None) -> bool:
    """Tell the user what is wrong with the data folder and let them choose; False: quit."""
    box = QMessageBox(QMessageBox.Icon.Warning, "Cachet cannot use its data folder", problem.reason, parent=parent)
    again = box.addButton("Choose the folder again…" if problem.missing else "Choose another folder…",
                          QMessageBox.ButtonRole.ActionRole)
    default = box.addButton(f"Use the default folder ({paths.default_data_dir()})", QMessageBox.ButtonRole.AcceptRole)
    box.addButton("Quit", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(default)
    box.exec()
    clicked = box.clickedButton()
    if clicked is default:
        _use(paths.default_data_dir(), problem.chosen)
        return True
    if clicked is again:
        chosen = QFileDialog.getExistingDirectory(parent, "Where Cachet keeps its chats",
                                                  str(problem.folder.parent if problem.missing else Path.home()))
        if chosen:
            _use(Path(chosen), problem.chosen)
        return True  # asked again when nothing was chosen
    return False


def _offer_another_folder(message: str, parent: QWidget | None) -> bool:
    box = QMessageBox(QMessageBox.Icon.Information, "The data folder is in use", message, parent=parent)
    other = box.addButton("Open another folder…", QMessageBox.ButtonRole.AcceptRole)
    box.addButton("Quit", QMessageBox.ButtonRole.RejectRole)
    box.exec()
    if box.clickedButton() is not other:
        return False
    chosen = QFileDialog.getExistingDirectory(parent, "Open another data folder for this run", str(Path.home()))
    if chosen:
        os.environ["CACHET_DATA_DIR"] = chosen  # this run only: the folder in use stays the saved choice
    return True


def _use(folder: Path, remember: bool) -> None:
    """Use `folder` from now on: saved as the choice when the problem was with the saved choice,
    for this run only when it came from --data-dir."""
    if remember and not paths.data_dir_is_overridden():
        try:
            paths.set_data_dir(None if folder == paths.default_data_dir() else folder)
            return
        except (OSError, paths.DataDirError):
            pass  # checked again on the next turn of the loop
    os.environ["CACHET_DATA_DIR"] = str(folder)
