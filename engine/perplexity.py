"""Perplexity of a text fed through a cache strategy: how every strategy's fidelity is measured.

The text is fed in chunks through one cache, exactly as a long chat would fill it, and each
token is scored by the logits the model gave before seeing it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine import caches
from engine.caches import CacheSpec
from engine.models import LoadedModel


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int
    ppl: float
    cache_tokens: int
    cache_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def perplexity(
    lm: LoadedModel,
    text: str,
    spec: CacheSpec | None = None,
    *,
    max_tokens: int | None = None,
    chunk: int = 64,
) -> PerplexityResult:
    """Score `text` (optionally its first `max_tokens` tokens) through a fresh cache of `spec`."""
    from engine.session import ChatSession, SessionSettings

    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("The text is too short to measure: it needs at least two tokens.")
    session = ChatSession(lm, SessionSettings(cache=spec or CacheSpec()))
    nll = 0.0
    scored = 0
    previous_last: torch.Tensor | None = None
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        logits = session.forward_logits(piece, all_positions=True).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(piece, device=logprobs.device)
        if previous_last is not None:  # the previous chunk's last position predicts this chunk's first token
            nll -= float(previous_last[targets[0]])
            scored += 1
        nll -= float(logprobs[:-1].gather(1, targets[1:, None]).sum())
        scored += len(piece) - 1
        previous_last = logprobs[-1]
    return PerplexityResult(
        tokens=len(ids),
        ppl=math.exp(nll / scored),
        cache_tokens=caches.seq_length(session.cache),
        cache_bytes=caches.cache_bytes(session.cache),
    )


@torch.inference_mode()
def sliding_window_perplexity(
    lm: LoadedModel, text: str, window: int, *, max_tokens: int | None = None, batch: int = 16
) -> PerplexityResult:
    """The StreamingLLM paper's oracle: every token is predicted from its last `window` tokens,
    re-encoded from scratch (positions 0..window-1). Exact, and quadratic: use on short slices."""
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("The text is too short to measure: it needs at least two tokens.")
    device = lm.device
    nll = 0.0
    # Tokens 1..window-1 see their whole prefix: one pass over the first window scores them.
    head = torch.tensor([ids[:window]], device=device)
    logprobs = torch.log_softmax(lm.model(input_ids=head).logits[0].float(), dim=-1)
    nll -= float(logprobs[:-1].gather(1, head[0, 1:, None]).sum())
    targets = list(range(window, len(ids)))
    for start in range(0, len(targets), batch):
        idx = targets[start : start + batch]
        windows = torch.tensor([ids[i - window : i] for i in idx], device=device)
        last = lm.model(input_ids=windows, logits_to_keep=1).logits[:, -1].float()
        lp = torch.log_softmax(last, dim=-1)
        nll -= float(lp.gather(1, torch.tensor([[ids[i]] for i in idx], device=device)).sum())
    return PerplexityResult(tokens=len(ids), ppl=math.exp(nll / (len(ids) - 1)), cache_tokens=window, cache_bytes=0)
