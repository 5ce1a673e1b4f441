"""Remote engines: chats answered by an OpenAI-compatible server on a bigger machine.

vLLM (tensor-parallel across GPUs and nodes), llama.cpp's server, Ollama's OpenAI endpoint and
another Cachet (`python -m engine serve`) all speak `POST /v1/chat/completions` with SSE streaming
and `GET /v1/models`. `RemoteEngine` answers a chat's turn there with the same inputs and the same
`TurnDone` as `ChatService.run_turn`, so a front end drives either the same way; the server manages
its own cache (vLLM's prefix caching, llama.cpp's slots, Cachet's pool), and what it reuses comes
back as `usage.prompt_tokens_details.cached_tokens` (OpenAI, vLLM, Cachet) or `timings.cache_n`
(llama.cpp's server) where it reports it (TurnStats.reused_tokens); Ollama reports none.

Plain `urllib` on purpose: no HTTP library is needed for one streaming POST, and a turn's stop
event closes the connection, which every one of those servers takes as "stop generating".
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine.reports import OTHER_ERROR, TurnDone, TurnStats
from engine.store import ChatSettings

CONNECT_TIMEOUT_S = 10.0
# A reply may think for a long time before its first token on a busy server; between tokens it may not.
READ_TIMEOUT_S = 300.0


class RemoteError(RuntimeError):
    """The server could not be reached or refused the request; the message is meant for the user."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Endpoint:
    """Where a remote engine is: its base URL (ending in /v1), the model to ask for, and the API key."""

    base_url: str
    model: str = ""
    api_key: str | None = None

    def validate(self) -> Endpoint:
        url = urllib.parse.urlparse(self.base_url.strip())
        if url.scheme not in ("http", "https") or not url.netloc:
            raise RemoteError(f"{self.base_url!r} is not a server address: give one like http://127.0.0.1:8471/v1.")
        return self

    @property
    def root(self) -> str:
        return self.base_url.strip().rstrip("/")


def _request(endpoint: Endpoint, path: str, body: dict[str, Any] | None = None,
             timeout: float = CONNECT_TIMEOUT_S) -> Any:
    headers = {"accept": "application/json"}
    if endpoint.api_key:
        headers["authorization"] = f"Bearer {endpoint.api_key}"
    data = None
    if body is not None:
        headers["content-type"] = "application/json"
        data = json.dumps(body).encode()
    req = urllib.request.Request(endpoint.root + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310  (the user's own server address)
    except urllib.error.HTTPError as err:
        raise _http_error(endpoint, err) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RemoteError(f"Cannot reach the server at {endpoint.root} ({reason}). Is it running, and is the "
                          "address right?") from None


def _http_error(endpoint: Endpoint, err: urllib.error.HTTPError) -> RemoteError:
    """The server's own message (OpenAI's error shape, or its text) with what the status means."""
    try:
        payload = json.loads(err.read() or b"{}")
    except (json.JSONDecodeError, OSError):
        payload = {}
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else (error if isinstance(error, str) else None)
    code = error.get("code") if isinstance(error, dict) else None
    if err.code == 401:
        hint = "The server wants an API key, or another one."
    elif err.code == 404:
        hint = f"The server does not know this model or endpoint ({endpoint.model or 'no model chosen'})."
    elif err.code in (429, 503):
        hint = "The server is busy; try again in a moment."
    else:
        hint = f"The server answered {err.code}."
    return RemoteError(f"{hint} {message}" if message else hint, status=err.code, code=code)


def list_models(endpoint: Endpoint) -> list[str]:
    """The model ids the server offers (`GET /models`), for the user to pick one."""
    with _request(endpoint.validate(), "/models") as resp:
        try:
            data = json.loads(resp.read())
            return [str(m["id"]) for m in data["data"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RemoteError(f"{endpoint.root}/models did not answer like an OpenAI-compatible server "
                              f"({type(exc).__name__}).") from None


def _events(resp: Any, stop: threading.Event | None) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream, until `[DONE]` or until `stop` is set."""
    for raw in resp:
        if stop is not None and stop.is_set():
            return
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError:
            continue


def _count(value: Any) -> int | None:
    """A token count a server reported, or None for anything that is not one (bool, negative, text)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _cached_tokens(usage: dict[str, Any], timings: dict[str, Any]) -> int:
    """The prompt tokens the server took from its cache: OpenAI's and vLLM's
    `usage.prompt_tokens_details.cached_tokens`, else llama.cpp's `timings.cache_n`; 0 where the server
    says nothing (Ollama)."""
    details = usage.get("prompt_tokens_details")
    reported = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if reported is None:
        reported = _count(timings.get("cache_n"))
    return reported or 0


class RemoteEngine:
    """Chats answered by a remote OpenAI-compatible server (see the module docstring).

    Thread-safe for what it holds (nothing but the endpoint): each turn is one request.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint.validate()

    def models(self) -> list[str]:
        return list_models(self.endpoint)

    def request_body(self, history: Sequence[Any], settings: ChatSettings) -> dict[str, Any]:
        """The chat request for `history` (messages with role and content; a stopped reply is sent as it is)."""
        messages: list[dict[str, str]] = []
        if settings.system_prompt:
            messages.append({"role": "system", "content": settings.system_prompt})
        messages.extend({"role": m.role, "content": m.content} for m in history)
        s = settings.sampling
        body: dict[str, Any] = {"model": self.endpoint.model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": s.temperature,
                                "top_p": s.top_p, "max_tokens": s.max_new_tokens}
        if s.seed is not None:
            body["seed"] = s.seed
        if s.min_new_tokens:
            body["min_tokens"] = s.min_new_tokens  # vLLM's and Cachet's name; only sent when asked for
        return body

    def run_turn(self, chat_id: int, history: Sequence[Any], settings: ChatSettings, *,
                 on_delta: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                 turn_id: int = 0) -> TurnDone:
        """Answer the chat as `history` has it, streaming; never raises for what a turn meets."""
        if stop is not None and stop.is_set():
            return TurnDone(chat_id, turn_id, "", "cancelled")
        started = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        timings: dict[str, Any] = {}
        finish = "length"
        chunks = 0
        try:
            with _request(self.endpoint, "/chat/completions", self.request_body(history, settings),
                          timeout=READ_TIMEOUT_S) as resp:
                for event in _events(resp, stop):
                    if "error" in event:
                        err = event["error"]
                        message = err.get("message") if isinstance(err, dict) else str(err)
                        raise RemoteError(f"The server stopped the reply: {message}")
                    if event.get("usage"):
                        usage = event["usage"]
                    if isinstance(event.get("timings"), dict):  # llama.cpp's server: its slot's reuse is cache_n
                        timings = event["timings"]
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            first = first or time.perf_counter()
                            chunks += 1
                            pieces.append(text)
                            if on_delta is not None:
                                on_delta(text)
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
        except RemoteError as exc:
            reply = "".join(pieces)
            kind = "context_overflow" if exc.code == "context_length_exceeded" else OTHER_ERROR
            finish_reason = "overflow" if kind == "context_overflow" else "error"
            return TurnDone(chat_id, turn_id, reply, finish_reason, has_reply=bool(reply), error=str(exc),
                            error_kind=kind)
        except (OSError, TimeoutError) as exc:  # the connection broke mid-reply
            reply = "".join(pieces)
            return TurnDone(chat_id, turn_id, reply, "error", has_reply=bool(reply),
                            error=f"The connection to {self.endpoint.root} broke ({exc}).", error_kind=OTHER_ERROR)
        ended = time.perf_counter()
        if stop is not None and stop.is_set():
            finish = "cancelled"
        reply = "".join(pieces)
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or chunks)
        cached = _cached_tokens(usage, timings)
        decode = ended - first if first is not None else 0.0
        stats = TurnStats(prompt_tokens=prompt, reused_tokens=cached, prefilled_tokens=max(prompt - cached, 0),
                          generated_tokens=completion, ttft_ms=((first or ended) - started) * 1000,
                          decode_tok_s=max(completion - 1, 0) / decode if decode > 0 else 0.0, cache_tokens=0,
                          cache_bytes=0, finish_reason=finish)
        return TurnDone(chat_id, turn_id, reply, finish, has_reply=bool(reply) or finish in ("stop", "length"),
                        stats=stats)
