"""The server's own safety, whoever starts it: no listening beyond loopback without a key, only loopback
`Host` names on a keyless server (DNS rebinding), no requests from web pages unless CORS is opened to
their origin, JSON bodies only, the key on every endpoint, the body's size bound however it is sent,
and bad input answered 400 in OpenAI's shape (never a 500), including what the server does not do."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import Callable
from typing import Any

import openai
import pytest

from engine.reports import Budgets
from engine.server import BackgroundServer, CachetServer, ServerConfig
from engine.service import ChatService
from engine.specs import CacheSpec, SamplingSettings
from engine.store import ChatSettings

MODEL = "tiny-llama"
GREEDY = ChatSettings(sampling=SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=4),
                      cache=CacheSpec("dynamic"), speculative="off")
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
JSON = {"content-type": "application/json"}
Serve = Callable[..., BackgroundServer]


@pytest.fixture
def serve(tiny_server: Callable[..., BackgroundServer]) -> Serve:
    """Start a server on the tiny model on a free loopback port; stopped after the test."""
    return lambda **config: tiny_server(MODEL, GREEDY, **config)


def call(srv: BackgroundServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request with exactly these headers (a `Host` given here replaces the real one):
    (status, headers in lower case, the JSON body or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        got = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        parsed = json.loads(data) if data else None
    except json.JSONDecodeError:  # a plain-text 500 is what these tests must never see
        parsed = data.decode(errors="replace")
    return resp.status, got, parsed


def code(answer: tuple[int, dict[str, str], Any]) -> tuple[int, str | None]:
    status, _, body = answer
    return status, body["error"]["code"] if isinstance(body, dict) and "error" in body else None


def asgi(app: Any, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    """One request straight into the ASGI app, without a socket (for addresses a test must not listen on)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("192.168.1.7", 50000), "server": ("192.168.1.5", 8471),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


@pytest.fixture
def idle_service() -> Any:
    """A service with no model: enough for a server that is built and never started."""
    service = ChatService(budgets=Budgets(disk=0))
    yield service
    service.close(save=False)


# ----- where it listens -----------------------------------------------------------------------------
def test_a_server_without_a_key_refuses_to_listen_beyond_loopback(idle_service: ChatService) -> None:
    from engine.server_http import UnsafeBindError, is_loopback

    for host in ("0.0.0.0", "::", "", "192.168.1.5", "my-laptop"):
        with pytest.raises(UnsafeBindError, match=r"no API key: give it one \(--api-key KEY\)"):
            BackgroundServer(CachetServer(idle_service, ServerConfig(MODEL)), host, 0)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):  # built, never started: nothing listens
        BackgroundServer(CachetServer(idle_service, ServerConfig(MODEL)), host, 0)
    assert BackgroundServer(CachetServer(idle_service, ServerConfig(MODEL)), "::1", 8471).base_url == (
        "http://[::1]:8471/v1")  # the address clients are told, IPv6 in brackets
    BackgroundServer(CachetServer(idle_service, ServerConfig(MODEL, api_key="k")), "0.0.0.0", 0)
    BackgroundServer(CachetServer(idle_service, ServerConfig(MODEL, no_auth=True)), "0.0.0.0", 0)
    assert is_loopback("[::1]") and is_loopback("LOCALHOST") and not is_loopback("localhost.evil.example")


def test_the_serve_command_refuses_before_loading_a_model(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from engine import models
    from engine.cli import build_parser
    from engine.server import cmd_serve, config_from_args

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the flags must be refused before any model is loaded")

    monkeypatch.setattr(models, "load", no_load)
    assert cmd_serve(build_parser().parse_args(["serve", "--host", "0.0.0.0"])) == 2
    assert "--api-key" in capsys.readouterr().err
    assert cmd_serve(build_parser().parse_args(["serve", "--cors-origins", "localhost:3000"])) == 2
    assert "http://localhost:3000" in capsys.readouterr().err  # what an origin looks like
    with socket.socket() as busy:  # a port in use is said before the model loads, not after
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cmd_serve(build_parser().parse_args(["serve", "--port", str(port)])) == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    opened = config_from_args(build_parser().parse_args(
        ["serve", "--allowed-hosts", "mybox.local", "--cors-origins", "http://LocalHost:3000/", "null"]), "m")
    assert opened.allowed_hosts == ("mybox.local",) and opened.cors_origins == ("http://localhost:3000", "null")


# ----- who may ask ----------------------------------------------------------------------------------
def test_a_keyless_server_answers_only_requests_addressed_to_loopback_names(serve: Serve) -> None:
    srv = serve()
    for host in ("127.0.0.1", f"127.0.0.1:{srv.port}", "localhost:1234", "LocalHost", "[::1]:8471", "[::1]"):
        assert call(srv, "GET", "/v1/models", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{srv.port}", "localhost.evil.example", "192.168.1.5:8471"):
        status, _, body = call(srv, "POST", "/v1/chat/completions", CHAT, {"Host": host, **JSON})
        assert (status, body["error"]["code"]) == (400, "host_not_allowed"), host
        assert "--allowed-hosts" in body["error"]["message"]
    assert srv.server.stats.served == 0  # nothing generated for a rebound name

    allowed = serve(allowed_hosts=("MyBox.local",))
    assert call(allowed, "GET", "/v1/models", headers={"Host": "mybox.local:8471"})[0] == 200
    assert call(allowed, "GET", "/v1/models", headers={"Host": "localhost"})[0] == 200
    assert code(call(allowed, "GET", "/v1/models", headers={"Host": "evil.example"})) == (400, "host_not_allowed")


def test_a_keyed_server_beyond_loopback_answers_any_host_name(idle_service: ChatService) -> None:
    keyed = CachetServer(idle_service, ServerConfig(MODEL, api_key="k"))
    keyed.bind("0.0.0.0")
    assert asgi(keyed.app, "GET", "/v1/models", {"host": "192.168.1.5:8471", "authorization": "Bearer k"})[0] == 200
    assert asgi(keyed.app, "GET", "/v1/models", {"host": "192.168.1.5:8471"})[0] == 401
    keyless = CachetServer(idle_service, ServerConfig(MODEL, no_auth=True))  # the user's --no-auth
    keyless.bind("0.0.0.0")
    assert asgi(keyless.app, "GET", "/v1/models", {"host": "192.168.1.5:8471"})[0] == 400
    on_loopback = CachetServer(idle_service, ServerConfig(MODEL, api_key="k"))
    on_loopback.bind("127.0.0.1")
    assert asgi(on_loopback.app, "GET", "/v1/models", {"host": "evil.example", "authorization": "Bearer k"})[0] == 400


def test_web_pages_are_refused_unless_cors_is_opened_to_their_origin(serve: Serve) -> None:
    closed = serve()
    page = {"Origin": "http://evil.example"}
    status, headers, body = call(closed, "GET", "/v1/models", headers=page)
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    assert "--cors-origins" in body["error"]["message"]
    assert "access-control-allow-origin" not in headers
    preflight = {**page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = call(closed, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 403 and "access-control-allow-origin" not in headers  # the browser sends nothing more
    assert code(call(closed, "POST", "/v1/chat/completions", CHAT, {**page, **JSON})) == (403, "origin_not_allowed")
    assert closed.server.stats.served == 0

    opened = serve(cors_origins=("http://localhost:3000",), api_key="k")
    mine = {"Origin": "http://localhost:3000"}
    status, headers, _ = call(opened, "OPTIONS", "/v1/chat/completions",
                              headers={**mine, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204 and headers["access-control-allow-origin"] == "http://localhost:3000"
    assert {"authorization", "content-type"} <= {h.strip() for h in headers["access-control-allow-headers"].split(",")}
    status, headers, body = call(opened, "POST", "/v1/chat/completions", CHAT,
                                 {**mine, **JSON, "Authorization": "Bearer k"})
    assert status == 200 and body["choices"][0]["message"]["content"] is not None
    assert headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-cachet-cached-tokens" in headers["access-control-expose-headers"]
    status, headers, _ = call(opened, "GET", "/v1/models", headers=mine)  # no key: refused, readable by the page
    assert status == 401 and headers["access-control-allow-origin"] == "http://localhost:3000"
    assert code(call(opened, "GET", "/v1/models", headers={**page, "Authorization": "Bearer k"}))[0] == 403


def test_a_post_whose_body_is_not_declared_json_is_refused_before_anything_runs(serve: Serve) -> None:
    srv = serve()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, body = call(srv, "POST", "/v1/chat/completions", CHAT, {"Content-Type": content_type})
        assert (status, body["error"]["code"]) == (415, "unsupported_media_type"), content_type
        assert "Content-Type: application/json" in body["error"]["message"]
    assert code(call(srv, "POST", "/v1/completions", CHAT))[0] == 415  # no Content-Type at all
    assert srv.server.stats.served == 0
    json_with_charset = {"Content-Type": "Application/JSON; charset=utf-8"}
    assert call(srv, "POST", "/v1/chat/completions", CHAT, json_with_charset)[0] == 200


def test_the_key_guards_every_endpoint_health_included(serve: Serve) -> None:
    srv = serve(api_key="s3cret")
    for path in ("/health", "/v1/models", "/v1/nowhere"):
        assert code(call(srv, "GET", path)) == (401, "invalid_api_key"), path
    status, _, health = call(srv, "GET", "/health", headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and health["model"] == MODEL


# ----- what a body may be ---------------------------------------------------------------------------
def _padded(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes (OpenAI's `user` field, which the server ignores, pads it)."""
    head = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "user": ""})
    return (head[:-2] + "x" * (size - len(head)) + '"}').encode()


def _chunked(srv: BackgroundServer, data: bytes) -> tuple[int, Any]:
    """Send `data` as a chunked body, without the last (empty) chunk, and read the answer: a server that
    waited for the whole body would never answer."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(data), 65536):
            part = data[i:i + 65536]
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 2:
            got = sock.recv(65536)
            if not got:
                break
            answer += got
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    chunk = body.split(b"\r\n")[1] if b"transfer-encoding: chunked" in head.lower() else body
    return status, json.loads(chunk)


def test_the_body_bound_holds_at_4_mib_declared_or_streamed(serve: Serve) -> None:
    srv = serve()  # the default limit
    limit = ServerConfig(MODEL).max_body_bytes
    assert limit == 4 * 2**20
    assert call(srv, "POST", "/v1/chat/completions", _padded(limit), JSON)[0] == 200  # exactly the limit: answered
    status, _, body = call(srv, "POST", "/v1/chat/completions", _padded(limit + 1), JSON)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    status, body = _chunked(srv, _padded(limit + 100)[:limit + 1])  # no Content-Length, and never finished
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert srv.server.stats.served == 1


def test_malformed_text_and_nesting_get_a_400_with_the_reason_never_a_500(serve: Serve) -> None:
    srv = serve()
    deep = b'{"model": "tiny-llama", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, _, body = call(srv, "POST", "/v1/chat/completions", deep, JSON)
    assert (status, body["error"]["code"]) == (400, "invalid_json") and "nested" in body["error"]["message"]
    shallow = b'{"model": "tiny-llama", "messages": ' + b"[" * 100 + b"]" * 100 + b"}"  # json parses it; we do not
    assert code(call(srv, "POST", "/v1/chat/completions", shallow, JSON)) == (400, "invalid_json")
    surrogate = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    status, _, body = call(srv, "POST", "/v1/chat/completions", surrogate, JSON)
    assert status == 400 and "messages[0].content" in body["error"]["message"]
    assert "surrogate" in body["error"]["message"]
    status, _, body = call(srv, "POST", "/v1/chat/completions", CHAT.replace(b'"max_tokens": 2', b'"max_tokens": NaN'),
                           JSON)
    assert (status, body["error"]["code"]) == (400, "invalid_json") and "NaN" in body["error"]["message"]
    assert call(srv, "POST", "/v1/chat/completions", CHAT, JSON)[0] == 200  # and it goes on answering


def test_a_request_without_a_model_is_told_which_one_to_name(serve: Serve) -> None:
    srv = serve()
    status, _, body = call(srv, "POST", "/v1/chat/completions",
                           json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), JSON)
    assert (status, body["error"]["param"]) == (400, "model")
    assert body["error"]["message"] == f"'model' is required: this server serves '{MODEL}' (see /v1/models)."


def test_what_the_server_does_not_do_is_refused_not_ignored(serve: Serve) -> None:
    srv = serve()
    c = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=60)
    hi = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused: list[tuple[str, dict[str, Any]]] = [
        ("logprobs", {"logprobs": True}), ("top_logprobs", {"top_logprobs": 2}), ("tools", {"tools": [tool]}),
        ("tool_choice", {"tool_choice": "required"}), ("response_format", {"response_format": {"type": "json_object"}}),
        ("logit_bias", {"logit_bias": {"65": 100}}),
    ]
    for param, extra in refused:
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model=MODEL, messages=hi, max_tokens=2, **extra)  # type: ignore[call-overload]
        assert err.value.param == param and "not supported" in str(err.value), param
    with pytest.raises(openai.BadRequestError, match="'logprobs'"):
        c.completions.create(model=MODEL, prompt="The cache", max_tokens=2, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="'echo'"):
        c.completions.create(model=MODEL, prompt="The cache", max_tokens=2, echo=True)
    assert srv.server.stats.served == 0
    # what asks for nothing passes
    fine = c.chat.completions.create(model=MODEL, messages=hi, max_tokens=2, tools=[], tool_choice="none",
                                     logprobs=False, response_format={"type": "text"})
    assert fine.choices[0].finish_reason in ("stop", "length")
