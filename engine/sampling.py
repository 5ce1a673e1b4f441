"""Sampling settings and the next-token choice, built on transformers' own logits processors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.specs import SamplingError, SamplingSettings  # noqa: F401  (re-exported)


class Sampler:
    """Chooses tokens for one turn. `context` holds the ids the repetition penalty looks at."""

    def __init__(self, settings: SamplingSettings, device: torch.device) -> None:
        self.settings = settings.validate()
        self.processors = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if not settings.greedy:
            if settings.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                self.processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(settings.top_p))
        self.generator: torch.Generator | None = None
        if not settings.greedy:
            self.generator = torch.Generator(device="cpu")
            if settings.seed is not None:
                self.generator.manual_seed(settings.seed)
            else:
                self.generator.seed()

    def _scores(self, logits: torch.Tensor, context: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
        scores = self.processors(context.view(1, -1), logits.view(1, -1).float())  # type: ignore[arg-type]
        if banned:  # out of place: the logits may be an inference-mode tensor
            scores = scores.index_fill(1, torch.tensor(list(banned), device=scores.device), float("-inf"))
        return scores

    def choose(self, logits: torch.Tensor, context: torch.Tensor, banned: Sequence[int] = ()) -> int:
        """Pick the next token from the last position's logits (shape [vocab]), never one of `banned`."""
        scores = self._scores(logits, context, banned)
        if self.settings.greedy:
            return int(scores.argmax(dim=-1).item())
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def verify(self, logits: torch.Tensor, context: torch.Tensor, guess: int,
               banned: Sequence[int] = ()) -> tuple[int, bool]:
        """Check a speculative guess at one position: (the token to emit, whether it is the guess).

        Greedy: the guess stands exactly when it is the token `choose` would pick, so the output is
        the same token for token. Sampling: the guess (proposed deterministically, as prompt lookup
        does) is kept with probability p(guess), else a token is drawn from p without the guess —
        speculative sampling's rule, which leaves the distribution of the emitted token equal to p.
        """
        if self.settings.greedy:
            token = self.choose(logits, context, banned)
            return token, token == guess
        probs = torch.softmax(self._scores(logits, context, banned), dim=-1)[0].cpu()
        if float(torch.rand((), generator=self.generator)) < float(probs[guess]):
            return guess, True
        residual = probs.clone()
        residual[guess] = 0.0
        total = float(residual.sum())
        if total <= 0.0:  # p was a point mass on the guess (float rounding): the guess stands
            return guess, True
        return int(torch.multinomial(residual / total, 1, generator=self.generator).item()), False
