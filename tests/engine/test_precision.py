"""`--dtype auto` on a CPU: the precision measured fastest here, remembered per machine and model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import models, precision
from engine.precision import STEP_SIZES, PrecisionProbe
from tests.tiny import save_tiny_folder


def _probe(decode_speedup: float, prefill_speedup: float) -> PrecisionProbe:
    step = {n: 0.010 * (1 + 0.1 * (n - 1)) for n in STEP_SIZES}
    return PrecisionProbe(
        step_s={"float32": step, "bfloat16": {n: s / decode_speedup for n, s in step.items()}},
        prefill_s={"float32": 0.050, "bfloat16": 0.050 / prefill_speedup},
    )


def test_the_typical_turn_decides_not_one_phase() -> None:
    # bf16 decodes 1.7x faster but prefills 2x slower: a turn of 64 new tokens and 256 decoded still favours bf16.
    assert _probe(1.7, 0.5).best() == "bfloat16"
    # decoding no faster and prefill slower: fp32
    assert _probe(1.0, 0.5).best() == "float32"
    assert "bfloat16: measured fastest" in _probe(1.7, 1.0).describe("bfloat16")
    costs = _probe(1.7, 1.0).step_costs("bfloat16")
    assert costs[1] == 1.0 and costs[8] == pytest.approx(1.7)


def test_the_probe_times_every_step_size_in_both_precisions(tiny_lm) -> None:
    found = precision.probe(tiny_lm.model, runs=1)
    for name in ("float32", "bfloat16"):
        assert set(found.step_s[name]) == set(STEP_SIZES)
        assert all(s > 0 for s in found.step_s[name].values()) and found.prefill_s[name] > 0
    assert tiny_lm.model.dtype == torch.float32  # the model itself is untouched


@pytest.fixture(autouse=True)
def own_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHET_CACHE_DIR", str(tmp_path / "cache"))  # precision.json of these tests only


def test_auto_on_a_cpu_loads_the_measured_precision_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_probe(model, runs=5):  # noqa: ANN001, ANN202
        calls.append(model)
        return _probe(1.7, 0.9)

    monkeypatch.setattr(precision, "probe", fake_probe)
    folder = save_tiny_folder(tmp_path / "tiny")
    lm = models.load(str(folder), device="cpu")
    assert lm.dtype == torch.bfloat16 and lm.model.dtype == torch.bfloat16
    assert lm.identity.endswith("|bfloat16")  # snapshots of an fp32 run are not restored into it
    assert "measured fastest" in lm.precision_note
    assert lm.step_costs[1] == 1.0 and lm.step_costs[8] > 1.0
    again = models.load(str(folder), device="cpu")
    assert again.dtype == torch.bfloat16 and len(calls) == 1  # remembered in the cache folder
    assert models.load(str(folder), device="cpu", dtype="float32").dtype == torch.float32  # a choice is kept


def test_a_damaged_table_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "probe", lambda model, runs=5: _probe(0.8, 0.5))
    precision._table_path().parent.mkdir(parents=True, exist_ok=True)
    precision._table_path().write_text("{not json", encoding="utf-8")
    folder = save_tiny_folder(tmp_path / "tiny")
    lm = models.load(str(folder), device="cpu")
    assert lm.dtype == torch.float32 and "float32: measured fastest" in lm.precision_note
