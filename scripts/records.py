"""Every figure a script prints is kept with the command that produced it and the machine it ran on.

A script calls `add_out_argument(parser, NAME)` and wraps its run in `Run`:

    with records.Run(NAME, args.out) as run:   # prints as before, and keeps what it printed
        ...
        run.figures["median_ms"] = ...
    # → OUT/NAME.txt (the command, date, machine in one line, then the printed output)
    #   OUT/NAME.json (schema, script, command, created, seconds, machine, packages, arguments, figures)

`--out` defaults to docs/bench/DATE-NAME-CPU (CPU: the processor's model and its widest SIMD extension),
as `python -m engine bench` writes docs/bench/DATE-DEVICE. The machine and package facts come from
engine/bench/machine.py, the same functions the benchmark's record uses; repeated timings are kept as
engine/bench/record.py's `Figure` (median, min, max, runs). A run that fails writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = "cachet-script/1"
BENCH_DIR = ROOT / "docs" / "bench"
_NOISE = ("processor", "cpu", "core", "with", "radeon", "graphics")


def cpu_slug() -> str:
    """The processor in a folder name: its model without the marketing words, then its widest SIMD extension
    ("amd-epyc-9r14-avx512"), so records from different machines never share a folder."""
    from engine.bench import machine

    model = re.sub(r"@.*$|\((r|tm)\)", " ", machine.cpu_model().lower())  # "Intel(R) ... @ 2.40GHz"
    words = [w for w in re.split(r"[^a-z0-9]+", model) if w and w not in _NOISE and not w.isdigit()]
    flags = machine.cpu_flags()
    simd = next((name for flag, name in (("avx512f", "avx512"), ("avx2", "avx2"), ("neon", "neon"),
                                         ("asimd", "neon")) if flag in flags), "")
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join([*words, simd])).strip("-")
    return slug or "cpu"


def default_out(name: str) -> Path:
    """docs/bench/DATE-NAME-CPU in this checkout."""
    return BENCH_DIR / f"{_dt.date.today().isoformat()}-{name}-{cpu_slug()}"


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for {name}.json and {name}.txt (default: docs/bench/DATE-{name}-CPU)")


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this run was started, as a shell line that starts it again from the checkout's root."""
    words = list(sys.argv if argv is None else argv)
    script = Path(words[0]) if words else Path("?")
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return shlex.join(["python", str(script), *words[1:]])


def figure(runs: Iterable[float]) -> dict[str, Any]:
    """Repeated timings as the benchmark keeps them: median, min, max and the runs."""
    from engine.bench.record import Figure

    return Figure.of(runs).to_dict()


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.kept = io.StringIO()

    def write(self, text: str) -> int:  # type: ignore[override]
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class Run:
    """One run of a script: keeps what it prints to stdout, its figures, and writes both on success."""

    def __init__(self, name: str, out: Path | None, *, arguments: argparse.Namespace | dict[str, Any] | None = None,
                 argv: Sequence[str] | None = None) -> None:
        self.name = name
        self.out = out
        self.arguments = vars(arguments) if isinstance(arguments, argparse.Namespace) else dict(arguments or {})
        self.command = command_line(argv)
        self.figures: dict[str, Any] = {}
        self.created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self._tee: _Tee | None = None
        self._redirect: contextlib.redirect_stdout[Any] | None = None
        self._started = 0.0
        self.written: Path | None = None

    def __enter__(self) -> Run:
        self._started = time.perf_counter()
        self._tee = _Tee(sys.stdout)
        self._redirect = contextlib.redirect_stdout(self._tee)  # type: ignore[type-var]
        self._redirect.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._redirect is not None and self._tee is not None
        self._redirect.__exit__(kind, exc, tb)
        if kind is None:
            self.written = self.save(self._tee.kept.getvalue(), time.perf_counter() - self._started)

    @property
    def printed(self) -> str:
        return self._tee.kept.getvalue() if self._tee is not None else ""

    def save(self, printed: str, seconds: float) -> Path:
        """Write NAME.json and NAME.txt under the out folder (atomically each); returns the folder."""
        import torch

        from engine.bench import machine

        out = self.out or default_out(self.name)
        out.mkdir(parents=True, exist_ok=True)
        info = machine.machine_info(torch.device("cpu"))
        packages = machine.package_versions()
        record = {
            "schema": SCHEMA, "script": self.name, "command": self.command, "created": self.created,
            "seconds": round(seconds, 1), "machine": info, "packages": packages,
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in self.arguments.items()},
            "figures": self.figures,
        }
        flags = ", ".join(info["cpu_flags"]) or "no SIMD flags read"
        head = (f"{self.command}\n({self.created[:16].replace('T', ' ')}, {info['cpu']} [{flags}], "
                f"{info['cores_logical']} cores, torch {packages.get('torch')}, {round(seconds)} s)\n\n")
        _write_atomic(out / f"{self.name}.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        _write_atomic(out / f"{self.name}.txt", head + printed)
        print(f"\nwrote {out / (self.name + '.json')} and {self.name}.txt", file=sys.stderr)
        return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

