"""Sampling settings and the next-token choice, built on transformers' own logits processors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class SamplingError(ValueError):
    """A sampling setting is out of range; the message says which."""


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen. Temperature 0 means greedy (always the most likely token)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512
    seed: int | None = None
    # End-of-turn tokens are not chosen before this many tokens (vLLM's `min_tokens`); the benchmark
    # uses it to decode a fixed number of tokens whatever the model would say.
    min_new_tokens: int = 0

    def validate(self) -> SamplingSettings:
        if not 0.0 <= self.temperature <= 5.0:
            raise SamplingError(f"temperature must be between 0 and 5, not {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top-p must be in (0, 1], not {self.top_p}.")
        if self.top_k < 0:
            raise SamplingError(f"top-k must be 0 (off) or positive, not {self.top_k}.")
        if not 0.5 <= self.repetition_penalty <= 3.0:
            raise SamplingError(f"repetition penalty must be between 0.5 and 3, not {self.repetition_penalty}.")
        if self.max_new_tokens < 1:
            raise SamplingError(f"max new tokens must be at least 1, not {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SamplingError(
                f"min new tokens must be between 0 and max new tokens ({self.max_new_tokens}), "
                f"not {self.min_new_tokens}."
            )
        return self

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
