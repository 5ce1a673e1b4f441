"""`--dtype auto` on a CPU: the precision measured fastest here, remembered per machine and model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import half_weights, models, precision
from engine.precision import BF16, CANDIDATES, FP32, HALF_WEIGHTS, STEP_SIZES, PrecisionProbe
from tests.tiny import save_tiny_folder, tiny_loaded_model


def _probe(decode_speedup: float, prefill_speedup: float, copies_decode: float = 0.0) -> PrecisionProbe:
    """fp32; bf16 decoding `decode_speedup`× and prefilling `prefill_speedup`× as fast; fp32 with bf16 copies
    decoding `copies_decode`× as fast (0: as fast as fp32) and prefilling as fp32 does."""
    step = {n: 0.010 * (1 + 0.1 * (n - 1)) for n in STEP_SIZES}
    copies = {n: s / copies_decode for n, s in step.items()} if copies_decode else dict(step)
    return PrecisionProbe(
        step_s={FP32: step, BF16: {n: s / decode_speedup for n, s in step.items()}, HALF_WEIGHTS: copies},
        prefill_s={FP32: 0.050, BF16: 0.050 / prefill_speedup, HALF_WEIGHTS: 0.050},
        kernel_max_tokens=4,
    )


def test_the_typical_turn_decides_not_one_phase() -> None:
    # bf16 decodes 1.7x faster but prefills 2x slower: a turn of 64 new tokens and 256 decoded still favours bf16 ...
    assert _probe(1.7, 0.5).best() == BF16
    # ... unless bf16 copies of the weights decode as fast and prefill in fp32
    assert _probe(1.7, 0.5, copies_decode=1.7).best() == HALF_WEIGHTS
    # with native bf16 arithmetic (prefill faster too) the whole model in bf16 wins
    assert _probe(1.7, 1.5, copies_decode=1.7).best() == BF16
    # decoding no faster and prefill slower: fp32
    assert _probe(1.0, 0.5).best() == FP32
    assert "bfloat16: measured fastest" in _probe(1.7, 1.0).describe(BF16)
    assert "bf16 weights for decoding" in _probe(1.7, 0.5, 1.7).describe(HALF_WEIGHTS)
    costs = _probe(1.7, 1.0).step_costs(BF16)
    assert costs[1] == 1.0 and costs[8] == pytest.approx(1.7)


def test_the_probe_times_every_step_size_for_every_candidate(tiny_lm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate's decoder layer copies and head really run a step of every size and a prefill chunk, and
    each of those is timed: the probe's clock here advances only while a layer or the head runs, by a cost
    known for each candidate and number of tokens, so the figures it reports are exactly those costs summed."""
    import types

    layer_type = type(tiny_lm.model.model.layers[0])
    layers = tiny_lm.model.config.num_hidden_layers
    rank = {FP32: 1, BF16: 2, HALF_WEIGHTS: 3}  # distinct costs: a figure taken from another candidate shows

    def layer_cost(name: str, n: int) -> float:
        return rank[name] * (1 + n) * 1e-4

    def head_cost(name: str, n: int) -> float:
        return rank[name] * (3 + n) * 1e-6

    def candidate(module: torch.nn.Module) -> str:
        if next(module.parameters()).dtype == torch.bfloat16:
            return BF16
        return HALF_WEIGHTS if half_weights.is_converted(module) else FP32

    now = [0.0]
    ran: set[tuple[str, str, int]] = set()

    def work(module: torch.nn.Module, args: tuple) -> None:
        if type(module) is layer_type:  # a copy of the decoder layer; its hidden states come first
            name, n = candidate(module), args[0].shape[1]
            now[0] += layer_cost(name, n)
            ran.add(("layer", name, n))
        elif type(module) is torch.nn.Sequential:  # the probe's wrapper of the head copy
            name, n = candidate(module), args[0].shape[1]
            now[0] += head_cost(name, n)
            ran.add(("head", name, n))

    monkeypatch.setattr(precision, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(work)
    try:
        found = precision.probe(tiny_lm.model, runs=3)
    finally:
        handle.remove()

    for name in CANDIDATES:
        assert {("layer", name, n) for n in (*STEP_SIZES, precision.TYPICAL_PROMPT)} <= ran
        assert {("head", name, n) for n in STEP_SIZES} <= ran
        for n in STEP_SIZES:  # every layer (the copies timed, scaled to the model's layers), plus the head
            assert found.step_s[name][n] == pytest.approx(layers * layer_cost(name, n) + head_cost(name, n))
    for name in (FP32, BF16):  # a prefill chunk scores its last token only
        assert found.prefill_s[name] == pytest.approx(layers * layer_cost(name, precision.TYPICAL_PROMPT)
                                                      + head_cost(name, 1))
    # the copies prefilled slower than fp32 here: they serve decoding passes only, and prefill is fp32's
    assert found.kernel_max_tokens == half_weights.DECODE_ROWS
    assert found.prefill_s[HALF_WEIGHTS] == found.prefill_s[FP32]
    assert found.steady  # the same cost every run
    assert tiny_lm.model.dtype == torch.float32 and not half_weights.is_converted(tiny_lm.model)  # untouched


def test_bf16_copies_keep_fp32_arithmetic_and_cache() -> None:
    plain, halved = tiny_loaded_model(seed=6), tiny_loaded_model(seed=6)
    added = half_weights.convert(halved.model, kernel_max_tokens=4)
    assert added == half_weights.extra_bytes(plain.model) > 0
    assert halved.model.dtype == torch.float32  # parameters are still the fp32 ones
    ids = torch.tensor([list(range(40, 90))])
    with torch.inference_mode():
        prefill_a, prefill_b = plain.model(ids).logits, halved.model(ids).logits  # 50 rows: fp32 on both
        torch.testing.assert_close(prefill_b, prefill_a)
        step_a = plain.model(ids[:, :1]).logits
        step_b = halved.model(ids[:, :1]).logits  # one row: bf16 copies, close to fp32
    assert (step_a - step_b).abs().max() < 0.05 * step_a.abs().max()
    assert not torch.equal(step_a, step_b)  # the bf16 copy did run


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


def test_auto_may_load_fp32_with_bf16_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "probe", lambda model, runs=5: _probe(1.7, 0.5, copies_decode=1.7))
    folder = save_tiny_folder(tmp_path / "tiny")
    lm = models.load(str(folder), device="cpu")
    assert lm.dtype == torch.float32 and half_weights.is_converted(lm.model)  # the KV cache stays fp32
    assert lm.identity.endswith("|bf16-weights")  # its snapshots are not those of plain fp32
    assert "bf16 weights for decoding" in lm.precision_note
    # where the copies would not fit easily in memory, the best of the others is taken
    monkeypatch.setattr(precision, "_room_for_copies", lambda model: False)
    lm = models.load(str(folder), device="cpu")
    assert lm.dtype == torch.bfloat16 and not half_weights.is_converted(lm.model)


def test_a_step_reads_the_bf16_copies_not_the_fp32_weights() -> None:
    plain, halved = tiny_loaded_model(seed=8), tiny_loaded_model(seed=8)
    half_weights.convert(halved.model, kernel_max_tokens=half_weights.DECODE_ROWS)
    linear = sum(m.weight.numel() for m in plain.model.modules() if type(m) is torch.nn.Linear)
    assert half_weights.decode_bytes(halved.model) < half_weights.decode_bytes(plain.model)
    assert half_weights.decode_bytes(halved.model) >= linear * 2  # the copies, at 2 bytes a weight


def test_the_candidates_take_turns_so_a_burst_of_other_work_slows_each_alike() -> None:
    order: list[str] = []
    fns = {name: {"step": (lambda name=name: order.append(name))} for name in CANDIDATES}
    samples = precision._interleaved_seconds(fns, runs=3)
    timed = order[len(CANDIDATES):]  # after one warm-up call each
    rounds = [timed[i:i + len(CANDIDATES)] for i in range(0, len(timed), len(CANDIDATES))]
    assert all(sorted(r) == sorted(CANDIDATES) for r in rounds)  # every round times every candidate once
    assert len({r[0] for r in rounds}) == 3  # each round starts with another one
    assert all(len(samples[name]["step"]) == 3 for name in CANDIDATES)


def test_timings_that_disagree_mark_the_probe_unsteady() -> None:
    assert precision._steady([0.010, 0.011, 0.012, 0.010, 0.030])  # one slow run is normal
    assert not precision._steady([0.010, 0.019, 0.030, 0.014, 0.050])  # most runs slowed: something else ran


def test_a_probe_from_a_busy_machine_is_taken_again_at_later_starts(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    calls = []

    def busy_probe(model, runs=5):  # noqa: ANN001, ANN202
        calls.append(model)
        return replace(_probe(1.7, 0.9), steady=False)

    monkeypatch.setattr(precision, "probe", busy_probe)
    monkeypatch.setattr(precision, "_probed_here", set())
    folder = save_tiny_folder(tmp_path / "tiny")
    lm = models.load(str(folder), device="cpu")
    assert len(calls) == 1 and "measured again at the next start" in lm.precision_note
    models.load(str(folder), device="cpu")
    assert len(calls) == 1  # not again in the same process
    for start in range(2, precision.UNSTEADY_TRIES + 2):  # later starts: a new process each
        monkeypatch.setattr(precision, "_probed_here", set())
        lm = models.load(str(folder), device="cpu")
        assert len(calls) == min(start, precision.UNSTEADY_TRIES)
    assert "measured again" not in lm.precision_note  # after the last try it is kept as it is
    # a steady probe is kept for good
    monkeypatch.setattr(precision, "probe", lambda model, runs=5: _probe(1.7, 0.9))
    precision._table_path().unlink()
    monkeypatch.setattr(precision, "_probed_here", set())
    models.load(str(folder), device="cpu")
    monkeypatch.setattr(precision, "_probed_here", set())
    monkeypatch.setattr(precision, "probe", busy_probe)
    models.load(str(folder), device="cpu")
    assert len(calls) == precision.UNSTEADY_TRIES


def test_with_little_free_ram_the_candidates_are_built_and_timed_one_at_a_time(tiny_lm, monkeypatch) -> None:
    """The three candidates' layer and head copies are held at once only where they take at most a quarter of
    the free RAM (an 8B model's would take ~9 GB); otherwise each is built, timed and freed before the next."""
    import psutil

    calls: list[list[str]] = []
    real = precision._interleaved_seconds

    def spy(fns, runs):  # noqa: ANN001, ANN202
        calls.append(list(fns))
        return real(fns, runs)

    monkeypatch.setattr(precision, "_interleaved_seconds", spy)
    precision.probe(tiny_lm.model, runs=1)
    assert calls == [list(CANDIDATES)]  # a tiny model: all at once, in turns

    class Little:
        available = 1024

    calls.clear()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    found = precision.probe(tiny_lm.model, runs=1)
    assert calls == [[name] for name in CANDIDATES]
    assert set(found.step_s) == set(CANDIDATES) and all(s > 0 for s in found.prefill_s.values())
