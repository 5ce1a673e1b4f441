"""Perplexity and memory of each cache strategy on a long text, against the full (dynamic) cache.

    .venv/bin/python scripts/measure_fidelity.py                     # 8,000 tokens of resources/texts/alice.txt
    .venv/bin/python scripts/measure_fidelity.py --max-tokens 2048 --only "quantized 4-bit"
    .venv/bin/python scripts/measure_fidelity.py --search-2bit --max-tokens 2048   # the 2-bit search
    .venv/bin/python scripts/measure_fidelity.py --weights --write resources/fidelity.json  # weight precisions

The text is fed through each cache in chunks of 64 tokens, as a long chat fills it (see
engine/perplexity.py). The bundled model is loaded once. A row whose strategy is not available
here (offloading without a GPU, a missing backend) is reported as skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import caches, models  # noqa: E402
from engine.caches import CacheSpec  # noqa: E402
from engine.perplexity import PerplexityResult, perplexity, sliding_window_perplexity  # noqa: E402
from engine.specs import quantization_defaults as default_spec  # noqa: E402

TEXT = ROOT / "resources" / "texts" / "alice.txt"
# Weight precisions (engine/models.py `weights`), each through the full cache: int8/int4 over an fp32 base.
WEIGHT_ROWS = ("fp32", "bf16", "int8", "int4")

# One row per strategy setting: add a line to measure another.
ROWS: list[tuple[str, CacheSpec]] = [
    ("dynamic", CacheSpec(strategy="dynamic")),
    ("quantized 4-bit", CacheSpec(strategy="quantized", **default_spec(4))),
    ("quantized 2-bit", CacheSpec(strategy="quantized", **default_spec(2))),
    ("quantized 4-bit HQQ", CacheSpec(strategy="quantized", backend="hqq", **default_spec(4))),
    ("quantized 2-bit HQQ", CacheSpec(strategy="quantized", backend="hqq", **default_spec(2))),
    ("static", CacheSpec(strategy="static", max_cache_len=8192)),
    ("sink 4+8100 (holds all)", CacheSpec(strategy="sink", sink_tokens=4, window=8100)),
    ("sink 4+1024", CacheSpec(strategy="sink", sink_tokens=4, window=1024)),
    ("sink-quantized 4+1024 4-bit",
     CacheSpec(strategy="sink-quantized", sink_tokens=4, window=1024, **default_spec(4))),
    ("sink 4+256", CacheSpec(strategy="sink", sink_tokens=4, window=256)),
    ("sink-quantized 4+256 4-bit", CacheSpec(strategy="sink-quantized", sink_tokens=4, window=256, **default_spec(4))),
    ("sink-quantized 4+256 4-bit HQQ",
     CacheSpec(strategy="sink-quantized", sink_tokens=4, window=256, backend="hqq", **default_spec(4))),
    ("window 260, no sinks", CacheSpec(strategy="sink", sink_tokens=0, window=260)),
]


def two_bit(axis_key: int, axis_value: int, group: int, residual: int) -> tuple[str, CacheSpec]:
    spec = CacheSpec(strategy="quantized", nbits=2, axis_key=axis_key, axis_value=axis_value,
                     q_group_size=group, residual=residual)
    return f"2-bit k{axis_key:+d} v{axis_value:+d} g{group} r{residual}", spec


def search_2bit(lm: models.LoadedModel, text: str, max_tokens: int, chunk: int) -> None:
    """The 2-bit search, in two stages to stay affordable on a CPU: first the four key/value axis
    pairs (group 64, residual 128), then group size × residual on the best pair."""
    base = measure(lm, text, [ROWS[0]], max_tokens, chunk)
    axes = [two_bit(k, v, 64, 128) for k, v in itertools.product((0, -1), (0, -1))]
    results = measure(lm, text, axes, max_tokens, chunk, base=base["dynamic"], header=False)
    best = min(axes, key=lambda row: results[row[0]].ppl)[1]
    print(f"best axes: key {best.axis_key}, value {best.axis_value}", flush=True)
    grid = itertools.product((32, 64, 128), (32, 64, 128, 256))
    rows = [two_bit(best.axis_key, best.axis_value, group, residual) for group, residual in grid]
    results.update(measure(lm, text, [row for row in rows if row[0] not in results], max_tokens, chunk,
                           base=base["dynamic"], header=False))
    label = min(results, key=lambda name: results[name].ppl)
    print(f"best: {label}", flush=True)


def write_table(path: Path, lm: models.LoadedModel, rows: list[tuple[str, CacheSpec]],
                results: dict[str, PerplexityResult], tokens: int) -> None:
    """Save the measured rows as JSON (the app shows each lossy setting's measured cost from it).

    Rows measured by an earlier run on the same model, text and length are kept (so `--only` adds
    to the table instead of replacing it); rows measured now replace theirs."""
    base = results.get(rows[0][0])
    if base is None:
        return
    kept: dict[str, dict] = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
            same = (previous.get("model"), previous.get("text"), previous.get("tokens"))
            if same == (lm.identity, TEXT.name, tokens):
                kept = {row["label"]: row for row in previous.get("rows", [])}
        except (OSError, ValueError, KeyError, TypeError):
            kept = {}
    for label, spec in rows:
        if label in results:
            kept[label] = {"label": label, "spec": spec.to_dict(), "ppl": results[label].ppl,
                           "ppl_ratio": results[label].ppl / base.ppl, "cache_bytes": results[label].cache_bytes,
                           "bytes_ratio": results[label].cache_bytes / max(base.cache_bytes, 1)}
    order = [label for label, _ in ROWS]
    table = {
        "model": lm.identity, "text": TEXT.name, "tokens": tokens,
        "rows": sorted(kept.values(),
                       key=lambda row: order.index(row["label"]) if row["label"] in order else len(order)),
    }
    if path.exists():  # the weight-precision rows (`--weights`) are kept as they are
        with_weights = _read(path).get("weights")
        if with_weights is not None:
            table["weights"] = with_weights
    _write(path, table)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, table: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)


def measure_weights(model: str, text: str, max_tokens: int, chunk: int, write: Path | None,
                    only: list[str] | None = None) -> None:
    """The perplexity of the text through the full cache with the weights in each precision of WEIGHT_ROWS, against
    fp32 (one model loaded at a time); with `write`, kept under "weights" in the table (same text and length).
    Rows the table already holds for this text and length are kept and not measured again (a long run can be
    resumed: fp32 first, then the quantized precisions, bf16 — the slowest on a CPU without bf16 arithmetic — last)."""
    line = f"{'weights':<24} {'ppl':>8} {'ppl ratio':>9} {'weights MiB':>11} {'s':>6}"
    print(line)
    print("-" * len(line))
    held = _read(write) if write is not None else {}
    same_run = (held.get("text"), held.get("tokens")) == (TEXT.name, max_tokens)
    kept = {row["weights"]: row for row in held.get("weights", []) if same_run and "weights" in row}
    rows: list[dict] = [kept[p] for p in WEIGHT_ROWS if p in kept]
    base_ppl = kept["fp32"]["ppl"] if "fp32" in kept else None
    for row in rows:
        print(f"{row['precision']:<24} {row['ppl']:8.3f} {row['ppl_ratio']:9.3f} "
              f"{row['weights_bytes'] / 2**20:11.1f}   (kept)", flush=True)
    wanted = [p for p in WEIGHT_ROWS if p not in kept and (only is None or p in only or p == "fp32")]
    for precision in sorted(wanted, key=lambda p: (p != "fp32", p == "bf16")):
        lm = models.load(model, device="cpu", dtype="float32" if precision != "bf16" else None, weights=precision)
        started = time.perf_counter()
        result = perplexity(lm, text, CacheSpec(), max_tokens=max_tokens, chunk=chunk)
        seconds = time.perf_counter() - started
        base_ppl = base_ppl or result.ppl
        rows.append({"label": precision, "weights": precision, "precision": lm.precision_label,
                     "model": lm.identity, "ppl": result.ppl, "ppl_ratio": result.ppl / base_ppl,
                     "weights_bytes": lm.weights_bytes, "tokens": result.tokens})
        rows.sort(key=lambda row: WEIGHT_ROWS.index(row["weights"]))
        print(f"{lm.precision_label:<24} {result.ppl:8.3f} {result.ppl / base_ppl:9.3f} "
              f"{lm.weights_bytes / 2**20:11.1f} {seconds:6.1f}", flush=True)
        del lm
        if write is not None:
            table = _read(write)
            same = (table.get("text"), table.get("tokens")) == (TEXT.name, max_tokens)
            table.update({"weights": rows} if same or not table else {})
            if not same and table.get("rows"):
                print(f"not written: {write} holds another text or length", file=sys.stderr)
                write = None
                continue
            table.setdefault("text", TEXT.name)
            table.setdefault("tokens", max_tokens)
            _write(write, table)


def measure(lm: models.LoadedModel, text: str, rows: list[tuple[str, CacheSpec]], max_tokens: int, chunk: int,
            base: PerplexityResult | None = None, header: bool = True,
            on_row: Callable[[dict[str, PerplexityResult]], None] | None = None) -> dict[str, PerplexityResult]:
    """Print one table line per row; the first row measured is the reference unless `base` is given."""
    reasons = caches.availability(lm.device)
    if header:
        line = f"{'cache':<30} {'ppl':>8} {'ppl ratio':>9} {'tokens':>7} {'cache MiB':>10} {'bytes ratio':>11} {'s':>6}"
        print(line)
        print("-" * len(line))
    results: dict[str, PerplexityResult] = {}
    for label, spec in rows:
        reason = reasons.get(spec.strategy)
        if reason is not None:
            print(f"{label:<30} skipped: {reason}")
            continue
        if spec.strategy == "static" and spec.max_cache_len < max_tokens:
            spec = spec.with_changes(max_cache_len=max_tokens)
        started = time.perf_counter()
        try:
            result = perplexity(lm, text, spec, max_tokens=max_tokens, chunk=chunk)
        except caches.CacheConfigError as exc:
            print(f"{label:<30} skipped: {exc}")
            continue
        seconds = time.perf_counter() - started
        results[label] = result
        if on_row is not None:
            on_row(results)
        if base is None:
            base = result
        print(
            f"{label:<30} {result.ppl:8.3f} {result.ppl / base.ppl:9.3f} {result.cache_tokens:7d} "
            f"{result.cache_bytes / 2**20:10.2f} {result.cache_bytes / max(base.cache_bytes, 1):11.3f} {seconds:6.1f}",
            flush=True,
        )
    return results


def oracle(lm: models.LoadedModel, text: str, tokens: int, chunk: int) -> None:
    """The StreamingLLM comparison: sink 4+256 against re-encoding the last 260 tokens for every token."""
    started = time.perf_counter()
    reference = sliding_window_perplexity(lm, text, 260, max_tokens=tokens)
    print(f"\nsliding-window oracle (260 tokens, re-encoded per token), first {tokens} tokens: "
          f"ppl {reference.ppl:.3f} ({time.perf_counter() - started:.0f} s)")
    for label, spec in (("sink 4+256", CacheSpec(strategy="sink", sink_tokens=4, window=256)),
                        ("window 260, no sinks", CacheSpec(strategy="sink", sink_tokens=0, window=260)),
                        ("dynamic", CacheSpec())):
        r = perplexity(lm, text, spec, max_tokens=tokens, chunk=chunk)
        print(f"{label:<30} ppl {r.ppl:8.3f}  ratio to the oracle {r.ppl / reference.ppl:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=8000)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--search-2bit", action="store_true", help="measure the 2-bit grid instead of the table")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="measure only these rows (and dynamic)")
    parser.add_argument("--weights", action="store_true",
                        help=f"measure the weight precisions ({', '.join(WEIGHT_ROWS)}) instead of the cache table")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is much faster on a busy machine")
    parser.add_argument("--model", default="default")
    parser.add_argument("--write", type=Path, help="also save the table as JSON (e.g. resources/fidelity.json)")
    parser.add_argument("--oracle-tokens", type=int, default=1000,
                        help="also compare sink 4+256 with the sliding-window oracle on this many tokens (0: skip)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    text = TEXT.read_text(encoding="utf-8")
    if args.weights:
        print(f"model {args.model}, {args.max_tokens} tokens of {TEXT.name}, chunks of {args.chunk}, full cache")
        measure_weights(args.model, text, args.max_tokens, args.chunk, args.write, args.only)
        return 0
    lm = models.load(args.model, device="cpu", dtype="float32", weights=None)
    print(f"model {lm.source.display_name}, {args.max_tokens} tokens of {TEXT.name}, chunks of {args.chunk}")
    if args.search_2bit:
        search_2bit(lm, text, args.max_tokens, args.chunk)
    else:
        rows = [row for row in ROWS if args.only is None or row[0] in args.only or row is ROWS[0]]
        on_row = None
        if args.write:
            def on_row(results: dict[str, PerplexityResult]) -> None:
                write_table(args.write, lm, rows, results, args.max_tokens)
        measure(lm, text, rows, args.max_tokens, args.chunk, on_row=on_row)
    if args.oracle_tokens:
        oracle(lm, text, args.oracle_tokens, args.chunk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
