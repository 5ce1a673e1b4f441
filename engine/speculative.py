"""Speculative decoding: guess several tokens, check them with one forward pass of the model.

A decode step reads every weight once whether it scores one token or eight, so on hardware
where a step is bound by memory bandwidth (or by per-step overhead), scoring k guessed tokens
costs far less than k steps. The guesses come from `PromptLookup` (prompt lookup decoding,
Saxena 2023; vLLM's and transformers' "ngram" speculation): the last few tokens are looked up in
the conversation so far, and the tokens that followed their most recent earlier occurrence are
proposed. No extra model; it pays when a reply repeats text from the conversation (code being
edited, quoted passages, names).

`engine.sampling.Sampler.verify` decides which guesses stand. With greedy decoding a guess is
kept exactly when it is the token the model would have chosen, so the output is identical token
for token. With sampling it applies the standard acceptance rule (accept with probability
min(1, p/q), else sample the residual max(0, p - q)), so the output *distribution* is unchanged.
`engine/session.py` runs the loop: it feeds the last token and the guesses in one pass, keeps
what stands and crops the rest from the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PromptLookup:
    """Proposes continuations of the last n-gram from its most recent earlier occurrence.

    The index maps every n-gram (n in `ngram_sizes`) of the context to the positions right after
    its occurrences; it is updated as tokens are appended, so a lookup costs O(1) whatever the
    conversation's length.
    """

    def __init__(self, context: Sequence[int] = (), ngram_sizes: Sequence[int] = (3, 2), max_draft: int = 8) -> None:
        self.sizes = tuple(sorted(set(ngram_sizes), reverse=True))
        self.max_draft = max_draft
        self.tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position after its latest occurrence
        self._pending: dict[tuple[int, ...], int] = {}  # the newest n-grams: not yet matchable (no continuation)
        self.extend(context)

    def extend(self, ids: Sequence[int]) -> None:
        for token in ids:
            self.tokens.append(int(token))
            end = len(self.tokens)
            # The n-grams that ended at the previous token now have a continuation: make them findable.
            self._index.update(self._pending)
            self._pending = {}
            for n in self.sizes:
                if end >= n:
                    self._pending[tuple(self.tokens[end - n:end])] = end

    def propose(self, k: int | None = None) -> list[int]:
        """Up to `k` (default `max_draft`) tokens that followed the longest matching n-gram; [] if none."""
        limit = self.max_draft if k is None else min(k, self.max_draft)
        if limit <= 0:
            return []
        end = len(self.tokens)
        for n in self.sizes:
            if end < n:
                continue
            start = self._index.get(tuple(self.tokens[end - n:end]))
            if start is not None and start < end:
                return self.tokens[start:start + limit]
        return []


class DraftLength:
    """How many guesses the next step checks: more after a step that kept them all, fewer after a miss.

    A step's cost grows with the tokens it scores (little while a step is bound by reading the
    weights, more once the extra tokens' compute shows), so guessing far ahead pays only while the
    guesses hold.
    """

    def __init__(self, start: int = 4, least: int = 1, most: int = 8) -> None:
        self.length, self.least, self.most = start, least, most

    def next(self) -> int:
        return self.length

    def update(self, drafted: int, kept: int) -> None:
        if drafted == 0:
            return
        if kept == drafted:
            self.length = min(self.most, self.length * 2)
        else:
            self.length = max(self.least, kept + 1)


class CostAwareLength:
    """`auto`: check as many guesses as pay for themselves, from measured step costs.

    A step of n tokens costs `cost(n)` times a one-token step. If each guess holds with probability a,
    a step checking k guesses emits (1 - a^(k+1)) / (1 - a) tokens on average; the length chosen
    maximises tokens per unit of cost, and 0 means a plain step.

    * a is estimated from every proposal, also those not checked (whether a guess was right is known
      for free once the next token is chosen), with older evidence fading (`decay` per proposal): a
      chat that turns from editing code, where guesses hold, to free conversation, where they do not,
      stops paying for checks within a few tokens.
    * cost(n) starts from the precision probe's figures (engine/precision.py) and follows the passes
      actually timed in this session (`observe`), once each size has been seen a few times: the probe
      times one layer, the session the whole model at its real cache length.
    """

    def __init__(self, costs: dict[int, float], most: int = 8, prior: tuple[float, float] = (1.0, 2.0),
                 decay: float = 0.8) -> None:
        self.costs = dict(sorted(costs.items()))
        self.most = most
        self.kept, self.seen = prior  # a = 1/2 before any evidence
        self.decay = decay
        self._timed: dict[int, tuple[int, float]] = {}  # tokens -> (passes seen, moving average of seconds)

    def cost(self, tokens: int) -> float:
        """Relative cost of a step of `tokens` tokens, interpolated (and extended past the largest size) over
        the sizes timed in this session once there are two, else over the probe's."""
        table = self._observed_costs()
        if len(table) < 2:
            table = self.costs
        if tokens in table:
            return table[tokens]
        sizes = list(table)
        lo = max((n for n in sizes if n < tokens), default=sizes[0])
        hi = min((n for n in sizes if n > tokens), default=None)
        if hi is None:  # beyond the largest known size: extend the last segment
            lo, hi = sizes[-2], sizes[-1]
        slope = (table[hi] - table[lo]) / (hi - lo)
        return max(table[lo] + slope * (tokens - lo), 1e-9)

    def _observed_costs(self) -> dict[int, float]:
        one = self._timed.get(1)
        if one is None or one[0] < OBSERVED_ENOUGH:
            return {}
        return {n: mean / one[1] for n, (count, mean) in sorted(self._timed.items()) if count >= OBSERVED_ENOUGH}

    def observe(self, tokens: int, seconds: float) -> None:
        """A forward pass of `tokens` tokens took `seconds` (moving average over the last ~10 of that size)."""
        count, mean = self._timed.get(tokens, (0, seconds))
        weight = max(1.0 / (count + 1), 0.1)
        self._timed[tokens] = (count + 1, mean + weight * (seconds - mean))

    def acceptance(self) -> float:
        return self.kept / self.seen

    def next(self) -> int:
        a = min(self.acceptance(), 0.999)
        best, best_rate = 0, 1.0 / self.cost(1)
        for k in range(1, self.most + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / self.cost(k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def update(self, drafted: int, kept: int) -> None:
        """`kept` of `drafted` guesses held (the first miss ends a check, so count it and those before)."""
        seen = min(drafted, kept + 1)
        fade = self.decay ** seen
        self.kept = self.kept * fade + kept
        self.seen = self.seen * fade + seen


OBSERVED_ENOUGH = 3  # passes of a size timed before their time replaces the probe's estimate


@dataclass
class SpecStats:
    """What speculation did in one turn's decoding."""

    passes: int = 0  # forward passes of the model while decoding (plain steps and checks)
    checks: int = 0  # passes that checked guesses
    drafted: int = 0  # guesses checked
    accepted: int = 0  # guesses kept
    skipped: int = 0  # steps with guesses the cache could not take back (a sink about to evict, ...)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def record(self, drafted: int, kept: int) -> None:
        self.checks += 1
        self.drafted += drafted
        self.accepted += kept

    @property
    def tokens_per_step(self) -> float:
        """Tokens each decoding pass produced on average (1.0 without speculation)."""
        return (self.passes + self.accepted) / self.passes if self.passes else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def describe(self, mode: str, source: str | None = None) -> str | None:
        """One line for the reply's details, or None when speculation was off."""
        if mode == "off":
            return None
        text = (f"{source or 'prompt lookup'}: {self.tokens_per_step:.2f} tokens/step, {self.accepted} of "
                f"{self.drafted} guesses kept in {self.checks} checks")
        if source and self.draft_seconds:
            text += f", drafting {self.draft_seconds * 1000:.0f} ms"
        if self.skipped:
            text += f"; {self.skipped} steps without guesses (the cache could not take them back)"
        return text
