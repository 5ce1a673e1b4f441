"""Killing the app mid-reply loses only the part of the reply that was not written yet (a real
process, the tiny random model)."""

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


def test_killing_the_app_mid_reply_loses_only_the_unfinished_part(tmp_path: Path, qtbot: Any) -> None:
    """A real process, killed with SIGKILL while a reply streams; the next start finds the
    user's message and the partial reply, marked interrupted."""
    base = tmp_path / "killed"
    (base / "data").mkdir(parents=True)
    (base / "data" / "settings.json").write_text(
        '{"default_sampling": {"temperature": 0.0, "max_new_tokens": 5000, "repetition_penalty": 1.0}}')
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.launch_app", "--send", "Tell me everything",
                             "--data-dir", str(base)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db_path = base / "data" / "chats.sqlite3"

    def partial_reply_flushed() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        if not db_path.exists():
            return False
        db = sqlite3.connect(db_path, timeout=5)
        try:
            rows = db.execute("SELECT status, length(content), updated_at > created_at FROM messages "
                              "WHERE role = 'assistant'").fetchall()
        except sqlite3.OperationalError:  # the schema is not created yet
            return False
        finally:
            db.close()
        # streaming, and written again after its first token
        return bool(rows) and rows[0][0] == "streaming" and rows[0][1] > 0 and bool(rows[0][2])

    try:
        qtbot.waitUntil(partial_reply_flushed, timeout=90_000)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    store = ChatStore(db_path)
    try:
        [chat] = store.chats()
        user, reply = store.messages(chat.id)
        assert (user.role, user.content, user.complete) == ("user", "Tell me everything", True)
        assert reply.role == "assistant" and reply.status == "interrupted" and not reply.complete
        assert len(reply.content) > 0
        assert store.recovered == 1
    finally:
        store.close()
