#!/usr/bin/env python3
"""Prove that `pip install .` gives a working Cachet outside the checkout.

    python packaging/check_wheel.py [--cache-dir DIR] [--keep]

Builds the wheel from a copy of the sources, installs it into a fresh virtual environment in a
temporary folder, and runs the installed `cachet --data-dir D --self-test` from that folder (never
from the checkout, so nothing can be found by accident beside the packages). The self-test opens the
window, checks the style sheet and the measured cache costs were found, answers one message with
the bundled model and checks it was stored (app/selftest.py).

To stay within a test run's time, the new environment does not download torch again: it sees the
packages of the Python running this script (a `.pth` file), and the wheel is installed with
`--no-deps`. `--cache-dir` points the installed app at an existing cache folder so that the bundled
model is not converted again (the tests pass theirs); without it, the first start converts it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "app", "engine", "resources")  # what the wheel is built from


def build_wheel(out: Path) -> Path:
    """The wheel, built from a copy of the sources (setuptools writes build/ and *.egg-info beside them)."""
    src = out / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(out / "wheel"), str(src)], check=True)
    [wheel] = (out / "wheel").glob("cachet-*.whl")
    return wheel


def make_venv(where: Path) -> Path:
    """A new virtual environment that also sees this interpreter's installed packages; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    Path(purelib, "cachet-check-deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, help="converted models to reuse (CACHET_CACHE_DIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and say where it is")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="cachet-wheel-"))
    try:
        started = time.perf_counter()
        wheel = build_wheel(tmp)
        print(f"check-wheel: built {wheel.name} ({wheel.stat().st_size / 1024:.0f} KiB) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        python = make_venv(tmp / "venv")
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                        "-q", "--disable-pip-version-check", str(wheel)], check=True)
        scripts = python.parent
        cachet = scripts / ("cachet.exe" if os.name == "nt" else "cachet")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CACHET_DATA_DIR", "CACHET_CACHE_DIR")}
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
        where = subprocess.run([str(python), "-c", "import app, engine; print(app.__file__); print(engine.__file__)"],
                               cwd=tmp, env=env, check=True, capture_output=True, text=True).stdout.split()
        if any(Path(p).resolve().is_relative_to(ROOT) for p in where):
            print(f"check-wheel: FAILED: the installed app imports from the checkout: {where}", file=sys.stderr)
            return 1
        print(f"check-wheel: installed into {tmp / 'venv'}; app is {where[0]}", flush=True)
        data = tmp / "home"
        cmd = [str(cachet), "--data-dir", str(data), "--self-test"]
        if args.cache_dir is not None:
            # --data-dir puts the cache under it; reuse converted models by linking that cache folder.
            data.mkdir()
            (data / "cache").symlink_to(args.cache_dir.resolve(), target_is_directory=True)
        run = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=args.timeout)
        sys.stdout.write(run.stdout)
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            print(f"check-wheel: FAILED: `cachet --self-test` exited {run.returncode}", file=sys.stderr)
            return 1
        stored = data / "data" / "chats.sqlite3"
        if not stored.is_file():
            print(f"check-wheel: FAILED: no chat database in {data / 'data'}", file=sys.stderr)
            return 1
        print(f"check-wheel: ok in {time.perf_counter() - started:.1f} s", flush=True)
        return 0
    finally:
        if args.keep:
            print(f"check-wheel: kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
