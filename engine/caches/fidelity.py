"""What a lossy cache setting costs in accuracy, as measured by scripts/measure_fidelity.py.

The script writes resources/fidelity.json (shipped with the app): the perplexity of
a long text through each setting on the bundled model, against the full cache. The settings panel
shows that cost next to a lossy strategy and warns when it exceeds 10%; settings that were not
measured say so rather than guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from engine.resources import resource_location
from engine.specs import CacheSpec

# The table shipped with Cachet (package data); a missing one reads as "not measured" everywhere.
TABLE = resource_location("fidelity.json")
WARN_ABOVE = 0.10  # warn when a setting raises perplexity by more than this


@dataclass(frozen=True)
class MeasuredCost:
    ppl_ratio: float  # perplexity with this setting / with the full cache
    tokens: int  # length of the text it was measured on
    model: str  # identity of the model it was measured with

    @property
    def increase(self) -> float:
        return self.ppl_ratio - 1.0

    @property
    def warn(self) -> bool:
        return self.increase > WARN_ABOVE

    def describe(self) -> str:
        sign = "+" if self.increase >= 0 else "−"
        return f"{sign}{abs(self.increase):.1%} perplexity (measured over {self.tokens:,} tokens of text)"


@cache
def _load(path: Path) -> dict[tuple[Any, ...], MeasuredCost]:
    try:
        table = json.loads(path.read_text())
        return {
            CacheSpec.from_dict(row["spec"]).relevant(): MeasuredCost(float(row["ppl_ratio"]), int(table["tokens"]),
                                                                  str(table["model"]))
            for row in table["rows"]
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def measured_cost(spec: CacheSpec, path: Path | None = None) -> MeasuredCost | None:
    """The measured cost of exactly these settings, or None when they were not measured."""
    if not spec.is_lossy:
        return MeasuredCost(1.0, 0, "")  # lossless: the same logits as the full cache
    return _load(path or TABLE).get(spec.relevant())
