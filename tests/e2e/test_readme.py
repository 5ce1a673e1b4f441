"""The README and the architecture map name only what exists: every path into the checkout they mention is
there, and no path of the machine a figure was measured on slipped in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/ARCHITECTURE.md")
TOP = r"(?:app|engine|tests|scripts|docs|resources|packaging|\.github|\.ci)"
# a path into the checkout: starts at a top-level folder, not inside another path or a URL
PATH = re.compile(rf"(?<![\w/.~$-]){TOP}/[\w./*-]*")
MACHINE_PATHS = re.compile(r"/work/|/root/|/home/\w+/|/tmp/pytest")


def mentioned_paths(text: str) -> set[str]:
    found = set()
    for match in PATH.finditer(text):
        path = match.group(0).rstrip(".,:;")
        path = path.split("::")[0]
        if "*" in path or any(re.fullmatch(r"[A-Z_]{2,}", piece) for part in path.split("/")
                              for piece in part.split("-")):
            continue  # a pattern or a placeholder (tests/data/configs/MODEL, docs/bench/DATE-gpu-check-GPU)
        found.add(path.rstrip("/"))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_the_docs_name_exists(doc: str) -> None:
    text = (ROOT / doc).read_text(encoding="utf-8")
    missing = sorted(p for p in mentioned_paths(text) if not (ROOT / p).exists())
    assert missing == [], f"{doc} names paths that are not in the checkout: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_hold_no_path_of_the_machine_they_were_written_on(doc: str) -> None:
    lines = [f"{i}: {line.strip()}" for i, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1)
             if MACHINE_PATHS.search(line)]
    assert lines == []


def test_the_path_finder_finds_what_it_should() -> None:
    text = ("see `tests/engine/test_x.py::test_y`, [record](docs/bench/a/summary.txt), python scripts/b.py. "
            "Not https://x.org/engine/y nor .venv/lib/engine/z nor ~/docs/q nor tests/data/configs/MODEL "
            "nor docs/bench/DATE-gpu-check-GPU.")
    assert mentioned_paths(text) == {"tests/engine/test_x.py", "docs/bench/a/summary.txt", "scripts/b.py"}
