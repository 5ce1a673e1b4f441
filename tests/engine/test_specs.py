"""The chat settings as typed values: validated with a clear message, readable without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.specs import (
    AUTO,
    STRATEGIES,
    STRATEGY_FIELDS,
    CacheConfigError,
    CacheSpec,
    SamplingError,
    SamplingSettings,
    quantization_defaults,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_settings_module_imports_without_torch() -> None:
    """The window reads and edits these settings before the engine (and torch) is loaded."""
    code = "import sys, engine.specs, engine.store; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_every_strategy_says_which_settings_it_reads() -> None:
    assert set(STRATEGY_FIELDS) == set(STRATEGIES)
    spec_fields = set(CacheSpec.__dataclass_fields__) - {"strategy"}
    assert set().union(*STRATEGY_FIELDS.values()) == spec_fields  # every setting is read by some strategy
    base = CacheSpec("sink", sink_tokens=4, window=256)
    assert base.relevant() == base.with_changes(nbits=2, max_cache_len=64).relevant()  # ignored fields
    assert base.relevant() != base.with_changes(window=512).relevant()


@pytest.mark.parametrize("spec, message", [
    (CacheSpec("lru"), "Unknown cache strategy"),
    (CacheSpec("sink", window=4, sink_tokens=8), "larger than the sink"),
    (CacheSpec("quantized", nbits=3), "2 or 4 bits"),
    (CacheSpec("quantized", q_group_size=48), "group size"),
    (CacheSpec("quantized", backend="bnb"), "quanto or hqq"),
    (CacheSpec("static", max_cache_len=8), "at least 16"),
    (CacheSpec("sink", window="big"), "whole number"),  # type: ignore[arg-type]  # e.g. a hand-edited file
])
def test_invalid_cache_settings_name_the_setting(spec: CacheSpec, message: str) -> None:
    with pytest.raises(CacheConfigError, match=message):
        spec.validate()


def test_settings_a_strategy_does_not_read_are_not_checked() -> None:
    CacheSpec("dynamic", nbits=3, window=1).validate()  # leftovers of another strategy do no harm


def test_auto_resolves_to_the_advisors_choice() -> None:
    chosen = CacheSpec("quantized", **quantization_defaults(4))
    assert CacheSpec(AUTO).validate().resolve(chosen) == chosen
    assert CacheSpec(AUTO).resolve(None).strategy == "dynamic"  # no advice: the full cache
    assert CacheSpec("sink").resolve(chosen) == CacheSpec("sink")  # a strategy chosen by hand stays


def test_unknown_stored_fields_are_ignored() -> None:
    assert CacheSpec.from_dict({"strategy": "sink", "window": 64, "from_the_future": 1}) == CacheSpec("sink", window=64)
    assert SamplingSettings.from_dict({"temperature": 0.0, "min_p": 0.1}) == SamplingSettings(temperature=0.0)


@pytest.mark.parametrize("changes, message", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top-p"), ({"top_k": -1}, "top-k"),
    ({"max_new_tokens": 0}, "max new tokens"), ({"seed": "x"}, "seed"), ({"top_k": 1.5}, "whole number"),
])
def test_invalid_sampling_names_the_setting(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SamplingError, match=message):
        SamplingSettings().with_changes(**changes)


def test_quantization_defaults_are_the_measured_ones() -> None:
    assert quantization_defaults(4) == {"nbits": 4, "q_group_size": 64, "residual": 128, "axis_key": -1,
                                        "axis_value": 0}
    assert quantization_defaults(2)["q_group_size"] == 32
    with pytest.raises(CacheConfigError, match="2 or 4 bits"):
        quantization_defaults(3)
