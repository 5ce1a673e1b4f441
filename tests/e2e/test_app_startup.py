"""The window comes up before anything heavy is imported: torch and transformers load in the
worker thread, after the window is shown (scripts/startup_time.py measures the time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_window_is_shown_before_torch_is_imported(tmp_path: Path) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "CACHET_PRINT_SHOWN": "1"}
    out = subprocess.run([sys.executable, "-m", "app", "--data-dir", str(tmp_path), "--exit-when-shown"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    [line] = [ln for ln in out.stdout.splitlines() if ln.startswith("cachet-window-shown")]
    assert line.endswith("heavy-imports=0")
    assert (tmp_path / "data" / "chats.sqlite3").is_file()  # --data-dir holds the chats
