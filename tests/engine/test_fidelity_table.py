"""The measured-cost table the settings panel reads: lookups by the settings that matter."""

from __future__ import annotations

import json

from engine.caches import CacheSpec
from engine.caches.fidelity import measured_cost


def write(tmp_path, rows):
    path = tmp_path / "fidelity.json"
    path.write_text(json.dumps({"model": "m", "tokens": 8000, "rows": rows}))
    return path


def test_lookup_matches_the_relevant_settings_only(tmp_path) -> None:
    q2 = CacheSpec("quantized", nbits=2, q_group_size=32, residual=128)
    path = write(tmp_path, [{"spec": q2.to_dict(), "ppl_ratio": 1.16}])
    cost = measured_cost(q2.with_changes(window=99, max_cache_len=123), path)  # irrelevant fields differ
    assert cost is not None and cost.warn and "+16.0%" in cost.describe()
    assert measured_cost(q2.with_changes(residual=64), path) is None  # not measured: no guess


def test_lossless_strategies_cost_nothing(tmp_path) -> None:
    path = write(tmp_path, [])
    for strategy in ("dynamic", "static", "offloaded"):
        cost = measured_cost(CacheSpec(strategy), path)
        assert cost is not None and cost.ppl_ratio == 1.0 and not cost.warn


def test_a_damaged_table_means_nothing_measured(tmp_path) -> None:
    path = tmp_path / "fidelity.json"
    path.write_text("{oops")
    assert measured_cost(CacheSpec("sink"), path) is None
