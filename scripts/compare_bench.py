"""Two bench records side by side: follow-up TTFT and decode speed, before and after a change.

    .venv/bin/python scripts/compare_bench.py BEFORE/bench.json AFTER/bench.json [--markdown]

Prints, for every (system, strategy, mode, history) both records measured, the medians and their ratio
(after / before for speeds, before / after for times, so > 1 is better), then the chat section's
decode speed per turn and overall. Figures are taken from the records as they are; each record says
how it was measured (machine, command, precision, runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _median(figure: dict[str, Any] | None) -> float | None:
    return None if not figure else float(figure["median"])


def _rows(record: dict[str, Any], section: str, key: str, value: str, extra: tuple[str, ...] = ()) -> dict:
    out = {}
    for row in record["results"].get(section, []):
        ident = (row.get("label", row.get("system")), row.get("mode", row.get("phase")), row["history"],
                 *(row.get(e) for e in extra))
        out[ident] = (row.get("history_tokens"), _median(row.get(value)))
    return out


def _chat(record: dict[str, Any]) -> dict[str, dict[int, float]]:
    per: dict[str, dict[int, float]] = {}
    for row in record["results"].get("chat", []):
        speed = _median(row.get("decode_tok_s"))
        if speed is not None:
            per.setdefault(row["label"], {})[int(row["turn"])] = speed
    return per


def _fmt(x: float | None, unit: str = "") -> str:
    return "—" if x is None else f"{x:,.1f}{unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = p.parse_args()
    before, after = (json.loads(f.read_text(encoding="utf-8")) for f in (args.before, args.after))
    bar = "|" if args.markdown else " "
    for label, record in (("before", before), ("after", after)):
        m = record["model"]
        print(f"{label}: {record['created']}  {m['name']} {m.get('precision', m['dtype'])} on {m['device']}, "
              f"{record['settings']['threads']} threads; {record['command']}")
    for section, value, unit, better in (("ttft", "ms", " ms", "before/after"), ("decode", "tok_s", " tok/s",
                                                                                    "after/before")):
        b, a = _rows(before, section, "", value), _rows(after, section, "", value)
        print(f"\n{section} ({better}, > 1 is better)")
        if args.markdown:
            print("| system | mode | history | before | after | ratio |\n|---|---|---|---|---|---|")
        for ident in sorted(set(b) & set(a), key=lambda k: (str(k[0]), str(k[1]), k[2])):
            (tokens, x), (_, y) = b[ident], a[ident]
            ratio = None if not x or not y else (x / y if section == "ttft" else y / x)
            cells = [str(ident[0]), str(ident[1]), f"{tokens:,}", _fmt(x, unit), _fmt(y, unit),
                     "—" if ratio is None else f"{ratio:.2f}×"]
            print(f"{bar} " + f" {bar} ".join(cells) + f" {bar}" if args.markdown else "  ".join(cells))
    print("\nchat decode, tokens/s per turn (median over runs)")
    for label, record in (("before", before), ("after", after)):
        for system, turns in sorted(_chat(record).items()):
            overall = statistics.fmean(turns.values()) if turns else None
            print(f"  {label:<6} {system:<34} " + " ".join(f"{turns[t]:5.1f}" for t in sorted(turns))
                  + f"   mean {_fmt(overall)}")


if __name__ == "__main__":
    main()
