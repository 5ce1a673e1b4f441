"""The figures the README quotes from scripts/ are kept: each script saves what it printed and its figures, with
the exact command, the machine and the date, in the folder it is given (scripts/records.py). No timing is
checked here, only that a run leaves its record."""

from __future__ import annotations

import ast
import datetime as dt
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The scripts whose figures the README quotes.
QUOTED = ("bench_pool", "bench_resume", "bench_server", "bench_load", "bench_weights", "bench_discovery",
          "startup_time")


def records_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("records", ROOT / "scripts" / "records.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen", **(env or {})})


@pytest.mark.parametrize("script", QUOTED)
def test_every_quoted_script_takes_an_out_folder_and_keeps_its_run(script: str) -> None:
    """Read from each script's source: it offers --out and runs its measurement inside a kept Run."""
    tree = ast.parse((ROOT / "scripts" / f"{script}.py").read_text(encoding="utf-8"))
    called = {f"{node.func.value.id}.{node.func.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name)}
    assert {"records.add_out_argument", "records.Run"} <= called, script


def test_a_run_is_kept_with_its_command_machine_date_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "startup"
    run = run_script("scripts/startup_time.py", "--runs", "1", "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((out / "startup-time.json").read_text(encoding="utf-8"))
    assert record["schema"] == "cachet-script/1" and record["script"] == "startup-time"
    assert record["command"] == f"python scripts/startup_time.py --runs 1 --out {out}"
    assert abs(dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(record["created"])) < dt.timedelta(hours=1)
    machine = record["machine"]
    assert machine["cpu"] and isinstance(machine["cpu_flags"], list) and machine["cores_logical"] >= 1
    assert record["packages"]["torch"] and record["arguments"]["runs"] == 1
    shown = record["figures"]["window_shown_s"]
    assert len(shown["runs"]) == 1 and shown["min"] == shown["median"] == shown["max"] > 0
    text = (out / "startup-time.txt").read_text(encoding="utf-8")
    assert text.startswith(record["command"] + "\n")
    assert "process start -> window shown: " in text and machine["cpu"] in text.splitlines()[1]


def test_a_run_that_fails_keeps_no_record(tmp_path: Path) -> None:
    records = records_module()
    with pytest.raises(RuntimeError), records.Run("broken", tmp_path, argv=["scripts/x.py"]) as run:
        print("half a table")
        run.figures["x"] = 1
        raise RuntimeError("the measurement broke")
    assert not list(tmp_path.iterdir())


def test_the_default_folder_is_dated_and_names_the_script_and_the_cpu() -> None:
    records = records_module()
    folder = records.default_out("bench-pool")
    assert folder.parent == ROOT / "docs" / "bench"
    assert folder.name == f"{dt.date.today().isoformat()}-bench-pool-{records.cpu_slug()}"
    assert records.cpu_slug() and " " not in records.cpu_slug()


def test_a_gguf_size_too_small_for_its_tensors_is_refused_with_the_size_needed(tmp_path: Path) -> None:
    run = run_script("scripts/bench_discovery.py", "--runs", "1", "--size-gib", "0.1", "--out", str(tmp_path / "d"))
    assert run.returncode != 0
    assert re.search(r"--size-gib 0\.1 is smaller than the tensors' data; the file needs at least \d+\.\d\d GiB",
                     run.stderr), run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "d").exists()


@pytest.mark.real_model
def test_the_weights_bench_keeps_each_precisions_figures(tmp_path: Path) -> None:
    out = tmp_path / "weights"  # the bundled model's converted copy: the tests' kept cache folder (conftest.py)
    run = run_script("scripts/bench_weights.py", "--precisions", "fp32", "--rounds", "1", "--tokens", "2",
                     "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((out / "bench-weights.json").read_text(encoding="utf-8"))
    fp32 = record["figures"]["fp32"]
    assert fp32["precision"] and len(fp32["tokens_per_s"]["runs"]) == 1 and fp32["ratio_to_fp32"] == 1.0
    assert fp32["weights_bytes"] > 0 and set(fp32["load_s"]) == {"first", "again"}
    assert "tokens/s" in (out / "bench-weights.txt").read_text(encoding="utf-8")
