"""Killing the app mid-reply loses only the part of the reply that was not written yet (a real
process, the tiny random model, held mid-reply by `tests/launch_app.py --hold-after`)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from engine.store import ChatStore

ROOT = Path(__file__).resolve().parents[2]
HOLD_AFTER = 4  # forward passes before the model holds: the prompt's, then three tokens'


def _reply_row(db_path: Path) -> tuple[str, str, float, float] | None:
    """(status, content, created_at, updated_at) of the one assistant message, or None before it exists."""
    if not db_path.exists():
        return None
    db = sqlite3.connect(db_path, timeout=5)
    try:
        rows = db.execute("SELECT status, content, created_at, updated_at FROM messages "
                          "WHERE role = 'assistant'").fetchall()
    except sqlite3.OperationalError:  # the schema is not created yet
        return None
    finally:
        db.close()
    return tuple(rows[0]) if rows else None  # type: ignore[return-value]


def test_killing_the_app_mid_reply_loses_only_the_unfinished_part(tmp_path: Path, qtbot: Any) -> None:
    """A real process, killed with SIGKILL while a reply streams; the next start finds the
    user's message and the reply as far as it was written, marked interrupted.

    The model holds after HOLD_AFTER passes, so the reply is open however fast the machine is; the test
    then lets it on one pass per poll until the window has written the growing reply a second time (it
    writes a streaming reply at most every half second), and kills the process there."""
    base = tmp_path / "killed"
    (base / "data").mkdir(parents=True)
    (base / "data" / "settings.json").write_text(
        '{"default_sampling": {"temperature": 0.0, "max_new_tokens": 5000, "repetition_penalty": 1.0}}')
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.launch_app", "--send", "Tell me everything",
                             "--hold-after", str(HOLD_AFTER), "--data-dir", str(base)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    db_path = base / "data" / "chats.sqlite3"
    seen: dict[str, tuple[str, str, float, float]] = {}

    def alive() -> None:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""

    def first_written() -> bool:
        alive()
        row = _reply_row(db_path)
        if row is None or row[0] != "streaming" or not row[1]:
            return False
        seen["first"] = row
        return True

    def written_again() -> bool:
        alive()
        row = _reply_row(db_path)
        assert row is not None and row[0] == "streaming", row  # held: it cannot have ended
        if row[3] > row[2]:
            seen["again"] = row
            return True
        assert proc.stdin is not None
        proc.stdin.write(b"\n")  # one more pass (one token) for the next poll
        proc.stdin.flush()
        return False

    try:
        qtbot.waitUntil(first_written, timeout=90_000)
        qtbot.waitUntil(written_again, timeout=90_000)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        for pipe in (proc.stdin, proc.stderr):
            if pipe:
                pipe.close()
    assert proc.returncode == -signal.SIGKILL
    first, again = seen["first"][1], seen["again"][1]
    assert again.startswith(first) and len(again) > len(first)  # the reply grew, and was written as it grew

    store = ChatStore(db_path)
    try:
        [chat] = store.chats()
        user, reply = store.messages(chat.id)
        assert (user.role, user.content, user.complete) == ("user", "Tell me everything", True)
        assert reply.role == "assistant" and reply.status == "interrupted" and not reply.complete
        # everything written before the kill is there: the reply as last seen (a late delta may add to it)
        assert reply.content.startswith(again)
        assert store.recovered == 1
    finally:
        store.close()
