"""Temporary files left by writes that never finished, found and removed at start.

Every atomic write in Cachet's folders goes through a hidden temporary file named after its target and
the writing process, `.<target>.<pid>.tmp` (a snapshot's `.4.safetensors.812.tmp`, the store's
`.chats.sqlite3.closed.812.tmp`), then `os.replace`. A process killed between the two (or quitting on a
full disk) leaves the temporary file behind, and nothing else would ever remove it: a snapshot's can
weigh gigabytes. `remove_stale` deletes those whose process is gone; a live process's (this one's
included) are left alone, since it may still be writing them.

This module imports neither Qt nor torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# What a temporary file's name ends with: ".<pid>" then one of these (SQLite adds -wal, -shm or -journal
# to a temporary copy it opens).
SUFFIXES = (".tmp", ".check", ".tmp-wal", ".tmp-shm", ".tmp-journal")


def writer_pid(name: str) -> int | None:
    """The pid in a temporary file's name (`.<target>.<pid>.tmp`), None for any other name."""
    if not name.startswith("."):
        return None
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            _, dot, pid = stem.rpartition(".")
            if dot and pid.isdigit() and len(stem) > len(pid) + 1:
                return int(pid)
    return None


def process_alive(pid: int) -> bool:
    """True when a process `pid` exists (ours included). psutil answers on every system."""
    if pid == os.getpid():
        return True
    import psutil

    try:
        return bool(psutil.pid_exists(pid))
    except (OSError, ValueError):
        return True  # cannot tell: keep the file


def remove_stale(folder: Path, also: Iterable[Path] = ()) -> list[Path]:
    """Delete the temporary files in `folder` (not below it; and in the folders `also`) whose writing
    process is gone; returns what was removed. Folders that do not exist are skipped, and a file that
    cannot be removed stays (it is tried again at the next start)."""
    removed: list[Path] = []
    for place in (folder, *also):
        try:
            entries = list(os.scandir(place))
        except OSError:
            continue
        for entry in entries:
            pid = writer_pid(entry.name)
            if pid is None or process_alive(pid):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    return removed
