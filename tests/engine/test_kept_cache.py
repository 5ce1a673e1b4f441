"""What test runs keep between runs (tests/conftest.py): only what is keyed by content, in the kept cache
folder; the CPU precision probe's record and the other caches keyed by paths and timings last one session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import models, precision
from engine.precision import BF16, FP32, HALF_WEIGHTS, STEP_SIZES, PrecisionProbe
from tests.conftest import kept_cache_dir, kept_cache_strays
from tests.tiny import save_tiny_folder

HASH = "b179c9523d0e6a0f98a330c7562b6827"


def test_a_probe_taken_by_a_test_is_recorded_for_its_session_not_kept(
        tmp_path: Path, shared_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model in a temporary folder loaded with `--dtype auto` takes the probe: its record (keyed by the
    folder's path, with timings of this machine's load of the moment) goes to the session's cache folder."""
    step = {n: 0.01 * n for n in STEP_SIZES}
    monkeypatch.setattr(precision, "probe", lambda model, runs=5: PrecisionProbe(
        step_s={FP32: step, BF16: step, HALF_WEIGHTS: step}, prefill_s={FP32: 0.05, BF16: 0.05, HALF_WEIGHTS: 0.05}))
    monkeypatch.setattr(precision, "_probed_here", set())
    kept = kept_cache_dir() / "precision.json"
    models.load(str(save_tiny_folder(tmp_path / "tiny")), device="cpu")
    record = shared_cache_dir / "precision.json"
    assert precision._table_path() == record and record.is_file()
    assert any(str(tmp_path / "tiny") in key for key in json.loads(record.read_text()))
    assert shared_cache_dir.resolve() != kept_cache_dir().resolve() and not kept.exists()


def test_converted_models_are_shared_with_the_kept_folder(shared_cache_dir: Path) -> None:
    assert (shared_cache_dir / "models").resolve() == (kept_cache_dir() / "models").resolve()


def test_the_check_names_what_is_not_keyed_by_content(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    for folder in (f"models/{HASH}-v1", f"models/.{HASH}-v1.4242.tmp", f"models/{HASH}-int8-float32-q1",
                   "models/0123456789abcdef0123456789abcdef-int4-float32-q1", "mypy/3.11"):
        (kept / folder).mkdir(parents=True)
    (kept / f"models/{HASH}-int8-float32-q1/cachet-quantized.json").write_text(
        json.dumps({"source": f"gguf-sha256:{HASH}{HASH}"}))
    (kept / "models/0123456789abcdef0123456789abcdef-int4-float32-q1/cachet-quantized.json").write_text(
        json.dumps({"source": "folder:/tmp/pytest-of-me/pytest-7/test_x0/tiny:abc"}))
    (kept / "precision.json").write_text("{}")
    (kept / "hashes.json").write_text("{}")
    (kept / "models" / "notes.txt").write_text("")
    assert kept_cache_strays(kept) == ["hashes.json", "precision.json",
                                       "models/0123456789abcdef0123456789abcdef-int4-float32-q1", "models/notes.txt"]
    assert kept_cache_strays(tmp_path / "absent") == []
