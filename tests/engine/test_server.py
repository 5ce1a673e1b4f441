"""The OpenAI-compatible server, driven by the official `openai` client against a server on a free
loopback port: streaming and not, caches reused across requests without any conversation id, two
interleaved conversations each keeping its cache, a dropped connection stopping generation, and the
errors a client meets (auth, malformed JSON, unknown model, oversized body, context overflow, busy)."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import openai
import pytest

from engine.models import LoadedModel
from engine.server import BackgroundServer, Job, StopMatcher
from engine.session import common_prefix_length
from engine.specs import CacheSpec, SamplingSettings
from engine.store import ChatSettings

MODEL = "tiny-llama"
# Speculative decoding is not what these tests are about: one token per step keeps counts exact.
GREEDY = ChatSettings(sampling=SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=16),
                      cache=CacheSpec("dynamic"), speculative="off")
Serve = Callable[..., BackgroundServer]
HELD = 5  # tokens a held reply has produced when its client goes away


@pytest.fixture
def serve(tiny_server: Callable[..., BackgroundServer]) -> Serve:
    """Start a server on the tiny model on a free loopback port; stopped after the test."""
    return lambda **config: tiny_server(MODEL, GREEDY, **config)


def client(http: BackgroundServer, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=http.base_url, api_key=key, max_retries=0, timeout=60)


def post(http: BackgroundServer, path: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{http.port}{path}", data=data, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_chat_completion_streaming_and_not_give_the_same_greedy_reply(serve: Serve) -> None:
    http = serve()
    c = client(http)
    assert [m.id for m in c.models.list()] == [MODEL]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello to the cache."}]
    whole = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    reply = whole.parse()
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage is not None
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 20
    assert int(whole.headers["x-cachet-prompt-tokens"]) == reply.usage.prompt_tokens

    pieces, usage = [], None
    for chunk in c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == text
    # the same prompt again: all of it but the last token came from the first request's cache
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1

    raw = c.completions.create(model=MODEL, prompt="The cache keeps", max_tokens=8, temperature=0)
    assert raw.choices[0].finish_reason in ("stop", "length") and raw.usage.completion_tokens <= 8


def test_a_multi_turn_conversation_reuses_the_previous_prompt_without_a_conversation_id(serve: Serve) -> None:
    c = client(serve())
    messages: list[dict[str, str]] = [{"role": "system", "content": "You answer questions about caches."}]
    previous_prompt = 0
    for turn, question in enumerate(["What is a KV cache?", "Why keep it between turns?", "And on disk?",
                                     "How big does it get?"]):
        messages.append({"role": "user", "content": question})
        reply = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
        usage = reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens or 0
        if turn:
            assert cached >= 0.9 * previous_prompt, (turn, cached, previous_prompt)
        else:
            assert cached == 0
        previous_prompt = usage.prompt_tokens
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})


def test_two_interleaved_conversations_each_keep_their_cache_and_match_a_lone_run(serve: Serve) -> None:
    http = serve()
    c = client(http)
    system = {"role": "system", "content": "A shared system prompt that both conversations start with. " * 3}
    talks: dict[str, list[dict[str, str]]] = {"a": [system], "b": [system]}
    questions = {"a": ["Tell me about apples.", "And pears?", "Which is sweeter?"],
                 "b": ["Explain rivers.", "Where do they end?", "Name a long one."]}
    replies: dict[str, list[str]] = {"a": [], "b": []}
    previous: dict[str, int] = {}
    tokenizer = http.server.service.lm.tokenizer  # type: ignore[union-attr]

    def prompt_ids(name: str) -> list[int]:  # the first prompt as the server renders it (ChatML)
        text = tokenizer.apply_chat_template(talks[name][:2], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    for i in range(3):
        for name in ("a", "b"):
            talks[name].append({"role": "user", "content": questions[name][i]})
            r = c.chat.completions.create(model=MODEL, messages=talks[name], temperature=0, max_tokens=12)
            text = r.choices[0].message.content or ""
            cached = r.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
            if i:  # the conversation's own earlier turns came from its own cache
                assert cached >= 0.9 * previous[name], (name, i, cached)
            elif name == "b":  # its first turn started from a copy of what it shares with a's first prompt
                assert cached == common_prefix_length(prompt_ids("a"), prompt_ids("b")), cached
            previous[name] = r.usage.prompt_tokens  # type: ignore[union-attr]
            replies[name].append(text)
            talks[name].append({"role": "assistant", "content": text})

    alone = client(serve())  # a fresh server: conversation b alone gives the same replies
    talk = [system]
    for i, q in enumerate(questions["b"]):
        talk.append({"role": "user", "content": q})
        text = alone.chat.completions.create(model=MODEL, messages=talk, temperature=0, max_tokens=12).choices[0]
        assert text.message.content == replies["b"][i]
        talk.append({"role": "assistant", "content": text.message.content or ""})


def test_a_dropped_stream_stops_generation_within_a_token(serve: Serve, tiny_lm: LoadedModel) -> None:
    """The client reads the first chunk and closes its socket while the reply is held after HELD tokens; once
    the server has seen the disconnect, the turn ends with the token whose forward pass was running then."""
    http = serve(max_tokens_limit=100_000)
    worker = http.server.worker
    held, release = threading.Event(), threading.Event()
    decodes = 0

    def hold(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal decodes
        if kwargs["input_ids"].shape[-1] == 1:  # a decode step (the prompt is prefilled in one pass)
            decodes += 1
            if decodes == HELD:
                held.set()
                release.wait(30)

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "stream": True,
                       "max_tokens": 900, "min_tokens": 900}).encode()  # no end-of-turn before 900 tokens
    handle = tiny_lm.model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        sock = socket.create_connection(("127.0.0.1", http.port), timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        first = b""
        while b"data:" not in first:  # the response's head and its first chunk
            first += sock.recv(4096)
        assert held.wait(30), "the reply never reached its held token"
        job = worker.current
        assert job is not None and not job.stop.is_set()
        sock.close()  # the client goes away mid-reply
        assert job.stop.wait(30), "the server never noticed the disconnect"
    finally:
        release.set()
        handle.remove()
    # The worker answers one request at a time: once the next one is answered, the dropped one has ended.
    status, after = post(http, "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode())
    assert status == 200 and after["usage"]["completion_tokens"] == 4
    dropped = worker.turns[-2]
    assert dropped.finish_reason == "cancelled" and dropped.stats is not None
    assert dropped.stats.generated_tokens == HELD + 1  # HELD before the disconnect, one in flight when it came
    assert http.server.stats.cancelled == 1


def test_auth_is_required_when_a_key_is_set(serve: Serve) -> None:
    http = serve(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError):
        client(http, "wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(http, "wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in client(http, "s3cret").models.list()] == [MODEL]


def test_bad_requests_get_openai_shaped_errors(serve: Serve) -> None:
    http = serve(max_body_bytes=4096)
    c = client(http)
    status, body = post(http, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as unknown:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "tiny-llama" in str(unknown.value)
    status, body = post(http, "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError, match="last message must be the user"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="above this server's limit"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="Unknown cache strategy 'sparkly'"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                  extra_body={"cachet": {"cache": "sparkly"}})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=9)
    status, body = post(http, "/v1/nowhere", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_a_context_overflow_is_a_400_with_the_policy_message_and_sink_continues(serve: Serve) -> None:
    http = serve(max_body_bytes=2**20)
    c = client(http)
    long = [{"role": "user", "content": "word " * 400}]  # 2,000 tokens: past the tiny model's 1,024
    with pytest.raises(openai.BadRequestError) as overflow:
        c.chat.completions.create(model=MODEL, messages=long, max_tokens=8)
    assert overflow.value.code == "context_length_exceeded" and "overflow policy" in str(overflow.value)
    reply = c.chat.completions.create(model=MODEL, messages=long, max_tokens=8,
                                      extra_body={"cachet": {"overflow": "sink"}})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_full_queue_answers_503_with_retry_after(serve: Serve) -> None:
    """One request runs (held), one waits in the queue of one: a third is answered 503 at once, with
    `Retry-After`, and the two others are answered once the first is let go."""
    http = serve(max_queue=1)
    worker = http.server.worker
    running, queued, gate = threading.Event(), threading.Event(), threading.Event()
    run, submit = worker.run, worker.submit

    def held_run(job: Job) -> Any:
        running.set()
        gate.wait(30)
        return run(job)

    def noted_submit(job: Job) -> None:
        submit(job)
        if running.is_set():
            queued.set()

    worker.run, worker.submit = held_run, noted_submit  # type: ignore[method-assign]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    results: list[int] = []

    def ask() -> None:
        results.append(post(http, "/v1/chat/completions", body)[0])

    first, second = threading.Thread(target=ask), threading.Thread(target=ask)
    try:
        first.start()
        assert running.wait(30)  # the worker holds the first request
        second.start()
        assert queued.wait(30)  # the second waits in the queue
        req = urllib.request.Request(f"http://127.0.0.1:{http.port}/v1/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(req, timeout=60)
        assert busy.value.code == 503 and busy.value.headers["retry-after"] == "1"
        assert json.loads(busy.value.read())["error"]["code"] == "server_busy"
    finally:
        gate.set()
        first.join(30)
        second.join(30)
    assert results == [200, 200] and http.server.stats.rejected_busy == 1


def test_stop_strings_are_never_sent() -> None:
    m = StopMatcher(["END", "\n\n"])
    out = m.push("Hello E") + m.push("N") + m.push("o wait\n") + m.push("\nmore")
    assert out == "Hello ENo wait" and m.hit
    m = StopMatcher(["xyz"])
    assert m.push("ab x") + m.flush() == "ab x" and not m.hit


def test_the_server_refuses_to_listen_off_loopback_without_a_key(tiny_lm: LoadedModel) -> None:
    from engine.cli import build_parser
    from engine.server import config_from_args

    args = build_parser().parse_args(["serve", "--host", "0.0.0.0"])
    with pytest.raises(ValueError, match="--api-key"):
        config_from_args(args, "m")
    ok = config_from_args(build_parser().parse_args(["serve", "--host", "0.0.0.0", "--no-auth"]), "m (bundled)")
    assert ok.api_key is None and ok.model_id == "m"
    keyed = config_from_args(build_parser().parse_args(["serve", "--host", "0.0.0.0", "--api-key", "k",
                                                        "--cache", "sink"]), "m")
    assert keyed.api_key == "k" and keyed.defaults.cache.strategy == "sink"
    assert replace(keyed.defaults, cache=CacheSpec()).overflow == "stop"


# ----- the remote engine: Cachet's window driving a server (here Cachet's own) -------------------------
def test_the_remote_engine_streams_stops_and_reports_the_servers_cache(serve: Serve, tiny_lm: LoadedModel) -> None:
    from engine.remote import Endpoint, RemoteEngine, RemoteError
    from engine.session import Message

    http = serve(api_key="k3y")
    with pytest.raises(RemoteError, match="API key"):
        RemoteEngine(Endpoint(http.base_url, MODEL, "wrong")).models()
    remote = RemoteEngine(Endpoint(http.base_url, MODEL, "k3y"))
    assert remote.models() == [MODEL]
    settings = replace(GREEDY, system_prompt="You are brief.")
    history = [Message("user", "What is a cache?")]
    deltas: list[str] = []
    first = remote.run_turn(7, history, settings, on_delta=deltas.append)
    assert first.finish_reason in ("stop", "length") and first.has_reply and "".join(deltas) == first.reply
    assert first.stats is not None and first.stats.prompt_tokens > 0 and first.stats.reused_tokens == 0

    history += [Message("assistant", first.reply), Message("user", "And why keep it?")]
    second = remote.run_turn(7, history, settings)
    assert second.stats is not None and second.stats.reused_tokens >= 0.9 * first.stats.prompt_tokens

    regenerated = remote.run_turn(7, history, settings)  # the same request again: the same greedy reply
    assert regenerated.reply == second.reply

    stop = threading.Event()
    long = replace(settings, sampling=replace(settings.sampling, max_new_tokens=600, min_new_tokens=600))

    seen: list[str] = []

    def stop_after_two(text: str) -> None:  # the user presses Stop after two pieces of the reply
        seen.append(text)
        if len(seen) == 2:
            stop.set()

    worker = http.server.worker
    decodes = 0

    def hold_until_the_server_stops(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # After a few tokens the server's generation waits until the server has seen the client go: a fast CPU
        # cannot write all 600 tokens before the closed stream is noticed.
        nonlocal decodes
        if kwargs["input_ids"].shape[-1] == 1:
            decodes += 1
            job = worker.current
            if decodes == 4 and job is not None:
                job.stop.wait(30)

    handle = tiny_lm.model.register_forward_pre_hook(hold_until_the_server_stops, with_kwargs=True)
    try:
        stopped = remote.run_turn(7, history, long, on_delta=stop_after_two, stop=stop)
    finally:
        handle.remove()
    assert stopped.finish_reason == "cancelled"
    # The worker answers one request at a time: once the next one is answered, the stopped one has ended.
    assert remote.run_turn(7, history, settings).finish_reason in ("stop", "length")
    assert http.server.stats.cancelled == 1  # closing the stream stopped the server's generation

    unknown = RemoteEngine(Endpoint(http.base_url, "nope", "k3y")).run_turn(7, history, settings)
    assert unknown.finish_reason == "error" and "does not know this model" in (unknown.error or "")
    down = RemoteEngine(Endpoint("http://127.0.0.1:9/v1", MODEL)).run_turn(7, history, settings)
    assert down.finish_reason == "error" and "Cannot reach the server" in (down.error or "")
    with pytest.raises(RemoteError, match="not a server address"):
        Endpoint("localhost:8471").validate()


# What other servers send at the end of a stream (a small fake: only their final chunks differ).
LLAMA_CPP_END = {"choices": [], "usage": {"prompt_tokens": 120, "completion_tokens": 2, "total_tokens": 122},
                 "timings": {"cache_n": 100, "prompt_n": 20, "predicted_n": 2}}  # older llama-server: no details
VLLM_END = {"choices": [], "usage": {"prompt_tokens": 120, "completion_tokens": 2,
                                     "prompt_tokens_details": {"cached_tokens": 96}}}
OLLAMA_END = {"choices": [], "usage": {"prompt_tokens": 120, "completion_tokens": 2, "total_tokens": 122}}


@pytest.mark.parametrize(("final", "cached"), [(LLAMA_CPP_END, 100), (VLLM_END, 96), (OLLAMA_END, 0)],
                         ids=["llama.cpp", "vllm", "ollama"])
def test_the_remote_engine_reads_each_servers_way_of_reporting_its_cache(final: dict[str, Any], cached: int) -> None:
    import http.server

    from engine.remote import Endpoint, RemoteEngine
    from engine.session import Message

    bodies: list[dict[str, Any]] = []

    class Fake(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for chunk in ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
                          {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}, final):
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = RemoteEngine(Endpoint(f"http://127.0.0.1:{server.server_address[1]}/v1", "m"))
        done = remote.run_turn(1, [Message("user", "Hi")], GREEDY)
    finally:
        server.shutdown()
        server.server_close()
    assert done.reply == "Hello" and done.finish_reason == "stop"
    assert done.stats is not None and done.stats.prompt_tokens == 120 and done.stats.generated_tokens == 2
    assert done.stats.reused_tokens == cached and done.stats.prefilled_tokens == 120 - cached
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}


def test_api_keys_stay_in_a_file_only_the_user_can_read(tmp_path: Any) -> None:
    import stat

    from engine import api_keys

    api_keys.save("http://big-box:8000/v1", "secret", folder=tmp_path, use_keyring=False)
    path = api_keys.key_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert api_keys.load("http://big-box:8000/v1", folder=tmp_path, use_keyring=False) == "secret"
    api_keys.save("http://big-box:8000/v1", "", folder=tmp_path, use_keyring=False)
    assert api_keys.load("http://big-box:8000/v1", folder=tmp_path, use_keyring=False) is None
