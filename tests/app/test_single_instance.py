"""A second start on a data folder whose app is busy (issue 12 item 1): the running app answers late —
its GUI thread streaming a reply on a loaded machine — and the second start still brings it to the front
instead of saying the folder is in use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import paths

ROOT = Path(__file__).resolve().parents[2]

# An owner of the folder (its lock, its socket) whose event loop is blocked for 3 s after it starts listening.
BUSY_OWNER = """
import sys, time
from pathlib import Path
from PySide6.QtCore import QCoreApplication, QTimer
from app.single_instance import FolderClaim
from engine.lock import DataFolderLock

app = QCoreApplication([])
folder = Path(sys.argv[1])
claim = FolderClaim(folder, DataFolderLock(folder, owner="app").acquire())

class Window:
    def showNormal(self): print("raised", flush=True); QTimer.singleShot(100, app.quit)
    def raise_(self): pass
    def activateWindow(self): pass

claim.serve(Window())
print("ready", flush=True)
time.sleep(3.0)  # the GUI thread busy: the connection waits in the socket's backlog
QTimer.singleShot(15_000, app.quit)
app.exec()
claim.release()
"""


def test_a_busy_running_app_is_still_brought_to_the_front(qtbot: Any, tmp_path: Path, monkeypatch: Any,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from PySide6.QtWidgets import QMessageBox

    from app.single_instance import claim_data_folder

    folder = paths.data_dir()
    owner = subprocess.Popen([sys.executable, "-c", BUSY_OWNER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        asked: list[str] = []

        def answer(box: QMessageBox) -> int:
            asked.append(box.text())
            next(b for b in box.buttons() if b.text() == "Quit").click()
            return 0

        monkeypatch.setattr(QMessageBox, "exec", answer)
        claim = claim_data_folder()  # before the fix: "The data folder is in use" after 1.5 s without an answer
        assert claim is None and asked == []
        assert "brought to the front" in capsys.readouterr().err
        assert owner.stdout.readline().strip() == "raised"
    finally:
        owner.kill()
        owner.wait(30)
        if owner.stdout is not None:
            owner.stdout.close()


# An owner whose data folder is deleted under it: it keeps listening (as the app does), and quits when raised.
OWNER = """
import shutil, sys
from pathlib import Path
from PySide6.QtCore import QCoreApplication, QTimer
from app.single_instance import FolderClaim
from engine.lock import DataFolderLock

app = QCoreApplication([])
folder = Path(sys.argv[1])
claim = FolderClaim(folder, DataFolderLock(folder, owner="app").acquire())

class Window:
    def showNormal(self): print("raised", flush=True); QTimer.singleShot(100, app.quit)
    def raise_(self): pass
    def activateWindow(self): pass

claim.serve(Window())
shutil.rmtree(folder)
print("ready", flush=True)
QTimer.singleShot(30_000, app.quit)
app.exec()
claim.release()
"""


def test_a_second_start_finds_the_app_whose_folder_was_deleted(qtbot: Any, monkeypatch: Any,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 23 §7 item 2: the second start re-created the deleted folder, locked a new file in it and ran
    beside the first. Now it asks the running app first, brings it to the front and creates nothing."""
    from PySide6.QtWidgets import QMessageBox

    from app.single_instance import claim_data_folder

    folder = paths.data_dir()
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        assert not folder.exists()
        asked: list[str] = []

        def answer(box: QMessageBox) -> int:
            asked.append(box.text())
            next(b for b in box.buttons() if b.text() == "Quit").click()
            return 0

        monkeypatch.setattr(QMessageBox, "exec", answer)
        claim = claim_data_folder()

        assert claim is None and asked == []  # before the fix: a claim on a new, empty folder
        assert "brought to the front" in capsys.readouterr().err
        assert owner.stdout.readline().strip() == "raised"
        assert not folder.exists()  # not re-created by this start
    finally:
        owner.kill()
        owner.wait(30)
        if owner.stdout is not None:
            owner.stdout.close()
