"""The acceptance scripts of issue 12 still run: each one's fastest case, end to end, as a user of the
scripts runs them (their figures are in docs/bench/; no timing is checked here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_fault_injection_script_attacks_a_real_app_and_reports_what_held(tmp_path: Path) -> None:
    out = tmp_path / "fault"
    run = subprocess.run([sys.executable, "scripts/fault_injection.py", "--cases", "missing-location", "--out",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert run.returncode == 0, run.stdout + run.stderr
    [result] = json.loads((out / "fault-injection.json").read_text())
    assert result["attack"] == "location.json → missing folder" and result["held"] == "held"
    assert result["before"] == result["after"] > 0 and result["lost"] == 0
    assert "is missing" in result["note"]  # what the app said, from its own dialog
    assert "location.json → missing folder | held" in (out / "fault-injection.txt").read_text()


def test_the_view_bench_times_a_big_reply_in_the_window(tmp_path: Path) -> None:
    out = tmp_path / "view"
    run = subprocess.run([sys.executable, "scripts/bench_view.py", "--cases", "table-100x40", "--runs", "1",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert run.returncode == 0, run.stdout + run.stderr
    [result] = json.loads((out / "view.json").read_text())["results"]
    assert result["case"] == "table-100x40" and len(result["runs_s"]) == 1 and result["before"] == "2.3 s"
    assert "100×40 table" in (out / "view.txt").read_text()
