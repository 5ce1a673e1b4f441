"""Two starts on one data folder (issue 12 item 1), as real processes: the second brings the first's
window to the front and ends, without touching the chats — the first's live reply is never marked
"interrupted" — and a terminal chat on the same folder is refused."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _statuses(db_path: Path) -> list[str]:
    if not db_path.exists():
        return []
    db = sqlite3.connect(db_path, timeout=5)
    try:
        return [r[0] for r in db.execute("SELECT status FROM messages WHERE role = 'assistant'")]
    except sqlite3.OperationalError:  # the schema is not created yet
        return []
    finally:
        db.close()


def test_a_second_app_on_the_same_folder_defers_to_the_first(tmp_path: Path, qtbot: Any) -> None:
    base = tmp_path / "shared"
    (base / "data").mkdir(parents=True)
    (base / "data" / "settings.json").write_text(
        '{"default_sampling": {"temperature": 0.0, "max_new_tokens": 5000, "repetition_penalty": 1.0}}')
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    # held after its first token (tests/launch_app.py): the first's reply streams until the test ends,
    # however fast the machine writes it
    first = subprocess.Popen([sys.executable, "-m", "tests.launch_app", "--send", "Tell me everything",
                              "--hold-after", "2", "--data-dir", str(base)], cwd=ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db_path = base / "data" / "chats.sqlite3"
    try:
        def streaming() -> bool:
            assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
            return _statuses(db_path) == ["streaming"]

        qtbot.waitUntil(streaming, timeout=90_000)
        second = subprocess.run([sys.executable, "-m", "tests.launch_app", "--data-dir", str(base)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=120)
        # before the fix: the second window opened, marked the live reply "interrupted" and offered Regenerate
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stderr and "brought to the front" in second.stderr
        # the first's live reply, untouched: still streaming
        assert _statuses(db_path) == ["streaming"]
        assert first.poll() is None

        turns = tmp_path / "turns.txt"
        turns.write_text("hello\n")
        chat = subprocess.run([sys.executable, "-m", "engine", "chat", "--data-dir", str(base), "--turns",
                               str(turns)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert chat.returncode == 1 and "in use by the Cachet app" in chat.stderr
        assert _statuses(db_path) == ["streaming"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        for pipe in (first.stdin, first.stderr):
            if pipe:
                pipe.close()


def test_the_terminal_chat_is_refused_while_the_app_holds_the_folder(tmp_path: Path) -> None:
    from engine.lock import DataFolderLock

    turns = tmp_path / "turns.txt"
    turns.write_text("hello\n")
    with DataFolderLock(tmp_path / "base" / "data", owner="app"):
        chat = subprocess.run([sys.executable, "-m", "engine", "chat", "--data-dir", str(tmp_path / "base"),
                               "--turns", str(turns)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 1
    assert chat.stderr.strip().splitlines()[-1].startswith("error: The data folder")
    assert "in use by the Cachet app" in chat.stderr
    assert not (tmp_path / "base" / "data" / "chats.sqlite3").exists()  # nothing opened, nothing written
