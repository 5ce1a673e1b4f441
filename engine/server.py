"""`python -m engine serve`: an OpenAI-compatible HTTP server on Cachet's engine.

Editors, agents, Open WebUI and scripts speak the OpenAI chat API and re-send the whole conversation
on every request. The server keeps the caches of the conversations it served in the same
`ChatService` pool as the window (device → RAM → disk, within the same budgets) and matches each
request's rendered prompt against every cache it holds, by longest common token prefix, without any
conversation id:

- a cache whose tokens are all a prefix of the prompt (the conversation went on), or that covers the
  whole prompt of its last request (a regenerated reply), is cropped and extended in place;
- otherwise the request gets a new slot, and the service starts it from a copy of the longest
  prefix another cache holds (a shared system prompt), never from another request's cache itself.

Generation runs on one worker thread that owns the service (`GenerationWorker`); requests wait in
a bounded queue (503 when full). A client that disconnects sets its turn's stop event, which the
session checks before every token. The HTTP layer is Starlette on uvicorn; this module builds the
app around an already-opened `ChatService`, so whoever opens the data folder (and holds its lock)
stays its owner. What may reach the endpoints at all (where it listens, the `Host` and `Origin` a
request carries, the API key, a JSON body and its bounds) is `engine/server_http.py`'s, enforced
here whoever starts the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.reports import TurnDone
from engine.server_http import (
    ApiError,
    ClientGone,
    EdgeGuard,
    EdgePolicy,
    check_bind,
    is_loopback,
    normalize_origin,
    read_json_body,
    url_host,
)
from engine.service import ChatService
from engine.session import ChatSession, Message, common_prefix_length
from engine.specs import (
    OVERFLOW_POLICIES,
    STRATEGIES,
    CacheConfigError,
    CacheSpec,
    SamplingError,
    SamplingSettings,
    quantization_defaults,
    validate_overflow,
)
from engine.store import ChatSettings

log = logging.getLogger(__name__)

DEFAULT_PORT = 8471
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# The `cachet` object a request may carry (the OpenAI client's extra_body): cache and overflow settings.
CACHE_FIELDS = ("cache", "sink_tokens", "window", "nbits", "residual", "q_group_size", "axis_key", "axis_value",
                "backend", "max_cache_len", "overflow", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class ServerConfig:
    """What one server allows and assumes.

    model_id: the name `/v1/models` lists and requests must ask for.
    api_key: required as `Authorization: Bearer KEY` when set.
    defaults: the chat settings a request starts from (sampling, cache strategy, overflow policy).
    max_queue: requests that may wait for the worker; one more is answered 503.
    max_body_bytes: larger request bodies are answered 413.
    max_tokens_limit: the most tokens one reply may ask for.
    max_slots: conversations whose caches the server keeps (the least recently used beyond that is dropped;
        within it the pool's memory budgets decide where each cache lives).
    no_auth: listening beyond loopback without a key is allowed (the user asked for it: `--no-auth`);
        otherwise `BackgroundServer` refuses such an address.
    allowed_hosts: `Host` names accepted besides localhost, 127.0.0.1 and [::1] ("*": any); a keyed server
        listening beyond loopback accepts any name (see `engine.server_http.EdgePolicy`).
    cors_origins: web origins whose pages may call the server ("*": any); empty keeps CORS closed, and a
        request that carries any other `Origin` is refused.
    """

    model_id: str
    api_key: str | None = None
    no_auth: bool = False
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    defaults: ChatSettings = field(default_factory=lambda: ChatSettings(cache=CacheSpec("dynamic")))
    max_queue: int = 16
    max_body_bytes: int = 4 * 2**20
    max_tokens_limit: int = 4096
    max_slots: int = 32


@dataclass
class ServerStats:
    """What the server did, for `/health` and the app's status bar (read from any thread)."""

    served: int = 0
    cancelled: int = 0
    rejected_busy: int = 0
    running: bool = False


# ----- requests ----------------------------------------------------------------------------------------
@dataclass
class Job:
    """One request for the worker: a conversation (or a raw prompt) and how to answer it."""

    messages: list[Message]
    settings: ChatSettings
    raw: bool = False  # /v1/completions: the prompt as it is, no chat template
    stops: tuple[str, ...] = ()
    stop: threading.Event = field(default_factory=threading.Event)
    emit: Callable[[str, Any], None] = lambda kind, value: None  # ("delta", text) ... ("done", TurnDone)
    done: TurnDone | None = None


class StopMatcher:
    """Finds the request's `stop` strings in the streamed text, holding back what could start one,
    so that a client never sees any part of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Text that may be sent now; after a hit, nothing more."""
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = 0  # the longest tail that is the start of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


class RawPromptSession(ChatSession):
    """A `/v1/completions` prompt: its text tokenized as it is, no chat template (the prompt is kept as
    the session's one user message, which the pool and the prefix matching see like any other)."""

    def render_ids(self, messages: Sequence[Message] | None = None, generation_prompt: bool = True) -> list[int]:
        msgs = self.messages if messages is None else messages
        text = msgs[-1].content if msgs else ""
        return list(self.lm.tokenizer(text, add_special_tokens=True)["input_ids"])


class SlotTable:
    """The server's conversations in the service's pool: one negative key each (never a chat id of the app),
    least recently used first, with the prompt length of its last request and the ids of recent replies."""

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.slots: OrderedDict[int, tuple[CacheSpec, bool, int]] = OrderedDict()  # key -> (spec, raw, prompt)
        self.replies: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # reply text -> its generated ids
        self._keys = itertools.count(-1, -1)

    def with_reply_ids(self, messages: list[Message]) -> list[Message]:
        """Give each assistant message that the server wrote the ids it generated (clients send back
        only the text, and re-tokenizing a reply may give other ids: the cache would stop matching)."""
        out = []
        for m in messages:
            ids = self.replies.get(m.content) if m.role == "assistant" and m.content else None
            out.append(replace(m, token_ids=list(ids)) if ids else m)
        return out

    def pick(self, service: ChatService, prompt: list[int], spec: CacheSpec, raw: bool) -> tuple[int, int]:
        """(slot key, tokens its cache shares with `prompt`): the slot to answer in, a new one when
        none is this conversation's."""
        pool = service.pool
        best_key, best = None, 0
        for key, (slot_spec, slot_raw, last_prompt) in self.slots.items():
            session = pool.session(key) if pool is not None else None
            if session is None or slot_spec != spec or slot_raw != raw or not session.cached_ids:
                continue
            ids = session.cached_ids
            shared = common_prefix_length(ids, prompt)
            # Its conversation went on (all of its cache is the prompt's start), or the same prompt came
            # again (a regenerated reply): crop and extend it. Anything else is another conversation.
            if (shared == len(ids) or 0 < last_prompt - 1 <= shared) and shared > best:
                best_key, best = key, shared
        if best_key is not None:
            return best_key, best
        return next(self._keys), 0

    def used(self, service: ChatService, key: int, spec: CacheSpec, raw: bool, done: TurnDone) -> None:
        prompt = done.stats.prompt_tokens if done.stats is not None else 0
        self.slots[key] = (spec, raw, prompt)
        self.slots.move_to_end(key)
        if done.finish_reason in ("stop", "length") and done.reply and done.token_ids:
            self.replies[done.reply] = done.token_ids
            self.replies.move_to_end(done.reply)
            while len(self.replies) > 4 * self.max_slots:
                self.replies.popitem(last=False)
        while len(self.slots) > self.max_slots:
            old, _ = self.slots.popitem(last=False)
            service.forget(old)

    def forget_all(self, service: ChatService) -> None:
        for key in list(self.slots):
            service.forget(key)
        self.slots.clear()


class GenerationWorker:
    """The one thread that owns the model while the server runs: it takes jobs from a bounded queue and
    answers each through the ChatService, one at a time."""

    def __init__(self, service: ChatService, config: ServerConfig, stats: ServerStats) -> None:
        self.service, self.config, self.stats = service, config, stats
        self.slots = SlotTable(config.max_slots)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=config.max_queue)
        self._thread: threading.Thread | None = None
        self.turns: list[TurnDone] = []  # the last turns' ends, newest last (for /health and tests)
        self.current: Job | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cachet-server-worker", daemon=True)
        self._thread.start()

    def cancel_all(self) -> None:
        """Stop the running turn before its next token and answer the waiting ones "cancelled"."""
        current = self.current
        if current is not None:
            current.stop.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.stop.set()
                job.emit("done", TurnDone(0, 0, "", "cancelled"))

    def stop(self) -> None:
        """Cancel what runs and waits, end the thread, and drop the server's slots from the pool."""
        if self._thread is None:
            return
        self.cancel_all()
        self.jobs.put(None)
        self._thread.join()
        self._thread = None

    def submit(self, job: Job) -> None:
        """Queue `job`; raises queue.Full when the queue is full."""
        self.jobs.put_nowait(job)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                with self.service.lock:
                    self.slots.forget_all(self.service)
                return
            self.current = job
            try:
                with self.service.lock:  # the window's own turns wait, and wait for, this one
                    done = self.run(job)
            except Exception as exc:  # never let one request take the worker down
                log.exception("request failed")
                done = TurnDone(0, 0, "", "error", error=f"{type(exc).__name__}: {exc}")
            finally:
                self.current = None
            job.done = done
            self.turns = [*self.turns[-63:], done]
            if done.finish_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.served += 1
            job.emit("done", done)

    def run(self, job: Job) -> TurnDone:
        """Answer one job in the slot whose cache matches its prompt best (worker thread)."""
        service = self.service
        if job.stop.is_set():
            return TurnDone(0, 0, "", "cancelled")
        pool = service.pool
        if pool is None or service.lm is None:
            return TurnDone(0, 0, "", "error", error="No model is loaded.")
        settings = job.settings
        spec = settings.cache.resolve(service.model.auto_cache if service.model else None)
        messages = self.slots.with_reply_ids(job.messages)
        probe_cls = RawPromptSession if job.raw else ChatSession
        probe = probe_cls(service.lm, _session_settings(settings, spec), messages)
        key, _shared = self.slots.pick(service, probe.render_ids(), spec, job.raw)
        if job.raw and pool.session(key) is None:
            pool.add(key, probe)  # the service answers in this session: it renders the raw prompt
        matcher = StopMatcher(job.stops)

        def on_delta(text: str) -> None:
            out = matcher.push(text)
            if out:
                job.emit("delta", out)
            if matcher.hit:
                job.stop.set()  # stops before the next token

        done = service.run_turn(key, messages, settings, on_delta=on_delta, stop=job.stop)
        tail = matcher.flush()
        if tail:
            job.emit("delta", tail)
        if matcher.hit:
            reply = done.reply
            cut = min((i for i in (reply.find(s) for s in matcher.stops) if i >= 0), default=len(reply))
            # Its ids go past the stop string: they are not the ids of what the client keeps.
            done = replace(done, reply=reply[:cut], finish_reason="stop", token_ids=())
        self.slots.used(service, key, spec, job.raw, done)
        return done


def _session_settings(settings: ChatSettings, spec: CacheSpec) -> Any:
    from engine.session import SessionSettings

    return SessionSettings(settings.system_prompt, settings.sampling, spec, True, settings.overflow)


# ----- parsing ----------------------------------------------------------------------------------------
def _number(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, not {value!r}.",
                       param=name)
    return kind(value)


def parse_settings(body: dict[str, Any], config: ServerConfig) -> ChatSettings:
    """The chat settings a request asks for: the server's defaults with the request's sampling fields and
    its `cachet` object applied, validated as the CLI validates its flags."""
    base = config.defaults
    s = base.sampling
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, min(s.max_new_tokens, config.max_tokens_limit))
    if max_tokens > config.max_tokens_limit:
        raise ApiError(400, f"max_tokens ({max_tokens}) is above this server's limit of {config.max_tokens_limit}.",
                       param="max_tokens")
    extra = body.get("cachet") or {}
    if not isinstance(extra, dict):
        raise ApiError(400, "'cachet' must be an object, e.g. {\"cache\": \"sink\"}.", param="cachet")
    unknown = sorted(set(extra) - set(CACHE_FIELDS))
    if unknown:
        raise ApiError(400, f"Unknown field(s) in 'cachet': {', '.join(unknown)}; known: {', '.join(CACHE_FIELDS)}.",
                       param="cachet")
    try:
        sampling = replace(
            s, temperature=_number(body, "temperature", float, s.temperature),
            top_p=_number(body, "top_p", float, s.top_p),
            top_k=_number(extra, "top_k", int, s.top_k),
            repetition_penalty=_number(extra, "repetition_penalty", float, s.repetition_penalty),
            max_new_tokens=max_tokens, seed=_number(body, "seed", int, s.seed),
            min_new_tokens=_number(body, "min_tokens", int, s.min_new_tokens),  # vLLM's name for it
        ).validate()
        spec = base.cache
        if "cache" in extra:
            strategy = extra["cache"]
            if strategy not in STRATEGIES:
                raise CacheConfigError(f"Unknown cache strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
            spec = CacheSpec(strategy=strategy)
            if "nbits" in extra and isinstance(extra["nbits"], int) and extra["nbits"] in (2, 4):
                spec = replace(spec, **quantization_defaults(extra["nbits"]))
        changes = {k: extra[k] for k in CACHE_FIELDS[1:10] if k in extra}
        spec = replace(spec, **changes).validate()
        overflow = validate_overflow(extra.get("overflow", base.overflow))
    except (SamplingError, CacheConfigError) as exc:
        raise ApiError(400, str(exc), code="invalid_settings") from None
    except ValueError as exc:  # validate_overflow
        raise ApiError(400, f"{exc} (overflow: one of {', '.join(OVERFLOW_POLICIES)})", param="cachet") from None
    return replace(base, sampling=sampling, cache=spec, overflow=overflow)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported.", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts.", param="messages")


def parse_messages(body: dict[str, Any]) -> tuple[str, list[Message]]:
    """(system prompt, the other messages) of a chat request; the last message must be the user's."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list.", param="messages")
    system = ""
    messages: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}]: role must be one of {', '.join(ROLES)}.", param="messages")
        role = ROLES[m["role"]]
        text = _text(m.get("content"), f"messages[{i}]")
        if role == "system" and not messages:
            system = f"{system}\n\n{text}" if system else text
        else:
            messages.append(Message(role, text))
    if not messages or messages[-1].role != "user":
        raise ApiError(400, "The last message must be the user's: there is nothing to answer.", param="messages")
    return system, messages


# What a request may ask for that this server does not do, and the values that ask for nothing: anything
# else is refused (400) rather than ignored, so a client never mistakes a plain reply for what it asked.
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "logprobs": ("log probabilities are not supported by this server", (None, False)),
    "top_logprobs": ("log probabilities are not supported by this server", (None, 0)),
    "tools": ("tools (function calling) are not supported by this server", (None, [])),
    "tool_choice": ("tools (function calling) are not supported by this server", (None, "auto", "none")),
    "functions": ("function calling is not supported by this server", (None, [])),
    "function_call": ("function calling is not supported by this server", (None, "auto", "none")),
    "response_format": ("structured replies (JSON modes) are not supported by this server", (None, {"type": "text"})),
    "logit_bias": ("logit_bias is not supported by this server", (None, {})),
}
UNSUPPORTED_RAW: dict[str, tuple[str, tuple[Any, ...]]] = {
    "logprobs": ("log probabilities are not supported by this server", (None, False)),
    "echo": ("echo is not supported by this server", (None, False)),
    "suffix": ("suffix (insertion) is not supported by this server", (None, "")),
    "best_of": ("best_of is not supported by this server (only 1)", (None, 1)),
    "logit_bias": ("logit_bias is not supported by this server", (None, {})),
}


def refuse_unsupported(body: dict[str, Any], raw: bool) -> None:
    """Raise ApiError (400) for a field that asks for what this server does not do (`logprobs: true`, a
    non-empty `tools`, ...); the values that ask for nothing (`tools: []`, `tool_choice: "none"`) pass."""
    for name, (why, fine) in (UNSUPPORTED_RAW if raw else UNSUPPORTED).items():
        value = body.get(name)
        # `0 == False` in Python: compare types too, so that `logprobs: 0` is judged as the number it is
        if not any(value == ok and type(value) is type(ok) for ok in fine):
            raise ApiError(400, f"'{name}': {why}; send {name}={json.dumps(fine[-1])} or leave it out "
                                f"(got {json.dumps(value)[:80]}).", code="unsupported_parameter", param=name)


def parse_stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings.", param="stop")
    return tuple(s for s in stops if s)


# ----- the app -----------------------------------------------------------------------------------------
def _usage(done: TurnDone) -> dict[str, Any]:
    s = done.stats
    prompt = s.prompt_tokens if s is not None else done.prompt_tokens
    completion = s.generated_tokens if s is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": s.reused_tokens if s is not None else 0}}


def _reuse_headers(done: TurnDone) -> dict[str, str]:
    s = done.stats
    if s is None:
        return {}
    source = done.restore.source if done.restore is not None else "empty"
    return {"x-cachet-prompt-tokens": str(s.prompt_tokens), "x-cachet-cached-tokens": str(s.reused_tokens),
            "x-cachet-cache-source": source, "x-cachet-ttft-ms": f"{s.ttft_ms:.1f}"}


def _finish(done: TurnDone) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _turn_error(done: TurnDone) -> ApiError | None:
    if done.finish_reason == "overflow":
        return ApiError(400, done.error or "The prompt does not fit the model's context.",
                        code="context_length_exceeded", param="messages")
    if done.finish_reason == "error" and not done.has_reply:
        status = 400 if done.error_kind == "invalid_settings" else 500
        return ApiError(status, done.error or "Generation failed.", code=done.error_kind,
                        kind="invalid_request_error" if status == 400 else "server_error")
    return None


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Set the job's stop event as soon as its client disconnects (OpenAI clients just close the
    connection; nginx logs this as 499): the worker stops before its next token, or skips the job."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.stop.set()
            return


class CachetServer:
    """The Starlette app and its worker, around an already-opened ChatService with a model loaded.

    `start()` starts the worker thread (call it before serving), `stop()` ends it; `app` is the ASGI app,
    behind an `EdgeGuard` (Host, Origin, API key, JSON content type) for every request. `bind(host)` says
    where it listens (BackgroundServer calls it), which decides whether any `Host` name is accepted.
    """

    def __init__(self, service: ChatService, config: ServerConfig) -> None:
        self.service, self.config = service, config
        self.stats = ServerStats()
        self.worker = GenerationWorker(service, config, self.stats)
        self.policy = EdgePolicy.for_bind(None, config.api_key, config.allowed_hosts, config.cors_origins)
        routes = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})
        self.app = EdgeGuard(routes, lambda: self.policy)

    def bind(self, host: str) -> None:
        """Check that this server may listen on `host`, and accept the `Host` names that go with it.

        Raises:
            UnsafeBindError: `host` reaches other machines and no API key guards the server.
        """
        check_bind(host, self.config.api_key, self.config.no_auth)
        self.policy = EdgePolicy.for_bind(host, self.config.api_key, self.config.allowed_hosts,
                                          self.config.cors_origins)

    def start(self) -> None:
        self.worker.start()
        self.stats.running = True

    def stop(self) -> None:
        self.stats.running = False
        self.worker.stop()

    # ----- endpoints ---------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_id, "served": self.stats.served,
                             "cancelled": self.stats.cancelled, "busy_rejections": self.stats.rejected_busy,
                             "queued": self.worker.jobs.qsize()})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_id, "object": "model", "created": 0, "owned_by": "cachet"}]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, raw=False)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, raw=True)

    async def _complete(self, request: Request, raw: bool) -> Response:
        try:
            body = await read_json_body(request, self.config.max_body_bytes)
            model = body.get("model")
            if model is None:
                raise ApiError(400, f"'model' is required: this server serves {self.config.model_id!r} "
                                    "(see /v1/models).", code="missing_model", param="model")
            if model != self.config.model_id:
                raise ApiError(404, f"The model {model!r} does not exist here; this server serves "
                                    f"{self.config.model_id!r} (see /v1/models).", code="model_not_found",
                               param="model")
            if body.get("n", 1) != 1:
                raise ApiError(400, "Only n=1 is supported.", param="n")
            refuse_unsupported(body, raw)
            settings = parse_settings(body, self.config)
            if raw:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    raise ApiError(400, "'prompt' must be a non-empty string.", param="prompt")
                messages = [Message("user", prompt)]
            else:
                system, messages = parse_messages(body)
                settings = replace(settings, system_prompt=system)
            stops = parse_stops(body)
        except ApiError as exc:
            return exc.response()
        except ClientGone:  # nobody is left to read an answer; nothing was queued
            return Response(status_code=499)
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        def emit(kind: str, value: Any) -> None:  # from the worker thread
            with contextlib.suppress(RuntimeError):  # the event loop already closed (the server stopped)
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(messages, settings, raw=raw, stops=stops, emit=emit)
        try:
            self.worker.submit(job)
        except queue.Full:
            self.stats.rejected_busy += 1
            return ApiError(503, f"The server is busy: {self.config.max_queue} requests are already waiting. "
                                 "Retry shortly.", code="server_busy", kind="server_error").response(
                headers={"retry-after": "1"})
        ident = f"{'cmpl' if raw else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if stream:
            return StreamingResponse(self._stream(request, job, events, ident, created, raw, include_usage),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        text: list[str] = []
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    text.append(value)
                    continue
                done: TurnDone = value
                break
        finally:
            watcher.cancel()
        if (error := _turn_error(done)) is not None:
            return error.response()
        if done.finish_reason == "cancelled":
            return ApiError(499, "The request was cancelled.", code="cancelled").response()
        reply = "".join(text)
        choice: dict[str, Any] = ({"index": 0, "text": reply, "logprobs": None, "finish_reason": _finish(done)} if raw
                                  else {"index": 0, "message": {"role": "assistant", "content": reply},
                                        "logprobs": None, "finish_reason": _finish(done)})
        return JSONResponse({"id": ident, "object": "text_completion" if raw else "chat.completion", "created": created,
                             "model": self.config.model_id, "choices": [choice], "usage": _usage(done)},
                            headers=_reuse_headers(done))

    async def _stream(self, request: Request, job: Job, events: asyncio.Queue[tuple[str, Any]], ident: str,
                      created: int, raw: bool, include_usage: bool) -> AsyncIterator[str]:
        obj = "text_completion" if raw else "chat.completion.chunk"

        def chunk(delta: dict[str, Any] | str | None, finish: str | None) -> str:
            if raw:
                choice: dict[str, Any] = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
            payload = {"id": ident, "object": obj, "created": created, "model": self.config.model_id,
                       "choices": [choice]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            if not raw:
                yield chunk({"role": "assistant", "content": ""}, None)
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield chunk(value if raw else {"content": value}, None)
                    continue
                done: TurnDone = value
                break
            error = _turn_error(done)
            if error is not None:
                yield "data: " + json.dumps({"error": {"message": error.message, "type": error.kind,
                                                       "param": error.param, "code": error.code}}) + "\n\n"
                return
            yield chunk(None, _finish(done))
            if include_usage:
                payload = {"id": ident, "object": obj, "created": created, "model": self.config.model_id,
                           "choices": [], "usage": _usage(done)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            job.stop.set()  # the stream ended, or was abandoned: stop before the next token

    # ----- errors ------------------------------------------------------------------------------------
    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return ApiError(404, f"No such endpoint: {request.method} {request.url.path}.", code="not_found").response()

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}.",
                        code="method_not_allowed").response()


class BackgroundServer:
    """A CachetServer served by uvicorn on its own thread (the app's toggle, the tests, the scripts).

    `port=0` picks a free port; `port` holds the one bound once `start()` returns. `sock`: a socket
    already bound to host:port by `listen_socket` (`python -m engine serve` claims its port before it
    loads the model, so a port in use is said at once). An address beyond loopback is refused here,
    before anything listens, unless the server has an API key or its config says `no_auth`
    (`UnsafeBindError`, a ValueError with the sentence for the user).
    """

    def __init__(self, server: CachetServer, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 sock: socket.socket | None = None) -> None:
        import uvicorn

        server.bind(host)
        self.server, self.host = server, host
        self._uvicorn = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="warning",
                                                      lifespan="off", timeout_graceful_shutdown=2))
        self._thread: threading.Thread | None = None
        self._sock = sock
        self.port = port

    def start(self, timeout: float = 20.0) -> None:
        """Listen and serve; raises OSError with the reason when the address cannot be had (the socket
        is bound here, in the caller's thread, so a port in use is an error here, not in uvicorn's thread)."""
        sock, self._sock = self._sock or listen_socket(self.host, self.port), None
        self.port = int(sock.getsockname()[1])
        self.server.start()
        self._thread = threading.Thread(target=self._run, args=(sock,), name="cachet-server-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._uvicorn.should_exit = True
                self.server.stop()
                sock.close()
                raise OSError(f"The server could not start on {self.host}:{self.port}.")
            time.sleep(0.02)

    def _run(self, sock: socket.socket) -> None:
        try:
            self._uvicorn.run(sockets=[sock])
        except SystemExit:  # uvicorn exits on a start-up failure; start() reports it
            log.error("the HTTP server stopped at start-up")
        finally:
            sock.close()

    @property
    def base_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}/v1"

    def stop(self) -> None:
        self.server.worker.cancel_all()  # open streams end at once instead of holding the shutdown
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.server.stop()


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), as uvicorn would bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    return sock


# ----- the command ------------------------------------------------------------------------------------
def add_serve_arguments(p: Any) -> None:
    """The `serve` subcommand's flags (engine/cli.py adds the subcommand)."""
    from engine.cli import _add_cache_args, _add_model_args

    _add_model_args(p)
    _add_cache_args(p)
    d = SamplingSettings()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (needed off loopback)")
    p.add_argument("--no-auth", action="store_true", help="listen off loopback without a key (prints a warning)")
    p.add_argument("--allowed-hosts", nargs="+", action="extend", default=[], metavar="NAME",
                   help="Host names accepted besides localhost, 127.0.0.1 and [::1] ('*': any); a server with "
                        "--api-key off loopback accepts any (against DNS rebinding: a web page's own name "
                        "pointed at this server)")
    p.add_argument("--cors-origins", nargs="+", action="extend", default=[], metavar="ORIGIN",
                   help="web pages that may call the server, e.g. http://localhost:3000 ('*': any page); "
                        "default: none (requests from web pages are refused)")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the model's name)")
    p.add_argument("--overflow", default="stop", choices=OVERFLOW_POLICIES,
                   help="when a conversation outgrows the context: stop (400), truncate-middle, or switch to sink")
    p.add_argument("--temperature", type=float, default=d.temperature, help="default when a request gives none")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="default reply length")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="the most tokens a request may ask for")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503")
    p.add_argument("--max-body-mib", type=float, default=4.0, help="largest request body accepted")
    p.add_argument("--max-slots", type=int, default=32, help="conversations whose caches are kept")


def model_id(display_name: str) -> str:
    """A model id for `/v1/models`: the model's name without Cachet's "(bundled)" note."""
    return display_name.removesuffix(" (bundled)").strip() or "cachet"


def config_from_args(args: Any, display_name: str) -> ServerConfig:
    """The ServerConfig the flags ask for; raises ValueError with the message for the user."""
    from engine.cli import cache_spec_from_args

    if not is_loopback(args.host) and not args.api_key and not args.no_auth:
        raise ValueError(f"--host {args.host} makes the server reachable from other machines: give --api-key KEY "
                         "(or --no-auth to serve without one).")
    origins = tuple(normalize_origin(o) for o in args.cors_origins)  # ValueError says what an origin looks like
    for name in ("max_tokens_limit", "max_queue", "max_slots"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1.")
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                repetition_penalty=args.repetition_penalty,
                                max_new_tokens=args.max_new_tokens).validate()
    defaults = ChatSettings(sampling=sampling, cache=cache_spec_from_args(args).validate(), overflow=args.overflow)
    return ServerConfig(model_id=args.model_name or model_id(display_name), api_key=args.api_key or None,
                        no_auth=args.no_auth, allowed_hosts=tuple(args.allowed_hosts), cors_origins=origins,
                        defaults=defaults, max_queue=args.max_queue, max_body_bytes=int(args.max_body_mib * 2**20),
                        max_tokens_limit=args.max_tokens_limit, max_slots=args.max_slots)


def cmd_serve(args: Any) -> int:
    """Load the model, serve until Ctrl+C."""
    import sys

    from engine import models
    from engine.reports import Budgets

    try:
        config_from_args(args, "cachet")  # the flags are checked before a model is loaded
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and args.no_auth and not args.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who reaches this port can use it "
              "(requests must still name an allowed host: see --allowed-hosts).", file=sys.stderr)
    try:
        sock = listen_socket(args.host, args.port)  # the port is claimed before the model loads (seconds)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    service = ChatService(budgets=Budgets(disk=0))  # a server's slots are not kept across restarts
    try:
        service.load_model(lambda progress: models.load(
            args.model, device=args.device, dtype=args.dtype, weights=args.weights, gpu_layers=args.gpu_layers,
            offline=not args.online, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
            progress=progress),
            progress=lambda text: print(text, file=sys.stderr, flush=True))
    except BaseException:  # the caller says why; the port is given back now
        sock.close()
        raise
    assert service.lm is not None
    config = config_from_args(args, service.lm.source.display_name)
    server = CachetServer(service, config)
    try:
        http = BackgroundServer(server, args.host, args.port, sock=sock)
        http.start()
    except (OSError, ValueError) as exc:  # the server could not start on its socket
        print(f"error: {exc}", file=sys.stderr)
        sock.close()
        service.close(save=False)
        return 1
    print(f"Cachet serves {config.model_id!r} at {http.base_url} "
          f"({'API key required' if config.api_key else 'no API key'}); Ctrl+C stops.", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        http.stop()
        service.close(save=False)
    return 0
