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

    def choose(self, logits: torch.Tensor, context: torch.Tensor, banned: Sequence[int] = ()) -> int:
        """Pick the next token from the last position's logits (shape [vocab]), never one of `banned`."""
        scores = self.processors(context.view(1, -1), logits.view(1, -1).float())  # type: ignore[arg-type]
        if banned:  # out of place: the logits may be an inference-mode tensor
            scores = scores.index_fill(1, torch.tensor(list(banned), device=scores.device), float("-inf"))
        if self.settings.greedy:
            return int(scores.argmax(dim=-1).item())
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
