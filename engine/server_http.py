"""The OpenAI-compatible server's edge: what a request must be before any endpoint sees it.

A server on loopback without a key is reachable by every web page the user opens: a page may send a
"simple" cross-origin request (`Content-Type: text/plain`, no preflight) that starts a generation, and
through DNS rebinding (its own name re-pointed at 127.0.0.1) read the reply too. So the rules live in
the server itself, not in its callers:

- `check_bind`: no listening beyond loopback without an API key, unless the user asked for it.
- `EdgeGuard` (ASGI middleware, every request): the `Host` must be a loopback name (or one the user
  allowed; any name for a keyed server listening beyond loopback), a request from a web page (it carries
  `Origin`) must come from an origin the user opened CORS to, the API key when one is set (`/health`
  included), and a POST's body must be declared JSON (415 otherwise).
- `read_json_body`: the body's size bound (declared or streamed), then JSON that is an object, nested
  sanely, with valid Unicode text.

Every refusal is an `ApiError` answered in OpenAI's error shape.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Host names that only ever mean this computer; any port goes with them.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_JSON_DEPTH = 64  # an OpenAI request nests a few levels (messages → content parts); refuse deeper bodies
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "authorization, content-type"
CORS_EXPOSED = "x-cachet-prompt-tokens, x-cachet-cached-tokens, x-cachet-cache-source, x-cachet-ttft-ms, retry-after"


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


class ClientGone(Exception):
    """The client disconnected before its request's body arrived: there is no one to answer."""


class UnsafeBindError(ValueError):
    """Listening beyond loopback without an API key (and without the user saying so)."""


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address or a `Host` name without its port) can only mean this computer.

    "localhost" and loopback IP literals (127.0.0.0/8, ::1) do; any other name might resolve anywhere,
    and an empty host or 0.0.0.0 / :: is every interface.
    """
    name = host.strip().lower().removesuffix(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """`host` as it goes in a URL: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_bind(host: str, api_key: str | None, no_auth: bool) -> None:
    """Refuse to listen on `host` when that reaches other machines and no API key guards it.

    Raises:
        UnsafeBindError: with the sentence for the user.
    """
    if is_loopback(host) or api_key or no_auth:
        return
    where = host or "every interface"
    raise UnsafeBindError(f"Listening on {where} would let other machines use this server, and it has no API key: "
                          "give it one (--api-key KEY), or listen on 127.0.0.1 only.")


def host_name(value: str) -> str:
    """The name part of a `Host` header value ("[::1]:8471" → "::1", "LocalHost:80" → "localhost")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name, colon, port = value.rpartition(":")
    return (name if colon and port.isdigit() else value).removesuffix(".")


def normalize_origin(origin: str) -> str:
    """An origin as browsers send it: scheme://host[:port], lower case, no path; "*" and "null" as they are.

    Raises:
        ValueError: when `origin` is not one.
    """
    origin = origin.strip()
    if origin in ("*", "null"):
        return origin
    scheme, sep, rest = origin.partition("://")
    if not sep or not scheme or not rest or "/" in rest.rstrip("/") or scheme.lower() not in ("http", "https"):
        raise ValueError(f"{origin!r} is not a web origin: write it as a browser sends it, e.g. "
                         "http://localhost:3000 (scheme, host and port; no path).")
    return f"{scheme.lower()}://{rest.rstrip('/').lower()}"


@dataclass(frozen=True)
class EdgePolicy:
    """Who may reach the endpoints at all.

    api_key: required as `Authorization: Bearer KEY` on every request when set.
    allowed_hosts: `Host` names accepted besides the loopback ones ("*": any).
    any_host: a keyed server listening beyond loopback accepts any `Host` name (its clients reach it by
        names and addresses it cannot know; a page that rebinds a name to it still lacks the key).
    cors_origins: web origins whose pages may call the server ("*": any page); none: CORS stays closed.
    """

    api_key: str | None = None
    allowed_hosts: frozenset[str] = frozenset()
    any_host: bool = False
    cors_origins: frozenset[str] = frozenset()

    @classmethod
    def for_bind(cls, bind_host: str | None, api_key: str | None, allowed_hosts: Iterable[str],
                 cors_origins: Iterable[str]) -> EdgePolicy:
        """The policy of a server listening on `bind_host` (None: not listening, e.g. driven as ASGI alone)."""
        beyond_loopback = bind_host is not None and not is_loopback(bind_host)
        return cls(api_key=api_key, allowed_hosts=frozenset(host_name(h) if h != "*" else h for h in allowed_hosts),
                   any_host=bool(api_key) and beyond_loopback,
                   cors_origins=frozenset(normalize_origin(o) for o in cors_origins))

    def host_allowed(self, name: str) -> bool:
        return self.any_host or "*" in self.allowed_hosts or name in LOOPBACK_NAMES or name in self.allowed_hosts

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.lower() in self.cors_origins


def _single(headers: Headers, name: str) -> str | None:
    values = headers.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"The request has {len(values)} '{name}' headers; send one.", code="invalid_header")
    return values[0] if values else None


def _json_content_type(value: str | None) -> bool:
    essence = (value or "").split(";", 1)[0].strip().lower()
    return essence == "application/json"


class EdgeGuard:
    """ASGI middleware that applies an `EdgePolicy` to every HTTP request before the app runs, answers
    CORS preflights for the origins it allows, and adds the CORS headers to their responses.

    `policy` is read per request (the server learns where it listens only when it binds).
    """

    def __init__(self, app: ASGIApp, policy: Callable[[], EdgePolicy]) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy()
        headers = Headers(scope=scope)
        origin: str | None = None
        try:
            host = _single(headers, "host")
            name = host_name(host or "")
            if not policy.host_allowed(name):
                allowed = ", ".join(sorted({"localhost", "127.0.0.1", "[::1]"} | set(policy.allowed_hosts)))
                raise ApiError(400, f"This server answers only requests addressed to {allowed} (this one was "
                                    f"addressed to {host!r}). If that name is yours, start the server with "
                                    f"--allowed-hosts {name or 'NAME'}.", code="host_not_allowed")
            origin = _single(headers, "origin")
            if origin is not None and not policy.origin_allowed(origin):
                raise ApiError(403, f"Requests from web pages are refused (this one came from {origin}): start the "
                                    f"server with --cors-origins {origin} to let that page use it.",
                               code="origin_not_allowed")
            if origin is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await Response(status_code=204, headers=self._cors(origin, preflight=True))(scope, receive, send)
                return
            self._check_key(policy, headers)
            if scope["method"] == "POST" and not _json_content_type(headers.get("content-type")):
                raise ApiError(415, f"The body must be sent as JSON with 'Content-Type: application/json' (this one "
                                    f"was {headers.get('content-type', 'sent without a Content-Type')!r}; with "
                                    "curl: -H 'Content-Type: application/json').", code="unsupported_media_type")
        except ApiError as exc:
            cors = self._cors(origin) if origin is not None and policy.origin_allowed(origin) else None
            await exc.response(headers=cors)(scope, receive, send)
            return
        if origin is None:
            await self.app(scope, receive, send)
            return
        cors = self._cors(origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(cors)
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _check_key(policy: EdgePolicy, headers: Headers) -> None:
        key = policy.api_key
        if key is None:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "Missing or wrong API key (send 'Authorization: Bearer KEY').", code="invalid_api_key")

    @staticmethod
    def _cors(origin: str, preflight: bool = False) -> dict[str, str]:
        headers = {"access-control-allow-origin": origin, "vary": "Origin"}
        if preflight:
            headers |= {"access-control-allow-methods": CORS_METHODS, "access-control-allow-headers": CORS_HEADERS,
                        "access-control-max-age": "600"}
        else:
            headers["access-control-expose-headers"] = CORS_EXPOSED
        return headers


# ----- the body -----------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ApiError(400, f"The request body is not valid JSON ({name} is not a JSON number).", code="invalid_json")


def _check_values(body: Any) -> None:
    """Refuse bodies nested deeper than MAX_JSON_DEPTH and text that is not valid Unicode (a lone surrogate
    such as "\\ud800" parses as JSON but cannot be encoded, and the tokenizer fails on it)."""
    stack: list[tuple[Any, str, int]] = [(body, "body", 0)]
    while stack:  # iterative: a body just under json's own recursion limit must not exhaust ours
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.",
                           code="invalid_json")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where} is not valid Unicode text: it holds an unpaired surrogate escape "
                                    "(such as \\ud800), which encodes no character.", code="invalid_json") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, f"{where} (a key)", depth + 1))
                stack.append((item, f"{where}.{key}" if where != "body" else str(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read no further than `limit` bytes (declared or streamed: a chunked
    body is cut off as soon as it passes the limit).

    Raises:
        ApiError: 413 past the limit; 400 for what is not a valid JSON object.
        ClientGone: the client disconnected before the body arrived.
    """
    too_large = ApiError(413, f"The request body is larger than this server's limit of {limit:,} bytes.",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    try:
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise too_large
    except ClientDisconnect:
        raise ClientGone from None
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    _check_values(body)
    return body
