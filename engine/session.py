"""One conversation: its messages, its KV cache, and the exact token ids that cache holds.

Every turn renders the whole conversation with the model's chat template, finds the longest
common prefix between those ids and the ids already in the cache, crops the cache to it and
feeds only the rest. Reuse is therefore checked token by token, never assumed: an edited
earlier message, a regenerated reply or a template that re-tokenises a reply differently
all fall back to exactly the part that still matches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import caches
from engine.caches import CacheSpec
from engine.caches.base import KVCache, cache_kwargs
from engine.graphs import CaptureError, DecodeRunner, graphs_wanted, unsupported_reason, validate_graphs
from engine.models import LoadedModel
from engine.reports import CONTEXT_OVERFLOW, INVALID_SETTINGS, OTHER_ERROR, OUT_OF_MEMORY, TurnStats
from engine.sampling import Sampler
from engine.specs import (  # noqa: F401  (re-exported)
    OVERFLOW_POLICIES,
    SPECULATIVE_MODES,
    SamplingSettings,
    validate_overflow,
    validate_speculative,
)
from engine.speculative import CostAwareLength, DraftLength, PromptLookup, SpecStats
from engine.streaming import IncrementalDecoder

DeltaFn = Callable[[str], None]
TokenFn = Callable[[int], None]

PREFILL_CHUNK = 512  # tokens per forward pass when prefilling; bounds activation memory


class ContextOverflowError(RuntimeError):
    """The conversation no longer fits the model's context; nothing was generated."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"The conversation ({prompt_tokens} tokens) plus room for a reply no longer fits the "
            f"{context_length} tokens this chat can hold. Choose an overflow policy (truncate the middle, "
            "or continue with attention sinks), start a new chat, or delete earlier messages."
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class _Cancelled(Exception):
    """cancel() arrived while the prompt was being prefilled."""


def error_kind(exc: BaseException) -> str:
    """What kind of failure `exc` is, for a front end to act on without reading its text."""
    if isinstance(exc, torch.OutOfMemoryError):
        return OUT_OF_MEMORY
    message = str(exc).lower()
    if isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message):
        return OUT_OF_MEMORY  # the CPU and MPS allocators raise plain RuntimeErrors
    if isinstance(exc, ContextOverflowError):
        return CONTEXT_OVERFLOW
    from engine.specs import CacheConfigError, SamplingError

    if isinstance(exc, CacheConfigError | SamplingError):
        return INVALID_SETTINGS
    return OTHER_ERROR


@dataclass
class Message:
    role: str  # "system" is not stored here: the session's system prompt is separate
    content: str
    complete: bool = True  # False for a reply that was stopped, interrupted or failed midway
    # The exact ids the model generated for this reply (None when unknown, e.g. imported).
    # Re-tokenising a reply's text often gives other ids ("Emb|er" comes back as "E|mber"),
    # which would break cache reuse from that point on; see ChatSession.render_ids.
    token_ids: list[int] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, "complete": self.complete}


@dataclass(frozen=True)
class TurnResult:
    reply: str
    stats: TurnStats


@dataclass
class SessionSettings:
    """Per-conversation settings.

    overflow: what happens when a conversation no longer fits the model's context (for
        strategies other than sink): "stop" refuses with a clear message, "truncate-middle"
        keeps the system prompt and the first exchange and leaves the oldest turns after
        them out of what the model reads (they stay in the chat), "sink" switches this chat
        to the sink strategy, keeping its cache.
    """

    system_prompt: str = ""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    cache: CacheSpec = field(default_factory=CacheSpec)
    reuse: bool = True  # False recomputes the whole conversation every turn (the baseline)
    overflow: str = "stop"
    speculative: str = "auto"  # SPECULATIVE_MODES: guesses checked several per step (engine/speculative.py)
    graphs: str = "auto"  # GRAPH_MODES: one-token steps as captured graphs (engine/graphs.py); auto = on for CUDA

    def validate(self) -> SessionSettings:
        self.cache.validate()
        self.sampling.validate()
        validate_overflow(self.overflow)
        validate_speculative(self.speculative)
        validate_graphs(self.graphs)
        return self


@dataclass(frozen=True)
class ContextStatus:
    """How full the model's context is for the next turn."""

    prompt_tokens: int
    context_length: int
    reserve: int  # tokens kept free for the reply
    bounded: bool  # the cache strategy holds a bounded window: no limit applies

    @property
    def fits(self) -> bool:
        return self.bounded or self.prompt_tokens + self.reserve <= self.context_length

    @property
    def fraction(self) -> float:
        return (self.prompt_tokens + self.reserve) / self.context_length


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """A conversation bound to a loaded model. Not thread-safe: one worker drives it.

    `cancel()` is the exception: it may be called from any thread and stops the running turn
    before its next decode step. So does setting `stop`, an event the caller owns (set before the
    turn started, it stops the turn before its first forward pass).
    """

    def __init__(
        self,
        lm: LoadedModel,
        settings: SessionSettings | None = None,
        messages: Sequence[Message] | None = None,
    ) -> None:
        self.lm = lm
        self.settings = (settings or SessionSettings()).validate()
        self.messages: list[Message] = list(messages or [])
        # truncate-middle: messages[2:context_start] are left out of what the model reads.
        self.context_start = 0
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []
        self._cancel = threading.Event()
        self._policy: tuple[str, DraftLength | CostAwareLength] | None = None  # see _draft_policy
        self.stop: threading.Event | None = None
        # speculative "draft-model": the small model (set by the owner) and this conversation's cache of it
        self.draft_lm: LoadedModel | None = None
        self.draft: DraftModel | None = None
        self.cache_fallback: str | None = None  # why this turn's cache could not be reused as far as it matched
        self.on_progress: Callable[[str], None] | None = None  # long one-time work (a graph's first capture)
        self.graph_fallback: str | None = None  # why one-token steps ran eagerly though graphs were asked for
        self._runner: DecodeRunner | None = None  # graph-captured one-token steps (settings.graphs)
        self._graphs_failed: str | None = None  # a capture that failed: this session decodes eagerly

    # ----- conversation editing -------------------------------------------------------------
    def render_ids(self, messages: Sequence[Message] | None = None, generation_prompt: bool = True) -> list[int]:
        """The conversation as the model reads it: chat template applied, tokenized.

        Assistant replies keep the ids the model generated for them whenever that gives the
        same text, so the cache built while generating stays a prefix of the next prompt.
        """
        msgs = self.model_messages() if messages is None else messages
        chat: list[dict[str, str]] = []
        if self.settings.system_prompt:
            chat.append({"role": "system", "content": self.settings.system_prompt})
        chat.extend({"role": m.role, "content": m.content} for m in msgs)
        tok = self.lm.tokenizer
        text = tok.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
        plain = self._tokenize(text)
        if not any(m.token_ids for m in msgs):
            return plain
        spliced = self._splice_generated_ids(text, chat, msgs, plain)
        return plain if spliced is None else spliced

    def _tokenize(self, text: str) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _splice_generated_ids(
        self, text: str, chat: list[dict[str, str]], msgs: Sequence[Message], plain: list[int]
    ) -> list[int] | None:
        """Tokenize `text` piece by piece, with each reply's generated ids in place of its text.

        Only trusted when tokenizing the same pieces with the replies' own text reproduces
        `plain` exactly, i.e. the piece boundaries do not change the tokenization.
        """
        offset = len(chat) - len(msgs)  # the system prompt, if any, comes first
        pos = 0  # where the text not yet tokenized starts
        cursor = 0  # where the next message's text is searched from: past every earlier message
        canonical: list[int] = []
        spliced: list[int] = []
        for i, entry in enumerate(chat):
            content = entry["content"]
            if not content:
                continue
            at = text.find(content, cursor)
            if at < 0:
                return None  # the template changed the text (e.g. trimmed it)
            cursor = at + len(content)
            msg = msgs[i - offset] if i >= offset else None
            if msg is not None and msg.role == "assistant" and msg.token_ids:
                before = self._tokenize(text[pos:at])
                canonical += before + self._tokenize(content)
                spliced += before + list(msg.token_ids)
                pos = at + len(content)
        tail = self._tokenize(text[pos:])
        if canonical + tail != plain:
            return None
        return spliced + tail

    def model_messages(self) -> list[Message]:
        """The messages the model reads: all of them, unless truncate-middle hid the oldest turns."""
        if self.context_start <= 2:
            return list(self.messages)
        return self.messages[:2] + self.messages[self.context_start :]

    @property
    def hidden_messages(self) -> int:
        return max(0, self.context_start - 2)

    def context_limit(self) -> int:
        """Tokens the conversation may fill: the model's context, or a static cache's length if smaller."""
        spec = self.settings.cache
        if spec.strategy == "static":
            return min(self.lm.context_length, spec.max_cache_len)
        return self.lm.context_length

    def reply_reserve(self) -> int:
        """Tokens kept free for the reply when checking that a conversation fits."""
        return min(self.settings.sampling.max_new_tokens, max(self.context_limit() // 8, 1))

    def context_status(self) -> ContextStatus:
        """How full the context will be on the next turn (the GUI warns before it overflows)."""
        return ContextStatus(len(self.render_ids()), self.context_limit(), self.reply_reserve(),
                             self.settings.cache.bounded_length)

    def set_cache_spec(self, spec: CacheSpec) -> str:
        """Switch this conversation's cache strategy, keeping the conversation.

        The existing cache is converted when possible (see engine.caches.convert); otherwise it
        is dropped and the next turn recomputes it from the messages. Going from a quantized
        cache to an exact one (dynamic, static, offloaded) always recomputes.

        Returns:
            "unchanged", "converted" or "recompute".
        """
        from engine.caches.convert import convert

        spec = spec.validate()
        if spec == self.settings.cache:
            return "unchanged"
        # Leaving a quantized cache for an exact one recomputes: converting would carry the
        # quantization error into a cache that promises the same logits as recomputing.
        exact_again = self.settings.cache.is_quantized and not spec.is_lossy
        converted = (convert(self.cache, len(self.cached_ids), spec, self.lm.config, self.lm.device)
                     if self.cache is not None and not exact_again else None)
        self.settings.cache = spec
        if converted is None:
            self.reset_cache()
            return "recompute"
        self.cache = converted
        return "converted"

    def set_system_prompt(self, text: str) -> None:
        self.settings.system_prompt = text

    def set_sampling(self, sampling: SamplingSettings) -> None:
        self.settings.sampling = sampling.validate()

    def truncate(self, index: int) -> None:
        """Drop message `index` and everything after it. The cache is cropped lazily next turn."""
        del self.messages[index:]
        if index < self.context_start:
            self.context_start = 0

    def cancel(self) -> None:
        self._cancel.set()

    def _stopped(self) -> bool:
        return self._cancel.is_set() or (self.stop is not None and self.stop.is_set())

    def reset_cache(self) -> None:
        self.cache = None
        self.cached_ids = []
        self.release_graphs()
        self.draft = None  # the draft's cache follows the main one (it is rebuilt from the conversation)

    def release_graphs(self) -> None:
        """Drop the captured decode graph (the cache left the device, or is gone); the next step recaptures."""
        if self._runner is not None:
            self._runner.release()
        if self.draft is not None:
            self.draft.session.release_graphs()

    def set_draft_model(self, lm: LoadedModel | None) -> None:
        """The small model that guesses for speculative "draft-model" (None: none); checked for the same tokenizer."""
        if lm is not None:
            check_draft_compatible(self.lm, lm)
        if lm is not self.draft_lm:
            self.draft = None
        self.draft_lm = lm

    def draft_cache_bytes(self) -> int:
        """Bytes the draft model's cache of this conversation holds (0 without one)."""
        return caches.cache_bytes(self.draft.session.cache) if self.draft is not None else 0

    # ----- turns ------------------------------------------------------------------------------
    def send(self, text: str, on_delta: DeltaFn | None = None) -> TurnResult:
        """Add a user message and generate the reply."""
        self.messages.append(Message("user", text))
        return self.generate(on_delta)

    def regenerate(self, on_delta: DeltaFn | None = None) -> TurnResult:
        """Replace the last assistant reply with a new one."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
        return self.generate(on_delta)

    def edit(self, index: int, text: str, on_delta: DeltaFn | None = None) -> TurnResult:
        """Replace user message `index`, drop what followed it, and answer it again.

        The cache keeps everything before the edit point and recomputes only from there.
        """
        if not 0 <= index < len(self.messages) or self.messages[index].role != "user":
            raise IndexError(f"Message {index} is not a user message of this conversation.")
        self.truncate(index)
        self.messages.append(Message("user", text))
        return self.generate(on_delta)

    def generate(self, on_delta: DeltaFn | None = None, on_token: TokenFn | None = None) -> TurnResult:
        """Generate the assistant's reply to the conversation as it stands (last message: the user's).

        Args:
            on_delta: called with each piece of the reply's text as it is decoded.
            on_token: called with each generated token id, as soon as it is chosen.
        """
        if not self.messages or self.messages[-1].role != "user":
            raise ValueError("There is no user message to answer.")
        user_at = len(self.messages) - 1
        self._cancel.clear()
        self.cache_fallback = None
        self.prefill_chunk()  # invalid cache settings are reported before anything runs
        prompt = self.render_ids()
        context = self.context_limit()
        sampling = self.settings.sampling
        overflow_action = None
        if not self.settings.cache.bounded_length and len(prompt) + self.reply_reserve() > context:
            overflow_action = self._apply_overflow_policy(len(prompt))
            prompt = self.render_ids()
        if self.settings.cache.bounded_length:
            budget = sampling.max_new_tokens  # positions stay inside the cache window
        else:
            budget = min(sampling.max_new_tokens, context - len(prompt))

        sampler = Sampler(sampling, self.lm.device)
        decoder = IncrementalDecoder(self.lm.tokenizer)
        stop_ids = self.lm.stop_token_ids
        held_back = sorted(stop_ids)  # not chosen before sampling.min_new_tokens
        generated: list[int] = []
        finish = "length"
        error: str | None = None
        kind: str | None = None
        started = time.perf_counter()
        first_token_at: float | None = None
        reused = 0
        # The ids the repetition penalty reads (prompt + reply so far), grown in place.
        context_ids = torch.empty(len(prompt) + budget + 1, dtype=torch.long)
        context_ids[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        n_context = len(prompt)
        mode = self.settings.speculative
        if mode == "draft-model" and self.draft_lm is None:
            raise ValueError("Speculative decoding with a draft model needs a draft model: choose one (CLI: "
                             "--draft-model PATH), or another speculative mode.")
        lookup = PromptLookup(prompt) if mode not in ("off", "draft-model") else None
        if mode == "draft-model" and self.draft is None:
            assert self.draft_lm is not None
            self.draft = DraftModel(self.draft_lm, graphs=self.settings.graphs)
        drafter = self.draft if mode == "draft-model" else None
        policy = self._draft_policy()
        spec = SpecStats()
        runner = self._decode_runner()
        steps_before, captures_before = (runner.steps, runner.captures) if runner is not None else (0, 0)
        shadow: int | None = None  # a guess not checked (auto judged it not worth a pass): was it right?

        def banned() -> Sequence[int]:
            return held_back if len(generated) < sampling.min_new_tokens else ()

        def emit(token: int) -> str | None:
            """Hand one chosen token out; the reason to end the turn, if it is one."""
            nonlocal n_context
            generated.append(token)
            context_ids[n_context] = token
            n_context += 1
            if lookup is not None:
                lookup.extend((token,))
            if on_token is not None:
                on_token(token)
            if token in stop_ids:
                return "stop"
            delta = decoder.push(token)
            if delta and on_delta is not None:
                on_delta(delta)
            if len(generated) >= budget:
                return "length"
            if self._stopped():
                return "cancelled"
            return None

        try:
            # Counted before the prefill: a turn that fails in it still reports what its cache held.
            reused = self._reuse(prompt)
            logits = self._prefill(prompt[reused:])
            chosen: int | None = None  # a token already chosen by the last check of guesses
            while True:
                if chosen is None:
                    chosen = sampler.choose(logits, context_ids[:n_context], banned())
                token, chosen = chosen, None
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if shadow is not None:
                    policy.update(1, int(token == shadow))
                    shadow = None
                end = emit(token)
                if end is not None:
                    finish = end
                    break
                if drafter is not None:
                    draft, shadow = self._draft_from_model(drafter, context_ids[:n_context].tolist(), policy,
                                                           budget - len(generated) - 1, spec)
                else:
                    draft, shadow = self._draft(lookup, policy, budget - len(generated) - 1, spec)
                spec.passes += 1
                if not draft:
                    step_started = time.perf_counter()
                    logits = self.decode_step(token)
                    if isinstance(policy, CostAwareLength):
                        policy.observe(1, time.perf_counter() - step_started)
                    continue
                # One pass scores the token and every guess; each guess stands while it is what the
                # sampler would have chosen there (see Sampler.verify).
                verify_started = time.perf_counter()
                rows = self.forward_logits([token, *draft], all_positions=True)
                took = time.perf_counter() - verify_started
                spec.verify_seconds += took
                if isinstance(policy, CostAwareLength):
                    policy.observe(len(draft) + 1, took)
                kept = 0
                for i, guess in enumerate(draft):
                    choice, agreed = sampler.verify(rows[i], context_ids[:n_context], guess, banned())
                    if not agreed:
                        chosen = choice
                        break
                    kept += 1
                    end = emit(choice)
                    if end is not None:
                        break
                spec.record(len(draft), kept)
                policy.update(len(draft), kept)
                # The cache holds the token and every guess: drop the guesses not kept (and, when the turn
                # ends on a kept one, that last token too, which a one-token step would not have fed).
                unused = len(draft) - kept + (1 if end is not None else 0)
                if unused:
                    self._crop(len(self.cached_ids) - unused)
                if end is not None:
                    finish = end
                    break
                if chosen is None:
                    logits = rows[len(draft)]  # every guess stood: the next token comes from the last row
        except _Cancelled:
            finish = "cancelled"
        except Exception as exc:  # torch.OutOfMemoryError included: keep the conversation usable
            finish = "error"
            error = f"{type(exc).__name__}: {exc}"
            kind = error_kind(exc)
            self._resync()
        ended = time.perf_counter()

        tail = decoder.flush()
        if tail and on_delta is not None:
            on_delta(tail)
        reply = decoder.text()
        if reply or finish in ("stop", "length"):
            reply_ids = [t for t in generated if t not in stop_ids] if finish == "stop" else generated
            self.messages.append(
                Message("assistant", reply, complete=finish in ("stop", "length"), token_ids=reply_ids)
            )
        decode_steps = max(len(generated) - 1, 0)
        decode_time = ended - first_token_at if first_token_at is not None else 0.0
        stats = TurnStats(
            prompt_tokens=len(prompt),
            reused_tokens=reused,
            prefilled_tokens=len(prompt) - reused,
            generated_tokens=len(generated),
            ttft_ms=((first_token_at or ended) - started) * 1000.0,
            decode_tok_s=decode_steps / decode_time if decode_time > 0 else 0.0,
            cache_tokens=caches.seq_length(self.cache),
            cache_bytes=caches.cache_bytes(self.cache),
            cache_reserved_bytes=caches.cache_reserved_bytes(self.cache),
            cache_fallback=self.cache_fallback,
            finish_reason=finish,
            error=error,
            error_kind=kind,
            overflow_action=overflow_action,
            hidden_messages=self.hidden_messages,
            user_tokens=len(self._tokenize(self.messages[user_at].content)),
            speculative=spec.describe(self.settings.speculative, "draft model" if drafter is not None else None),
            tokens_per_step=spec.tokens_per_step if spec.passes else None,
            draft_ms=spec.draft_seconds * 1000.0,
            verify_ms=spec.verify_seconds * 1000.0,
            graph_steps=self._runner.steps - steps_before if self._runner is not None and runner is self._runner else 0,
            graph_captures=(self._runner.captures - captures_before
                            if self._runner is not None and runner is self._runner else 0),
            graph_fallback=self.graph_fallback,
        )
        return TurnResult(reply=reply, stats=stats)

    def _draft_policy(self) -> DraftLength | CostAwareLength:
        """How many guesses to check per step, kept across turns so that what it learnt carries over.

        auto: weighed against this machine's measured step costs (`LoadedModel.step_costs`); without
        them, and with "prompt-lookup", every proposal is checked with a length that follows success.
        """
        mode = self.settings.speculative
        if self._policy is None or self._policy[0] != mode:
            costs = self.lm.step_costs
            policy: DraftLength | CostAwareLength = (CostAwareLength(costs) if mode == "auto" and len(costs) >= 2
                                                     else DraftLength())  # prompt lookup, draft model
            self._policy = (mode, policy)
        return self._policy[1]

    def _draft(self, lookup: PromptLookup | None, policy: DraftLength | CostAwareLength, room: int,
               spec: SpecStats) -> tuple[list[int], int | None]:
        """Guesses for the tokens after the one about to be fed ([] for a plain step), and a guess
        left unchecked (whose fate still teaches the policy).

        `room` bounds them (a turn never feeds more than a plain one would); a cache that could not
        take rejected guesses back exactly (a sink about to evict, a quantized cache about to
        quantize) gets none for this step, which the stats count.
        """
        if lookup is None or room <= 0:
            return [], None
        started = time.perf_counter()
        proposal = lookup.propose()
        spec.draft_seconds += time.perf_counter() - started
        if not proposal:
            return [], None
        draft = proposal[: min(policy.next(), room)]
        if not draft:
            return [], proposal[0]
        if not self._ensure_cache().rewindable(len(draft) + 1):
            spec.skipped += 1
            return [], None
        return draft, None

    def _draft_from_model(self, drafter: DraftModel, context: list[int], policy: DraftLength | CostAwareLength,
                          room: int, spec: SpecStats) -> tuple[list[int], int | None]:
        """The draft model's guesses for the tokens after `context` (whose last token is about to be fed)."""
        if room <= 0:
            return [], None
        k = min(policy.next(), room)
        if k <= 0:
            return [], None
        if not self._ensure_cache().rewindable(k + 1):
            spec.skipped += 1
            return [], None
        started = time.perf_counter()
        draft = drafter.propose(context, k)
        spec.draft_seconds += time.perf_counter() - started
        return draft, None

    def _apply_overflow_policy(self, prompt_tokens: int) -> str:
        """The conversation does not fit: apply the overflow policy or raise ContextOverflowError."""
        context = self.context_limit()
        policy = self.settings.overflow
        if policy == "sink":
            spec = self.settings.cache
            sink_tokens = spec.sink_tokens if spec.sink_tokens > 0 else CacheSpec().sink_tokens
            window = self.lm.context_length - sink_tokens - PREFILL_CHUNK
            how = self.set_cache_spec(CacheSpec(strategy="sink", sink_tokens=sink_tokens, window=window))
            return f"switched to the sink strategy ({sink_tokens} sinks, window {window}; cache {how})"
        if policy == "truncate-middle":
            original, before = self.context_start, self.hidden_messages
            start = max(self.context_start, 2)
            # Drop whole turns after the first exchange, oldest first; the last message stays.
            while True:
                self.context_start = start
                if len(self.render_ids()) + self.reply_reserve() <= context:
                    return f"left {self.hidden_messages - before} older messages out of the model's view"
                if start >= len(self.messages) - 1:
                    break
                start += 2 if start + 2 <= len(self.messages) - 1 else 1
            self.context_start = original
        raise ContextOverflowError(prompt_tokens, context)

    # ----- cache plumbing ------------------------------------------------------------------
    def _ensure_cache(self) -> KVCache:
        if self.cache is None:
            self.cache = caches.build_cache(self.settings.cache, self.lm.config, self.lm.device)
            self.cached_ids = []
        return self.cache

    def _crop(self, length: int) -> None:
        """Cut the cache back to the first `length` tokens; where it cannot be (a hybrid model's state-space
        states, a sink's evicted tokens, a sliding window that slid), back to the longest point it can
        return to (a checkpointed turn boundary) or to nothing, saying why in `cache_fallback`."""
        if self.cache is None or length >= len(self.cached_ids):
            return
        if self.cache.crop_to(length):
            del self.cached_ids[length:]
            return
        cache = self.cache
        point = cache.restore_point(length)
        if 0 < point < length and cache.crop_to(point):
            del self.cached_ids[point:]
        else:
            point = 0
            self.reset_cache()
        self.cache_fallback = _fallback_reason(cache, length, point)

    def _resync(self) -> None:
        """After a failed forward pass, bring the cache back to the ids known to be in it."""
        if self.cache is not None and not self.cache.crop_to(len(self.cached_ids)):
            self.reset_cache()

    def _prepare(self, prompt: list[int]) -> tuple[int, torch.Tensor]:
        """Crop the cache to the longest prefix it shares with `prompt` and feed the rest.

        Returns how many prompt tokens were reused and the logits for the next token.
        """
        reused = self._reuse(prompt)
        return reused, self._prefill(prompt[reused:])

    def _reuse(self, prompt: list[int]) -> int:
        """Crop the cache to the longest prefix it shares with `prompt` (leaving at least one token to feed:
        its logits choose the first new token); returns how many prompt tokens it still holds."""
        if not self.settings.reuse or self.cache is None:
            self.reset_cache()
        self._decode_runner()  # with graphs, the cache grows in their buckets from the prefill on
        keep = min(common_prefix_length(self.cached_ids, prompt), len(prompt) - 1)
        self._crop(keep)
        return len(self.cached_ids)

    def _prefill(self, rest: list[int]) -> torch.Tensor:
        """Feed the prompt's tokens after the reused prefix, in chunks; the logits for the next token."""
        chunk = self.prefill_chunk()
        logits = None
        # A hybrid model's states cannot be cut back: copy them just before the last prompt token, where a
        # regenerate (and an edit of the next turn) returns to.
        split = len(rest) - 1 if len(rest) > 1 and self._ensure_cache().state_layers else None
        pieces = ([rest[:split], rest[split:]] if split is not None else [rest])
        for i, piece in enumerate(pieces):
            if i:
                self._ensure_cache().checkpoint()
            for start in range(0, len(piece), chunk):
                if self._stopped():
                    raise _Cancelled  # between prefill chunks: a long prompt stops within one chunk
                logits = self.forward_logits(piece[start : start + chunk])
        assert logits is not None, "prefill needs at least one token"
        return logits

    def warm(self) -> int:
        """Bring the cache up to the conversation so far (no generation prompt); returns tokens reused."""
        if not self.messages:
            return 0
        self._cancel.clear()
        try:
            reused, _ = self._prepare(self.render_ids(generation_prompt=False))
        except Exception:
            self._resync()
            raise
        return reused

    def prefill_chunk(self) -> int:
        """Tokens per prefill pass. A sink cache's positions reach sinks + window + chunk, which
        must stay inside the model's context."""
        spec = self.settings.cache
        if not spec.bounded_length:
            return PREFILL_CHUNK
        room = self.lm.context_length - spec.sink_tokens - spec.window
        if room < 1:
            raise caches.CacheConfigError(
                f"sinks + window ({spec.sink_tokens + spec.window}) must be smaller than the model's context "
                f"({self.lm.context_length})."
            )
        return min(PREFILL_CHUNK, room)

    def next_token_logits(self) -> tuple[int, torch.Tensor]:
        """Bring the cache up to the conversation (with the generation prompt) and return
        (reused tokens, the logits of the first reply token), without generating."""
        self._cancel.clear()
        prompt = self.render_ids()
        try:
            return self._prepare(prompt)
        except Exception:
            self._resync()
            raise

    def _decode_runner(self) -> DecodeRunner | None:
        """The graph runner for this session's one-token steps, or None (graphs off, or this cache cannot:
        then `graph_fallback` says why)."""
        self.graph_fallback = None
        if not graphs_wanted(self.settings.graphs, self.lm.device):
            return None
        if self._graphs_failed is not None:
            self.graph_fallback = self._graphs_failed
            return None
        cache = self._ensure_cache()
        reason = unsupported_reason(cache, self.lm.model)
        if reason is not None:
            self.graph_fallback = f"decoding eagerly: {reason}"
            return None
        if self._runner is None or self._runner.model is not self.lm.model:
            self._runner = DecodeRunner(self.lm.model, self.lm.context_length,
                                        capture=self.lm.device.type == "cuda", on_progress=self.on_progress)
        self._runner.on_progress = self.on_progress
        self._runner.adopt(cache)
        return self._runner

    def decode_step(self, token: int) -> torch.Tensor:
        """Feed one token; return the next token's logits. With graphs on and a cache that allows it, the
        step is the captured graph (on a CPU: the same static-shaped step, run eagerly); otherwise, and for
        a step that evicts or overflows, `forward_logits`."""
        runner = self._decode_runner()
        cache = self._ensure_cache()
        if runner is not None and runner.eager_reason(cache) is None:
            try:
                logits = runner.step(cache, token)
            except CaptureError as exc:
                self._graphs_failed = f"decoding eagerly: capturing the decode step failed ({exc})"
                self.graph_fallback = self._graphs_failed
                self._runner = None
            else:
                self.cached_ids.append(token)
                return logits
        return self.forward_logits([token])

    @torch.inference_mode()
    def forward_logits(self, ids: list[int], all_positions: bool = False) -> torch.Tensor:
        """Feed `ids` into the cache; return the logits (of the last position, or of every position)."""
        cache = self._ensure_cache()
        cache.ensure_room(len(ids))  # a static cache refuses to overflow, before anything is written
        start = caches.seq_length(cache)
        device = self.lm.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
        out = self.lm.model(
            input_ids=input_ids,
            **cache_kwargs(self.lm.model, cache),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if all_positions else 1,
        )
        self.cached_ids.extend(ids)
        return out.logits[0] if all_positions else out.logits[0, -1]



def _fallback_reason(cache: KVCache, length: int, point: int) -> str:
    """Why a cache that matched the first `length` tokens was recomputed from token `point` instead."""
    what = "the cache could not be cut back to the edit"
    if cache.state_layers:
        what = "this model's state-space layers cannot be cut back to the edit"
    elif cache.evicted:
        what = "the attention-sink cache had evicted tokens the edit needs"
    where = f"from the turn boundary at token {point}" if point else "from the start"
    return f"{what} (token {length}): recomputed {where}"


class DraftModelError(ValueError):
    """A draft model that cannot guess for this model (another tokenizer)."""


def check_draft_compatible(main: LoadedModel, draft: LoadedModel) -> None:
    """A draft model must read and write the same tokens: the same vocabulary, token for token."""
    if main.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise DraftModelError(
            f"{draft.source.display_name} cannot draft for {main.source.display_name}: their tokenizers differ "
            "(a draft model must come from the same family, e.g. SmolLM2-135M for SmolLM2-360M or 1.7B).")


class DraftModel:
    """Speculative decoding's small model for one conversation: it keeps its own cache of the conversation,
    reused and cropped by the same longest-common-prefix rule as the main cache, and guesses greedily.

    Each `propose` brings the draft's cache to the tokens so far (after a turn, an edit or rejected
    guesses it crops to what still agrees and feeds the rest), then decodes `k` guesses, feeding all but
    the last: the next call crops what the main model rejected.
    """

    def __init__(self, lm: LoadedModel, graphs: str = "auto") -> None:
        self.session = ChatSession(lm, SessionSettings(speculative="off", graphs=graphs))

    def propose(self, context: list[int], k: int) -> list[int]:
        s = self.session
        keep = min(common_prefix_length(s.cached_ids, context), len(context) - 1)
        s._crop(keep)
        rest = context[len(s.cached_ids):]
        chunk = PREFILL_CHUNK
        logits = None
        for start in range(0, len(rest), chunk):
            logits = s.forward_logits(rest[start : start + chunk])
        assert logits is not None
        guesses: list[int] = []
        for i in range(k):
            token = int(torch.argmax(logits))
            guesses.append(token)
            if i + 1 < k:
                logits = s.decode_step(token)
        return guesses
