"""One owner per data folder (issue 12 item 1): the lock engine/lock.py gives the app, the CLI and the server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.lock import DataFolderLock, FolderInUseError, LockHolder, is_locked, read_holder

HOLD = ("import sys, time\n"
        "from engine.lock import DataFolderLock\n"
        "lock = DataFolderLock(sys.argv[1], owner='server').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")


def _holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    with proc.stdout:
        assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_and_told_who_holds_the_folder(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUseError) as info:
            DataFolderLock(tmp_path).acquire()
        assert info.value.holder.pid == proc.pid
        assert "server" in str(info.value) and str(tmp_path) in str(info.value)
        assert is_locked(tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not is_locked(tmp_path)
    with DataFolderLock(tmp_path, owner="app") as lock:
        assert lock.held
        assert read_holder(tmp_path).pid == os.getpid()
        assert read_holder(tmp_path).owner == "app"


def test_two_locks_in_one_process_exclude_each_other_and_release_frees(tmp_path: Path) -> None:
    first = DataFolderLock(tmp_path).acquire()
    with pytest.raises(FolderInUseError):
        DataFolderLock(tmp_path).acquire()
    first.release()
    DataFolderLock(tmp_path).acquire().release()


def test_a_refused_process_does_not_erase_the_holders_name(tmp_path: Path) -> None:
    held = DataFolderLock(tmp_path, owner="chat").acquire()
    for _ in range(2):
        with pytest.raises(FolderInUseError):
            DataFolderLock(tmp_path, owner="app").acquire()
    assert read_holder(tmp_path).owner == "chat"
    held.release()


def test_a_lock_whose_file_was_deleted_knows_it_and_renews_on_the_new_file(tmp_path: Path) -> None:
    """Issue 23 §7 item 2: with the data folder deleted, the held lock guards an unlinked file, and a
    second process locked a new file at the same path beside the first."""
    folder = tmp_path / "data"
    lock = DataFolderLock(folder, owner="app").acquire()
    assert lock.intact()
    shutil.rmtree(folder)
    assert not lock.intact()
    with pytest.raises(FileNotFoundError):
        lock.renew()  # never creates the folder
    folder.mkdir()
    assert not is_locked(folder)  # the hole: nothing holds the file at the path
    lock.renew()
    assert lock.intact() and is_locked(folder)
    assert read_holder(folder) == LockHolder(os.getpid(), "app")
    assert lock.renew() is lock and lock.intact()  # renewing an intact lock changes nothing
    lock.release()
    assert not is_locked(folder)


def test_a_renewal_refused_keeps_the_old_lock(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    lock = DataFolderLock(folder, owner="app").acquire()
    shutil.rmtree(folder)
    other = DataFolderLock(folder, owner="server").acquire()  # recreates the folder and locks it
    with pytest.raises(FolderInUseError):
        lock.renew()
    assert lock.held and not lock.intact()
    other.release()
    lock.release()
