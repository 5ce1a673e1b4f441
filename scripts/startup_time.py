#!/usr/bin/env python3
"""Time from starting `python -m app` to its window being shown (the model loads afterwards).

    .venv/bin/python scripts/startup_time.py [--runs 5] [--binary dist/Cachet/cachet] [--out DIR]

Each run starts a fresh process on a throwaway data folder; the app prints a timestamp once
its window is up and the event loop runs, then quits (hidden flag --exit-when-shown). What it prints
and the figures are saved under --out (scripts/records.py; the machine is read after the runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import records  # scripts/records.py

NAME = "startup-time"
ROOT = Path(__file__).resolve().parent.parent


def one_run(binary: Path | None = None) -> float:
    env = {**os.environ, "CACHET_PRINT_SHOWN": "1"}
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    with tempfile.TemporaryDirectory(prefix="cachet-start-") as tmp:
        started = time.time()
        command = [str(binary)] if binary else [sys.executable, "-m", "app"]
        out = subprocess.run([*command, "--data-dir", tmp, "--exit-when-shown"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    for line in out.stdout.splitlines():
        if line.startswith("cachet-window-shown "):
            return float(line.split()[1]) - started
    raise RuntimeError(f"the app did not report its window:\n{out.stdout}\n{out.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--binary", type=Path, help="time this frozen app (packaging/build.py), not python -m app")
    records.add_out_argument(parser, NAME)
    args = parser.parse_args()
    with records.Run(NAME, args.out, arguments=args) as run:
        times = [one_run(args.binary) for _ in range(args.runs)]
        print("process start -> window shown: " + ", ".join(f"{t:.2f}" for t in times) + " s")
        print(f"median {statistics.median(times):.2f} s, best {min(times):.2f} s")
        run.figures.update({"started": str(args.binary) if args.binary else "python -m app",
                            "window_shown_s": records.figure(times)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
