"""The benchmark's plots (matplotlib, no screen needed): one PNG per section, from a record."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

MIB = 2**20

# One colour per strategy / system, the same in every plot.
COLOURS = {
    "dynamic": "#1f77b4", "sink": "#2ca02c", "quantized": "#d62728", "sink-quantized": "#9467bd",
    "static": "#8c564b", "offloaded": "#e377c2", "transformers": "#000000", "llama.cpp": "#ff7f0e",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = {"dynamic": "o", "sink": "s", "quantized": "^", "sink-quantized": "v", "static": "D", "offloaded": "P"}


def _tokens_label(x: float, _pos: Any = None) -> str:
    """256, 512, 1k, 2k … for powers of two; plain numbers otherwise."""
    if x >= 1024 and int(x) % 1024 == 0:
        return f"{int(x) // 1024}k"
    return f"{x:,.0f}"


def _token_axis(ax: Any, values: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens_label))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plain_log_y(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:,.0f}" if y >= 1 else f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _pos: f"{y:,.0f}" if str(y)[0] in "25" else ""))


def _colour(row: dict[str, Any]) -> str:
    key = row["strategy"] if row.get("system") == "cachet" else row.get("system", row.get("strategy", ""))
    return COLOURS.get(str(key), "#7f7f7f")


def _subtitle(record: dict[str, Any]) -> str:
    m, model = record["machine"], record["model"]
    where = m["gpu"]["name"] if m.get("gpu") else f"{m['cpu']}, {m['torch_threads']} threads"
    return f"{model['name']}, {model.get('precision', model['dtype'])} — {where}"


def _finish(fig: Any, ax: Any, path: Path, title: str, record: dict[str, Any]) -> None:
    ax.set_title(f"{title}\n{_subtitle(record)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_ttft(record: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in record["results"]["ttft"]:
        series[(row["label"], row["mode"])].append(row)
    for (label, mode), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["history_tokens"])
        xs = [r["history_tokens"] for r in rows]
        ys = [r["ms"]["median"] for r in rows]
        lo = [r["ms"]["median"] - r["ms"]["min"] for r in rows]
        hi = [r["ms"]["max"] - r["ms"]["median"] for r in rows]
        style = "-" if mode == "kept" else "--"
        marker = MARKERS.get(rows[0]["strategy"], "o")
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style + marker, ms=4, capsize=2, color=_colour(rows[0]),
                    label=label, alpha=0.9 if mode == "kept" else 0.7)
    _token_axis(ax, [r["history_tokens"] for r in record["results"]["ttft"]])
    _plain_log_y(ax)
    ax.set_xlabel("conversation history before the new message (tokens, log scale)")
    ax.set_ylabel("time to first token of the reply (ms, log scale)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    _finish(fig, ax, path, "Follow-up message: time to first token vs history length "
                           "(solid: cache kept; dashed: recomputed every turn)", record)
    return path


def plot_decode(record: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = record["results"]["decode"]
    groups = sorted({(r["history"], r["phase"]) for r in rows}, key=lambda g: (g[0], g[1] != "start"))
    late_at = {r["history"]: r.get("at_token", 256) for r in rows if r["phase"] != "start"}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8.5, 1.2 * len(groups) * max(len(labels), 1) / 3), 5.2))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        by_group = {(r["history"], r["phase"]): r for r in rows if r["label"] == label}
        xs: list[float] = []
        ys: list[float] = []
        errs: list[list[float]] = [[], []]
        colour = "#7f7f7f"
        for g_index, g in enumerate(groups):
            r = by_group.get(g)
            if r is None or r["tok_s"] is None:
                continue
            colour = _colour(r)
            xs.append(g_index + (i - (len(labels) - 1) / 2) * width)
            ys.append(r["tok_s"]["median"])
            errs[0].append(r["tok_s"]["median"] - r["tok_s"]["min"])
            errs[1].append(r["tok_s"]["max"] - r["tok_s"]["median"])
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=2, color=colour, label=label,
                      hatch="//" if label.startswith(("llama", "transformers")) else None, alpha=0.85)
        ax.bar_label(bars, fmt="%.0f", fontsize=6.5, padding=1)
    limit = record.get("bandwidth", {}).get("decode_limit_tok_s")
    if limit:
        ax.axhline(limit, color="#444444", ls=":", lw=1.2)
        ax.text(len(groups) - 0.5, limit, f"memory-bandwidth limit {limit:,.0f} tok/s", ha="right", va="bottom",
                fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{_tokens_label(h)}-token history\n"
                        f"{'start of the reply' if p == 'start' else f'after {late_at.get(h, 256)} tokens'}"
                        for h, p in groups], fontsize=8)
    ax.set_ylabel("decode speed (tokens/s, median of runs; bars: min–max)")
    ax.legend(fontsize=7.5, ncol=2)
    _finish(fig, ax, path, "Decode speed per strategy and peer", record)
    return path


def plot_memory(record: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    by_strategy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in record["results"]["memory"]:
        by_strategy[row["label"]].append(row)
    for label, rows in by_strategy.items():
        rows.sort(key=lambda r: r["tokens"])
        colour = COLOURS.get(rows[0]["strategy"], "#7f7f7f")
        xs = [r["tokens"] for r in rows]
        ax.plot(xs, [r["estimated_bytes"] / MIB for r in rows], "--", color=colour, alpha=0.6)
        ax.plot(xs, [r["measured_bytes"] / MIB for r in rows], MARKERS.get(rows[0]["strategy"], "o"), color=colour,
                label=label, ms=6, mfc="none", mew=1.5)
    ax.plot([], [], "k--", alpha=0.6, label="advisor's estimate (dashed)")
    _token_axis(ax, [r["tokens"] for r in record["results"]["memory"]])
    _plain_log_y(ax)
    ax.set_xlabel("conversation length (tokens, log scale)")
    ax.set_ylabel("KV cache (MiB, log scale): markers measured, dashed estimated")
    ax.legend(fontsize=7.5)
    _finish(fig, ax, path, "KV cache memory per strategy vs conversation length", record)
    return path


def plot_fidelity(record: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = record["results"]["fidelity"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.6))
    labels = [r["label"] for r in rows]
    colours = [COLOURS.get(r["strategy"], "#7f7f7f") for r in rows]
    ratios = [(r["ppl_ratio"] - 1.0) * 100 if r["ppl_ratio"] is not None else 0.0 for r in rows]
    bars = ax1.bar(labels, ratios, color=colours)
    ax1.bar_label(bars, fmt="%+.1f%%", fontsize=7)
    ax1.set_ylabel("perplexity vs the full cache (%)")
    tokens = next((r["ppl_tokens"] for r in rows if r.get("ppl_tokens")), 0)
    ax1.set_title(f"Perplexity cost ({tokens:,} tokens of text)", fontsize=9)
    agree = [100 * r["agreement"] if r["agreement"] is not None else 0.0 for r in rows]
    bars = ax2.bar(labels, agree, color=colours)
    ax2.bar_label(bars, fmt="%.1f%%", fontsize=7)
    ax2.set_ylim(min(agree + [100]) - 5 if agree else 0, 100.5)
    ax2.set_ylabel("greedy tokens equal to the full cache's (%)")
    n = next((r["agreement_tokens"] for r in rows if r.get("agreement_tokens")), 0)
    ax2.set_title(f"Agreement with the full cache ({n:,} tokens)", fontsize=9)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=30, labelsize=7.5)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Fidelity per strategy\n{_subtitle(record)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_chat(record: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = record["results"]["chat"]
    turns = sorted({r["turn"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        by_turn = {r["turn"]: r for r in rows if r["label"] == label}
        colour = _colour(next(iter(by_turn.values())))
        xs = [t + (i - (len(labels) - 1) / 2) * width for t in turns if t in by_turn]
        speed = [by_turn[t]["decode_tok_s"]["median"] if by_turn[t]["decode_tok_s"] else 0 for t in turns
                 if t in by_turn]
        ttft = [by_turn[t]["ttft_ms"]["median"] for t in turns if t in by_turn]
        b1 = ax1.bar(xs, speed, width, color=colour, label=label, alpha=0.85)
        ax1.bar_label(b1, fmt="%.0f", fontsize=6.5)
        b2 = ax2.bar(xs, ttft, width, color=colour, label=label, alpha=0.85)
        ax2.bar_label(b2, fmt="%.0f", fontsize=6.5)
    ax1.set_ylabel("decode (tokens/s)")
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_xticks(turns)
    prompts = {r["turn"]: r["prompt"] for r in rows}
    ax2.set_xticklabels([f"{t}: {prompts[t][:28]}…" for t in turns], fontsize=7, rotation=15, ha="right")
    ax1.legend(fontsize=7.5)
    for ax in (ax1, ax2):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Scripted chat, per turn (greedy)\n{_subtitle(record)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = {"ttft": plot_ttft, "decode": plot_decode, "memory": plot_memory, "fidelity": plot_fidelity,
         "chat": plot_chat}


def plot_all(record: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per section that has results."""
    out = []
    for section, plot in PLOTS.items():
        if record["results"].get(section):
            out.append(plot(record, folder / f"{section}.png"))
    return out
