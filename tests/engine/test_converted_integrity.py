"""Converted model weights are checked and rebuilt from the GGUF when damaged (issue 12 item 9), and
a conversion killed half-way leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import models


def _folder_with_record(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    (folder / "cachet-source.json").write_text(
        '{"gguf": "x.gguf", "sha256": "' + "0" * 64 + '", "format": 1, "files": '
        + __import__("json").dumps(models._record_files(folder)) + "}")
    return folder


def test_a_converted_copy_is_checked_against_what_was_written(tmp_path: Path) -> None:
    folder = _folder_with_record(tmp_path / "copy")
    assert models.verify_converted(folder) is None
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    assert "checksum" in (models.verify_converted(folder) or "")
    weights.write_bytes(bytes(data[:1000]))  # truncated
    assert "bytes" in (models.verify_converted(folder) or "")
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert models.verify_converted(folder) is None  # as written again
    (folder / "tokenizer.json").unlink()
    assert "missing" in (models.verify_converted(folder) or "")


def test_leftover_folders_of_an_interrupted_conversion_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f".abc-v1.{int(dead.stdout)}.tmp"
    (gone / "sub").mkdir(parents=True)
    (gone / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".abc-v1.{os.getpid()}.tmp"
    live.mkdir()
    finished = tmp_path / "abc-v1"
    finished.mkdir()
    assert models.remove_interrupted_conversions(tmp_path) == [gone]
    assert not gone.exists() and live.exists() and finished.exists()


@pytest.mark.real_model
def test_a_damaged_converted_copy_is_rebuilt_from_the_gguf_and_the_user_told(
        tmp_path: Path, shared_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = models.resolve("default")
    digest = models.file_sha256(Path(source.location))
    monkeypatch.setenv("CACHET_CACHE_DIR", str(tmp_path / "cache"))
    folder = models.converted_dir(digest)
    kept = shared_cache_dir / "models" / folder.name
    if kept.is_dir() and (kept / "model.safetensors").is_file():
        shutil.copytree(kept, folder)  # a converted copy as an earlier start left it
    else:
        models.ensure_converted(Path(source.location))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a kill / disk error mid-write
    said: list[str] = []

    lm = models.load("default", device="cpu", dtype="float32", progress=said.append)  # before: a traceback

    assert any("damaged" in line and "converting it again" in line for line in said), said
    assert models.verify_converted(folder) is None  # rebuilt, with the record of what was written
    assert lm.weights_bytes > 100_000_000
