"""The benchmark's results: figures with their spread, and the JSON record's shape.

A record is one JSON object (`SCHEMA` names its version) holding where it ran, what ran, and one
list per section; every timed figure is a `Figure`: the median with min and max over the runs.
`validate()` checks a record's shape (the tests use it; so can anything that reads old records).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SCHEMA = "cachet-bench/1"
SECTIONS = ("ttft", "decode", "memory", "fidelity", "chat")


@dataclass(frozen=True)
class Figure:
    """A measured quantity over repeated runs: median, min, max and the runs themselves."""

    median: float
    min: float
    max: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, runs: Iterable[float]) -> Figure:
        values = tuple(float(r) for r in runs if r is not None and math.isfinite(r))
        if not values:
            raise ValueError("a figure needs at least one finite run")
        return cls(statistics.median(values), min(values), max(values), values)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": list(self.runs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        return cls(float(data["median"]), float(data["min"]), float(data["max"]), tuple(data["runs"]))


def figure_or_none(runs: Iterable[float | None]) -> dict[str, Any] | None:
    values = [r for r in runs if r is not None and math.isfinite(r)]
    return Figure.of(values).to_dict() if values else None


_REQUIRED_ROW_KEYS = {
    "ttft": {"system", "label", "strategy", "mode", "history", "history_tokens", "ms"},
    "decode": {"system", "label", "strategy", "history", "phase", "tok_s"},
    "memory": {"strategy", "tokens", "measured_bytes", "estimated_bytes"},
    "fidelity": {"strategy", "label", "ppl", "ppl_ratio", "ppl_source", "agreement", "agreement_tokens"},
    "chat": {"system", "label", "turn", "prompt", "ttft_ms", "decode_tok_s", "generated_tokens"},
}


def _is_figure(value: Any) -> bool:
    return (isinstance(value, dict) and {"median", "min", "max", "runs"} <= value.keys()
            and value["min"] <= value["median"] <= value["max"] and len(value["runs"]) >= 1)


def validate(record: dict[str, Any]) -> list[str]:
    """Problems with a record's shape (an empty list when it is well-formed)."""
    problems: list[str] = []
    if record.get("schema") != SCHEMA:
        problems.append(f"schema is {record.get('schema')!r}, not {SCHEMA!r}")
    for key in ("created", "command", "machine", "packages", "model", "settings", "results", "summary"):
        if key not in record:
            problems.append(f"missing {key!r}")
    machine = record.get("machine", {})
    for key in ("cpu", "cores_logical", "ram_bytes", "device"):
        if key not in machine:
            problems.append(f"machine lacks {key!r}")
    results = record.get("results", {})
    for section, keys in _REQUIRED_ROW_KEYS.items():
        for i, row in enumerate(results.get(section, [])):
            missing = keys - row.keys()
            if missing:
                problems.append(f"{section}[{i}] lacks {sorted(missing)}")
            for name in ("ms", "tok_s", "ttft_ms", "decode_tok_s"):
                if name in row and row[name] is not None and not _is_figure(row[name]):
                    problems.append(f"{section}[{i}].{name} is not a figure")
    return problems
