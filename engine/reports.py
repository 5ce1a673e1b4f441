"""What the engine answers with: small frozen dataclasses, torch-free, so that any front end (the
window, the terminal, a script) can hold and show them without importing the engine's heavy parts.

`ChatService` (engine/service.py) returns or reports each of these; the window's worker hands
them on unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engine.specs import CacheSpec

GIB = 1024**3
MIB = 1024**2
MAX_TOKENS = 10_000_000  # "how many tokens fit" is searched up to this; beyond, any realistic chat fits

# TurnStats.error_kind / TurnDone.error_kind: what kind of failure a turn met, classified by the engine.
OUT_OF_MEMORY = "out_of_memory"
CONTEXT_OVERFLOW = "context_overflow"
INVALID_SETTINGS = "invalid_settings"
OTHER_ERROR = "error"


@dataclass(frozen=True)
class TurnStats:
    """What one turn cost. `reused_tokens + prefilled_tokens == prompt_tokens`."""

    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    ttft_ms: float
    decode_tok_s: float
    cache_tokens: int
    cache_bytes: int  # what the cache holds
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    error_kind: str | None = None  # OUT_OF_MEMORY, ... when finish_reason is "error"
    overflow_action: str | None = None  # what the overflow policy did before this turn, if anything
    hidden_messages: int = 0  # messages left out of what the model read (truncate-middle)
    user_tokens: int | None = None  # the length of the user message this turn answered
    speculative: str | None = None  # what speculative decoding did (None: it was off)
    tokens_per_step: float | None = None  # tokens each decoding pass produced (1.0 without speculation)
    draft_ms: float = 0.0  # time spent guessing
    verify_ms: float = 0.0  # time spent in passes that checked guesses
    cache_reserved_bytes: int | None = None  # allocated for the cache (capacity of a cache that grows in place)
    cache_fallback: str | None = None  # why the cache was recomputed further back than the prompt matched it
    graph_steps: int = 0  # one-token steps replayed from a captured graph (on a CPU with graphs on: run uncaptured)
    graph_captures: int = 0  # graphs captured during the turn (a new bucket, a cache back on the device)
    graph_fallback: str | None = None  # why one-token steps ran eagerly though graph-captured decoding was asked for

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Budgets:
    """How much the caches of all chats may hold, in bytes.

    device: on the compute device (RAM on a CPU-only machine); 0 = what the memory advisor
        finds free once the model is loaded. host: idle caches in RAM; None = automatic
        (see `engine.service.resolve_budgets`). disk: snapshots; 0 = no snapshots (no resume
        after a restart).
    """

    device: int = 0
    host: int | None = None
    disk: int = 4 * GIB


@dataclass(frozen=True)
class CacheRestored:
    """Where a chat's cache came from when it was made active, and how long that took.

    source: "device" (it was there already), "ram", "disk" (a snapshot), "recomputed" (from the
    messages), "shared" (a copy of the prefix its prompt shares with another chat's cache: `tokens`
    of them) or "empty" (nothing to restore).
    """

    chat_id: int
    source: str
    seconds: float
    tokens: int
    on_gpu: bool = False

    @property
    def worth_telling(self) -> bool:
        return self.source in ("ram", "disk", "recomputed", "shared")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seconds": self.seconds, "tokens": self.tokens, "on_gpu": self.on_gpu}

    @classmethod
    def from_dict(cls, chat_id: int, data: dict[str, Any]) -> CacheRestored:
        """As stored with a reply's figures (see `to_dict`)."""
        return cls(chat_id, str(data.get("source", "empty")), float(data.get("seconds", 0.0)),
                   int(data.get("tokens", 0)), bool(data.get("on_gpu", False)))


@dataclass(frozen=True)
class CacheState:
    """Where a chat's KV cache is and how big. where: "gpu" | "ram" | "disk" | "none". A model split between GPU
    and CPU keeps a ready ("gpu") cache's layers where they run: `gpu_bytes` of its `bytes` on the GPU."""

    chat_id: int
    where: str
    tokens: int
    bytes: int
    strategy: str
    gpu_bytes: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model, as a front end shows it, and what the caches can do with it here."""

    name: str
    device: str  # "cpu", "cuda:0", ...
    dtype: str
    context_length: int
    weights_bytes: int
    load_seconds: float
    availability: dict[str, str | None]  # strategy -> None when usable, else the reason
    backend_availability: dict[str, str | None]
    auto_cache: CacheSpec  # what "auto" means on this machine (the advisor's choice, or dynamic)
    auto_reason: str
    config: Any = field(repr=False, compare=False)  # the model config, read-only, for memory estimates
    torch_dtype: Any = field(repr=False, compare=False)
    precision_note: str = ""  # why this dtype (auto on a CPU: measured fastest here)
    weights: str = ""  # the weights' precision: fp32 | bf16 | fp16 | int8 | int4 (int8/int4 over `dtype`'s base)
    weights_note: str = ""  # why: the advisor's plan, or "chosen"
    gpu_layers: int | None = None  # decoder layers on the GPU when split between GPU and CPU (None: not split)
    layers: int = 0  # decoder layers in all
    split: str = ""  # the split in words ("20 of 30 layers on cuda:0, 10 in RAM"); "" when not split
    attention: str = ""  # the attention kernel (cachet_sdpa, flash_attention_2, ...): engine/kernels.py
    attention_note: str = ""  # why that kernel ("SDPA: flash-attn is not installed ...")
    remote: str = ""  # the server's address when a remote engine answers (app/worker.py), else ""
    gpu_device: str = ""  # split between GPU and CPU: the GPU the last layers run on ("cuda:0"); `device` is the CPU
    gpu_weights_bytes: int = 0  # split: the weights on that GPU (the rest of `weights_bytes` is in RAM)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith(("cuda", "mps"))

    @property
    def exact(self) -> bool:
        """Whether a kept cache answers token for token as recomputing the chat would: only in float32
        throughout. In bf16/fp16, or with bf16 weight copies for decoding, a token decoded one at a time and
        the same token prefilled in a batch are rounded differently, so greedy replies can part ways."""
        return self.dtype == "float32" and not self.remote

    @property
    def exactness_note(self) -> str:
        """One sentence for the settings: what this precision means for reproducible replies."""
        if self.remote:
            return ""
        if self.exact:
            return "Exact: a kept cache gives the same reply, token for token, as recomputing the chat."
        return ("Not exact: replies can differ slightly from float32's, and a kept cache's from a recompute's "
                "(they round differently). Choose float32 where every reply must be reproducible exactly.")


@dataclass(frozen=True)
class TurnDone:
    """A turn's end. finish_reason: stop | length | cancelled | error | overflow.

    `cache` is the chat's new cache settings when the engine switched them (out of memory, or an
    overflow policy that moved the chat to attention sinks): keep them with the chat.
    """

    chat_id: int
    turn_id: int
    reply: str
    finish_reason: str
    has_reply: bool = False  # a reply (possibly partial) was written
    token_ids: tuple[int, ...] = ()
    stats: TurnStats | None = None
    restore: CacheRestored | None = None
    error: str | None = None
    error_kind: str | None = None
    prompt_tokens: int = 0  # with "overflow": how long the chat is
    context_length: int = 0  # with "overflow": how much the model reads
    notice: str | None = None  # something the engine did that the user should know, in one sentence
    cache: CacheSpec | None = None


@dataclass(frozen=True)
class RebuildDone:
    """A strategy switch ended. how: "converted" (the cache was converted in place) or "recompute"
    (rebuilt from the messages)."""

    chat_id: int
    ok: bool
    cache: CacheSpec
    how: str = "recompute"
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Estimate:
    """What a cache setting would cost for the loaded model: bytes at a reference length, and the
    longest chat that fits in the memory free (None: any length, the cache is bounded)."""

    strategy: str
    bytes_at: int | None
    tokens_fit: int | None
    error: str | None = None
