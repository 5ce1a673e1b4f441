"""The OpenAI-compatible server measured with the bundled model, on loopback, in one process.

    .venv/bin/python scripts/bench_server.py six-turns [--runs 3] [--max-tokens 48] [--out DIR]
    .venv/bin/python scripts/bench_server.py load [--clients 4] [--requests 20] [--max-tokens 24] [--out DIR]

six-turns: the six turns of tests/data/six_turns.txt through the server (the official `openai` client,
streaming) and through the ChatService the terminal chat uses, alternately in the same process. Per
turn: the server's `cached_tokens`, the client's time to first token, the engine's own TTFT for that
request, their difference (what the HTTP layer adds: JSON, SSE, loopback, the worker's queue) and the
terminal chat's TTFT; medians over the runs. Greedy, so both paths write the same replies (checked).

load: `clients` threads, each sending `requests` chat requests (conversations of 5 turns, greedy) at
once against one server; then every conversation is sent again alone, one request at a time, to a
fresh server. Checks: no error other than a documented 503, and every reply identical to the lone
run's (no cross-talk between conversations); prints latency percentiles and the reuse.

Each saves what it printed and its figures under --out as bench-server-six-turns.* / bench-server-load.*
(scripts/records.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import records  # noqa: E402  (scripts/records.py)

TURNS = (ROOT / "tests" / "data" / "six_turns.txt").read_text(encoding="utf-8").splitlines()
SYSTEM = "You are a helpful assistant."
TOPICS = ["lighthouses", "rivers", "bread", "bicycles", "volcanoes", "libraries", "bees", "trains",
          "glaciers", "chess", "tea", "owls", "bridges", "comets", "markets", "violins"]
FOLLOW_UPS = ["Tell me one fact about {}.", "Why does that matter?", "Give an example.", "Summarize in a line.",
              "One more fact, please."]


def start_server(lm: Any, max_tokens: int, **config: Any) -> tuple[Any, Any]:
    from engine.reports import Budgets
    from engine.server import BackgroundServer, CachetServer, ServerConfig
    from engine.service import ChatService
    from engine.specs import CacheSpec, SamplingSettings
    from engine.store import ChatSettings

    service = ChatService(budgets=Budgets(disk=0))
    service.load_model(lambda: lm)
    defaults = ChatSettings(sampling=SamplingSettings(temperature=0.0, repetition_penalty=1.0,
                                                      max_new_tokens=max_tokens), cache=CacheSpec("dynamic"))
    http = BackgroundServer(CachetServer(service, ServerConfig(model_id="bench", defaults=defaults, **config)), port=0)
    http.start()
    return http, service


def six_turns(lm: Any, runs: int, max_tokens: int, figures: dict[str, Any]) -> None:
    import openai

    from engine.reports import Budgets
    from engine.service import ChatService
    from engine.session import Message
    from engine.specs import CacheSpec, SamplingSettings
    from engine.store import ChatSettings

    settings = ChatSettings(system_prompt=SYSTEM, sampling=SamplingSettings(
        temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_tokens), cache=CacheSpec("dynamic"))
    rows: list[list[dict[str, float]]] = [[] for _ in TURNS]
    different = 0
    for run in range(runs):
        http, service = start_server(lm, max_tokens)
        client = openai.OpenAI(base_url=http.base_url, api_key="none", max_retries=0)
        worker = http.server.worker
        cli = ChatService(budgets=Budgets(disk=0))
        cli.load_model(lambda: lm)
        messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
        history: list[Message] = []
        for i, line in enumerate(TURNS):
            messages.append({"role": "user", "content": line})
            started = time.perf_counter()
            first = None
            pieces, usage = [], None
            for chunk in client.chat.completions.create(model="bench", messages=messages, stream=True,  # type: ignore[call-overload]
                                                        stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            engine_ttft = worker.turns[-1].stats.ttft_ms
            reply = "".join(pieces)
            messages.append({"role": "assistant", "content": reply})

            history.append(Message("user", line))
            done = cli.run_turn(1, history, settings)
            history.append(Message("assistant", done.reply, token_ids=list(done.token_ids)))
            if done.reply != reply:
                different += 1
                print(f"run {run} turn {i + 1}: the server and the CLI wrote different replies", file=sys.stderr)
            client_ttft = ((first or time.perf_counter()) - started) * 1000
            rows[i].append({"prompt": usage.prompt_tokens, "cached": usage.prompt_tokens_details.cached_tokens,
                            "client_ttft": client_ttft, "engine_ttft": engine_ttft,
                            "overhead": client_ttft - engine_ttft, "cli_ttft": done.stats.ttft_ms,
                            "cli_reused": done.stats.reused_tokens})
        http.stop()
        service.close(save=False)
        cli.close(save=False)
    print(f"six turns, {runs} runs, greedy, {max_tokens}-token replies; medians (ms)")
    print("turn  prompt  cached  server TTFT (client)  engine TTFT  HTTP overhead  CLI TTFT  CLI reused")
    for i, row in enumerate(rows):
        def med(k: str, row: list[dict[str, float]] = row) -> float:
            return statistics.median(r[k] for r in row)
        print(f"{i + 1:>4}  {med('prompt'):>6.0f}  {med('cached'):>6.0f}  {med('client_ttft'):>20.1f}  "
              f"{med('engine_ttft'):>11.1f}  {med('overhead'):>13.1f}  {med('cli_ttft'):>8.1f}  "
              f"{med('cli_reused'):>10.0f}")
    overheads = [r["overhead"] for row in rows for r in row]
    print(f"HTTP overhead over all turns: median {statistics.median(overheads):.1f} ms, "
          f"max {max(overheads):.1f} ms")
    figures.update({
        "turns": [{"turn": i + 1, **{k: records.figure(r[k] for r in row) for k in row[0]}}
                  for i, row in enumerate(rows)],
        "http_overhead_ms": records.figure(overheads), "replies_different_from_the_cli": different,
    })


def conversation(client: Any, topic: str, turns: int, out: list[Any], lock: threading.Lock) -> list[str]:
    import openai

    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    replies = []
    for t in range(turns):
        messages.append({"role": "user", "content": FOLLOW_UPS[t % len(FOLLOW_UPS)].format(topic)})
        started = time.perf_counter()
        try:
            r = client.chat.completions.create(model="bench", messages=messages)
        except openai.APIStatusError as exc:
            with lock:
                out.append(("error", exc.status_code, str(exc)))
            return replies
        text = r.choices[0].message.content or ""
        with lock:
            out.append(("ok", (time.perf_counter() - started) * 1000, r.usage.prompt_tokens,
                        r.usage.prompt_tokens_details.cached_tokens))
        replies.append(text)
        messages.append({"role": "assistant", "content": text})
    return replies


def load(lm: Any, clients: int, requests: int, max_tokens: int, figures: dict[str, Any]) -> None:
    import openai

    per_conversation = len(FOLLOW_UPS)
    conversations = requests // per_conversation
    topics = [[TOPICS[(c * conversations + k) % len(TOPICS)] + ("" if c * conversations + k < len(TOPICS) else
               f" #{c}{k}") for k in range(conversations)] for c in range(clients)]
    http, service = start_server(lm, max_tokens, max_slots=64)
    client = openai.OpenAI(base_url=http.base_url, api_key="none", max_retries=0, timeout=600)
    results: list[Any] = []
    lock = threading.Lock()
    replies: dict[str, list[str]] = {}

    def run_client(c: int) -> None:
        for topic in topics[c]:
            replies[topic] = conversation(client, topic, per_conversation, results, lock)

    started = time.perf_counter()
    threads = [threading.Thread(target=run_client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    busy = http.server.stats.rejected_busy
    http.stop()
    service.close(save=False)

    http, service = start_server(lm, max_tokens)  # every conversation alone, one request at a time
    alone = openai.OpenAI(base_url=http.base_url, api_key="none", max_retries=0, timeout=600)
    mismatches = 0
    for topic, got in replies.items():
        reference = conversation(alone, topic, per_conversation, [], lock)
        mismatches += sum(a != b for a, b in zip(got, reference, strict=False)) + abs(len(got) - len(reference))
    http.stop()
    service.close(save=False)

    ok = [r for r in results if r[0] == "ok"]
    errors = [r for r in results if r[0] == "error"]
    latencies = sorted(r[1] for r in ok)
    prompt = sum(r[2] for r in ok)
    cached = sum(r[3] for r in ok)
    print(f"load: {clients} clients x {requests} requests ({conversations} conversations of {per_conversation} turns "
          f"each), greedy, {max_tokens}-token replies, {wall:.1f} s wall")
    print(f"  {len(ok)} answered, {len(errors)} errors ({busy} of them 503 busy): "
          f"{sorted({e[1] for e in errors}) or 'none'}")
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"  latency ms: p50 {statistics.median(latencies):.0f}, p95 {p95:.0f}, max {latencies[-1]:.0f}; "
          f"{len(ok) / wall:.2f} requests/s")
    print(f"  prompt tokens {prompt}, cached {cached} ({cached / max(prompt, 1):.0%})")
    print(f"  replies different from the same conversation run alone: {mismatches}")
    figures.update({
        "conversations": conversations * clients, "answered": len(ok), "errors": len(errors), "rejected_busy": busy,
        "error_statuses": sorted({e[1] for e in errors}), "wall_s": wall, "requests_per_s": len(ok) / wall,
        "latency_ms": {"p50": statistics.median(latencies), "p95": p95, "max": latencies[-1]},
        "prompt_tokens": prompt, "cached_tokens": cached, "replies_different_from_alone": mismatches,
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    six = sub.add_parser("six-turns")
    six.add_argument("--runs", type=int, default=3)
    six.add_argument("--max-tokens", type=int, default=48)
    lo = sub.add_parser("load")
    lo.add_argument("--clients", type=int, default=4)
    lo.add_argument("--requests", type=int, default=20)
    lo.add_argument("--max-tokens", type=int, default=24)
    for sub_parser, what in ((six, "six-turns"), (lo, "load")):
        records.add_out_argument(sub_parser, f"bench-server-{what}")
    args = parser.parse_args()

    from engine import models

    with records.Run(f"bench-server-{args.what}", args.out, arguments=args) as run:
        lm = models.load("default", device="cpu", dtype="float32")
        if args.what == "six-turns":
            six_turns(lm, args.runs, args.max_tokens, run.figures)
        else:
            load(lm, args.clients, args.requests, args.max_tokens, run.figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
