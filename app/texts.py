"""How sizes and token counts read in the window."""

from __future__ import annotations

from engine.reports import MAX_TOKENS as SEARCH_CAP  # beyond this a cache is "as long as you like"


def human_tokens(n: int | None) -> str:
    if n is None:
        return "any length"
    if n >= SEARCH_CAP:
        return f"≥ {SEARCH_CAP // 1_000_000}M tokens"
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M tokens"
    if n >= 10_000:
        return f"{n / 1000:.0f}k tokens"
    return f"{n:,} tokens"


def human_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:,.1f} {unit}"
