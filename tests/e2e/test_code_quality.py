"""The tree keeps its own rules: ruff clean (which bans Qt imports in engine/) and type-checked (engine/ and app/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import kept_cache_dir

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_ruff_is_clean() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_engine_and_app_type_check() -> None:
    # mypy's cache, kept between runs (it checks every file against it): a fresh clone does not
    # type-check torch's, transformers' and Qt's stubs again (~50 s here)
    result = run("mypy", "--cache-dir", str(kept_cache_dir() / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_engine_never_imports_qt() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "engine").rglob("*.py")
        if any(line.lstrip().startswith(("import PySide6", "from PySide6", "import shiboken6"))
               for line in p.read_text().splitlines())
    ]
    assert offenders == []
