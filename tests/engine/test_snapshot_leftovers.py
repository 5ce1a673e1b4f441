"""What a killed or interrupted run leaves in the data folder is cleaned up at the next start, and a
data folder deleted while Cachet runs is not re-created by a snapshot (issue 23 §7 items 2 and 5).

A snapshot is written to `.<key>.safetensors.<pid>.tmp` and then renamed; a kill in between left the
temporary file (as large as the cache) forever, while the models' temporary folders were swept. The
store's `.chats.sqlite3.closed.<pid>.tmp` (a quit on a full disk) was never swept either."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from engine.snapshots import SnapshotStore
from engine.store import ChatStore
from tests.engine.test_snapshots import chat


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_a_killed_snapshot_writes_temporary_file_is_removed_at_the_next_start(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    root.mkdir()
    dead = root / f".4.safetensors.{_dead_pid()}.tmp"
    dead.write_bytes(b"\0" * 4096)  # what SnapshotStore.save had written of it when it was killed
    ours = root / f".5.safetensors.{os.getpid()}.tmp"  # a live process may still be writing its own
    ours.write_bytes(b"")
    kept = [root / "4.safetensors", root / ".hidden-note.tmp", root / ".x.notapid.tmp"]
    for path in kept:
        path.write_bytes(b"x")

    store = SnapshotStore(root)  # made when the model has loaded, at every start

    assert store.swept == [dead] and not dead.exists()  # before the fix: never removed
    assert ours.exists() and all(p.exists() for p in kept)


def test_the_stores_temporary_files_of_a_dead_process_are_removed_when_it_opens(tmp_path: Path) -> None:
    pid = _dead_pid()
    left = [tmp_path / f".chats.sqlite3.closed.{pid}.tmp", tmp_path / f".chats.sqlite3-wal.{pid}.check"]
    for path in left:
        path.write_text("{}")
    live = tmp_path / f".settings.json.{os.getpid()}.tmp"
    live.write_text("{}")

    store = ChatStore(tmp_path / "chats.sqlite3")

    assert sorted(store.swept) == sorted(left) and not any(p.exists() for p in left)
    assert live.exists()
    store.close()


def test_a_snapshot_does_not_recreate_a_data_folder_deleted_while_cachet_ran(tiny_lm, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = SnapshotStore(data / "snapshots")
    session = chat(tiny_lm)
    assert store.save(1, session) is not None
    shutil.rmtree(data)  # the user deleted the data folder while the app ran

    assert store.save(1, session) is None  # before the fix: data/snapshots/1.safetensors, a folder with no chats
    assert not data.exists()

    data.mkdir()  # the app re-created it to save its chats there: snapshots are written again
    assert store.save(1, session) is not None
