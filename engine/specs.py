"""The settings a chat's turns are made with — cache strategy, sampling, overflow policy — as typed,
validated values, and the facts about the strategies that every layer needs to agree on.

This module imports neither torch nor Qt: the app reads and edits these settings before (and
without) the engine being loaded, and the store persists them as the JSON these classes give.
Everything that answers "which strategies are there, which are lossy, which settings does each
one read, what are the measured quantization defaults" is answered here and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

STRATEGIES = ("dynamic", "sink", "quantized", "sink-quantized", "offloaded", "static")
AUTO = "auto"  # a chat's choice "let the memory advisor pick"; resolved before a cache is built
LOSSY = frozenset({"sink", "quantized", "sink-quantized"})  # change what the model reads of the chat
QUANTIZED = frozenset({"quantized", "sink-quantized"})  # store keys and values in fewer bits
BOUNDED = frozenset({"sink", "sink-quantized"})  # hold a bounded number of tokens however long the chat
BACKENDS = ("quanto", "hqq")
AXES = (0, -1)  # 0: groups run along a token's head vector ("per token"); -1: along tokens ("per channel")
GROUP_SIZES = (16, 32, 64, 128)
OVERFLOW_POLICIES = ("stop", "truncate-middle", "sink")
# Speculative decoding (engine/speculative.py): "auto" uses prompt lookup where the cache can take
# back rejected guesses; "off" decodes one token per step; "prompt-lookup" always tries; "draft-model"
# guesses with a small model of the same tokenizer (its own cache per conversation).
SPECULATIVE_MODES = ("auto", "off", "prompt-lookup", "draft-model")
MIN_STATIC_CACHE_LEN = 16
# The range each sampling setting must lie in (inclusive; top-p must also be above 0), for
# `SamplingSettings.validate` and for the widgets that edit them.
TEMPERATURE_RANGE = (0.0, 5.0)
TOP_P_RANGE = (0.0, 1.0)
REPETITION_PENALTY_RANGE = (0.5, 3.0)

_QUANTIZATION = ("nbits", "residual", "q_group_size", "axis_key", "axis_value", "backend")
# Which CacheSpec fields each strategy reads; it ignores the others.
STRATEGY_FIELDS: dict[str, tuple[str, ...]] = {
    "dynamic": (),
    "offloaded": (),
    "static": ("max_cache_len",),
    "sink": ("sink_tokens", "window"),
    "quantized": _QUANTIZATION,
    "sink-quantized": ("sink_tokens", "window", *_QUANTIZATION),
}

# The quantization settings chosen by measurement for each bit width (scripts/measure_fidelity.py,
# SmolLM2-135M, resources/texts/alice.txt, chunks of 64, CPU fp32).
#
# 4-bit: KIVI's axes (keys per channel, values per token), group 64, residual 128: perplexity
# +0.2% at 2,048 tokens, +0.4% at 4,000, with 19% of the full cache's bytes at 4,000 tokens.
# 2-bit: searched over axes (at group 64, residual 128: per-token keys ×4.9–6.4, per-channel
# keys and values ×2.5, per-channel keys / per-token values ×1.36), then group × residual on
# the best axes. Group 32 is clearly best (g64 ×1.27–1.40, g128 ×1.62–1.79). Residual 256 gains
# 2% (×1.12) over 128 (×1.14) but then holds more bytes than 4-bit at 2,048 tokens, which is
# never worth it; residual 128 costs +14% perplexity for 18% of the full cache at 2,048 tokens
# (16% at 4,000).
QUANTIZATION_DEFAULTS: dict[int, dict[str, int]] = {
    4: {"nbits": 4, "q_group_size": 64, "residual": 128, "axis_key": -1, "axis_value": 0},
    2: {"nbits": 2, "q_group_size": 32, "residual": 128, "axis_key": -1, "axis_value": 0},
}


class CacheConfigError(ValueError):
    """A cache setting is invalid; the message says which and why."""


class SamplingError(ValueError):
    """A sampling setting is out of range; the message says which."""


def quantization_defaults(nbits: int) -> dict[str, Any]:
    """The measured best settings (residual, group size, axes) for `nbits`-bit KV on the default model."""
    try:
        return dict(QUANTIZATION_DEFAULTS[nbits])
    except KeyError:
        raise CacheConfigError(f"quantized caches store 2 or 4 bits, not {nbits}.") from None


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class CacheSpec:
    """A conversation's cache strategy and its parameters (those the strategy does not read are ignored).

    strategy: one of STRATEGIES, or AUTO for "what the memory advisor chose" (see `resolve`).
    sink_tokens, window: sink / sink-quantized — the first `sink_tokens` tokens and the most
        recent `window` tokens are kept; the middle is evicted.
    nbits, residual, q_group_size, axis_key, axis_value, backend: quantized / sink-quantized —
        KV stored in `nbits` bits in groups of `q_group_size`, the `residual` most recent tokens
        in full precision; keys quantized along `axis_key`, values along `axis_value` (see AXES).
    max_cache_len: static — the pre-allocated length.

    Which strategy reads which field is `STRATEGY_FIELDS`.
    """

    strategy: str = "dynamic"
    sink_tokens: int = 4
    window: int = 1024
    nbits: int = 4
    residual: int = 128
    q_group_size: int = 64
    axis_key: int = -1  # per channel, as KIVI: measured far better than per token (see README)
    axis_value: int = 0
    backend: str = "quanto"
    max_cache_len: int = 4096

    def validate(self) -> CacheSpec:
        """Raise CacheConfigError naming the first setting that cannot work; return self otherwise."""
        if self.strategy != AUTO and self.strategy not in STRATEGIES:
            raise CacheConfigError(f"Unknown cache strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        for name in ("sink_tokens", "window", "nbits", "residual", "q_group_size", "axis_key", "axis_value",
                     "max_cache_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise CacheConfigError(f"{name.replace('_', ' ')} must be a whole number, not {value!r}.")
        uses = set(STRATEGY_FIELDS.get(self.strategy, ()))
        if "window" in uses:
            if self.sink_tokens < 0:
                raise CacheConfigError(f"sink tokens must be 0 or more, not {self.sink_tokens}.")
            if self.window <= self.sink_tokens:
                raise CacheConfigError(
                    f"the window ({self.window}) must be larger than the sink tokens ({self.sink_tokens})."
                )
        if "nbits" in uses:
            if self.nbits not in QUANTIZATION_DEFAULTS:
                raise CacheConfigError(f"quantized caches store 2 or 4 bits, not {self.nbits}.")
            if self.backend not in BACKENDS:
                raise CacheConfigError(f"Unknown quantization backend {self.backend!r}; choose quanto or hqq.")
            if self.residual < 0:
                raise CacheConfigError(f"the full-precision residual must be 0 or more tokens, not {self.residual}.")
            if self.q_group_size not in GROUP_SIZES:
                raise CacheConfigError(f"group size must be 16, 32, 64 or 128, not {self.q_group_size}.")
            if self.axis_key not in AXES or self.axis_value not in AXES:
                raise CacheConfigError("quantization axes must be 0 (per token) or -1 (per channel).")
        if self.strategy == "sink-quantized" and self.residual >= self.window:
            raise CacheConfigError(
                f"the full-precision residual ({self.residual}) must be smaller than the window ({self.window}): "
                "the window is stored as quantized blocks of that many tokens."
            )
        if "max_cache_len" in uses and self.max_cache_len < MIN_STATIC_CACHE_LEN:
            raise CacheConfigError(
                f"the static cache needs at least {MIN_STATIC_CACHE_LEN} tokens, not {self.max_cache_len}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        """Known fields only (a newer or older Cachet may have stored others)."""
        return cls(**_known(cls, data))

    def with_changes(self, **changes: Any) -> CacheSpec:
        return replace(self, **changes).validate()

    def resolve(self, auto: CacheSpec | None) -> CacheSpec:
        """The strategy to build: AUTO becomes `auto` (the advisor's choice; dynamic without one)."""
        if self.strategy != AUTO:
            return self
        return auto if auto is not None and auto.strategy != AUTO else replace(self, strategy="dynamic")

    def relevant(self) -> tuple[Any, ...]:
        """The strategy and the values of the fields it reads: two specs with equal `relevant()`
        build the same cache."""
        return (self.strategy, *(getattr(self, name) for name in STRATEGY_FIELDS.get(self.strategy, ())))

    @property
    def is_lossy(self) -> bool:
        return self.strategy in LOSSY

    @property
    def is_quantized(self) -> bool:
        return self.strategy in QUANTIZED

    @property
    def bounded_length(self) -> bool:
        """True when the cache holds a bounded number of tokens whatever the chat's length."""
        return self.strategy in BOUNDED


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
        """Raise SamplingError naming the first setting out of range; return self otherwise."""
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not isinstance(getattr(self, name), int | float) or isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name.replace('_', ' ')} must be a number, not {getattr(self, name)!r}.")
        for name in ("top_k", "max_new_tokens", "min_new_tokens"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name.replace('_', ' ')} must be a whole number, not {getattr(self, name)!r}.")
        low, high = TEMPERATURE_RANGE
        if not low <= self.temperature <= high:
            raise SamplingError(f"temperature must be between {low:g} and {high:g}, not {self.temperature}.")
        low, high = TOP_P_RANGE
        if not low < self.top_p <= high:
            raise SamplingError(f"top-p must be in ({low:g}, {high:g}], not {self.top_p}.")
        if self.top_k < 0:
            raise SamplingError(f"top-k must be 0 (off) or positive, not {self.top_k}.")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise SamplingError(
                f"repetition penalty must be between {low:g} and {high:g}, not {self.repetition_penalty}.")
        if self.max_new_tokens < 1:
            raise SamplingError(f"max new tokens must be at least 1, not {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SamplingError(
                f"min new tokens must be between 0 and max new tokens ({self.max_new_tokens}), "
                f"not {self.min_new_tokens}."
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise SamplingError(f"the seed must be a whole number or none, not {self.seed!r}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingSettings:
        """Known fields only; the others keep their defaults."""
        return cls(**_known(cls, data))

    def with_changes(self, **changes: Any) -> SamplingSettings:
        return replace(self, **changes).validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_speculative(mode: str) -> str:
    if mode not in SPECULATIVE_MODES:
        raise CacheConfigError(f"Unknown speculative mode {mode!r}; choose one of {', '.join(SPECULATIVE_MODES)}.")
    return mode


def validate_overflow(policy: str) -> str:
    if policy not in OVERFLOW_POLICIES:
        raise CacheConfigError(f"Unknown overflow policy {policy!r}; choose one of {', '.join(OVERFLOW_POLICIES)}.")
    return policy
