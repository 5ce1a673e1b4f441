"""Print how long the bundled model takes to become ready: first start (GGUF conversion) and later starts.

    .venv/bin/python scripts/bench_load.py            # uses the normal cache folder
    .venv/bin/python scripts/bench_load.py --fresh    # a throwaway cache folder: also measures the first start
    [--repeats 3] [--out DIR]                         # later starts; where the record goes (scripts/records.py)

Each start is a new Python process, so the figures include nothing already in memory.
`import` is the one-time cost of importing torch and transformers in a new process (the app
does it in its worker thread while the window is already up); `load` is models.load().
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import records  # scripts/records.py

NAME = "bench-load"
ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, time
t0 = time.perf_counter()
import torch
from engine import models
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
t1 = time.perf_counter()
lm = models.load("default")
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def one_start(env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fresh", action="store_true", help="start from an empty cache folder")
    parser.add_argument("--repeats", type=int, default=3)
    records.add_out_argument(parser, NAME)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    tmp = tempfile.TemporaryDirectory() if args.fresh else None
    with records.Run(NAME, args.out, arguments=args) as run:
        if tmp is not None:
            env["CACHET_CACHE_DIR"] = tmp.name
            first = one_start(env)
            run.figures["first_start"] = first
            print(f"first start : load {first['load_s']:.2f} s (import {first['import_s']:.2f} s, "
                  f"whole process {first['process_s']:.2f} s)")
        later = []
        for i in range(args.repeats):
            r = one_start(env)
            later.append(r)
            print(f"later start {i + 1}: load {r['load_s']:.2f} s (import {r['import_s']:.2f} s, "
                  f"whole process {r['process_s']:.2f} s)")
        if later:
            run.figures["later_starts"] = {key: records.figure(r[key] for r in later)
                                           for key in ("load_s", "import_s", "process_s")}


if __name__ == "__main__":
    main()
