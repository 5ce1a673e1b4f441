"""Twenty 2,000-token conversations under a KV budget that holds three of them.

    .venv/bin/python scripts/bench_pool.py [--chats 20] [--tokens 2000] [--fit 3] [--out DIR]

Prints where each conversation's cache came back from (device, RAM, disk, recomputed) and how
long that took, checks that every follow-up answers exactly as a from-scratch run (greedy), and
samples the pool's memory every 20 ms to show the budgets hold. The printed table and its figures
are saved under --out (scripts/records.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import records  # noqa: E402  (scripts/records.py)

from engine import caches, models  # noqa: E402
from engine.pool import CachePool  # noqa: E402
from engine.sampling import SamplingSettings  # noqa: E402
from engine.session import ChatSession, Message, SessionSettings  # noqa: E402
from engine.snapshots import SnapshotStore  # noqa: E402

NAME = "bench-pool"
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=16, repetition_penalty=1.0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--chats", type=int, default=20)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--fit", type=int, default=3, help="how many chats the device budget holds")
    p.add_argument("--disk-fit", type=int, default=10, help="how many chats' snapshots the disk budget holds")
    records.add_out_argument(p, NAME)
    args = p.parse_args()
    with records.Run(NAME, args.out, arguments=args) as run:
        return measure(args, run.figures)


def measure(args: argparse.Namespace, figures: dict[str, Any]) -> int:
    lm = models.load("default")
    text = (ROOT / "resources" / "texts" / "alice.txt").read_text(encoding="utf-8")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def history(i: int) -> str:  # a different slice of the book per chat, about `tokens` long
        start = (i * 397) % max(len(ids) - args.tokens, 1)
        return lm.tokenizer.decode(ids[start : start + args.tokens - 40])

    probe = ChatSession(lm, SessionSettings(sampling=GREEDY))
    probe.messages = [Message("user", history(0))]
    probe.warm()
    one = caches.cache_bytes(probe.cache)
    tmp = tempfile.TemporaryDirectory()
    snapshot_size = SnapshotStore(Path(tmp.name) / "probe").save("probe", probe).stat().st_size
    pool = CachePool(lm, device_budget=args.fit * one, host_budget=args.fit * one,
                     snapshots=SnapshotStore(Path(tmp.name), budget_bytes=args.disk_fit * snapshot_size))
    peak = {"device": 0, "ram": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for tier in peak:
                peak[tier] = max(peak[tier], pool.bytes_in(tier))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sessions = {}
    print(f"{args.chats} chats of ~{args.tokens} tokens, {one / 2**20:.0f} MiB of KV each; "
          f"device budget {pool.device_budget / 2**20:.0f} MiB, RAM budget {pool.host_budget / 2**20:.0f} MiB")
    for i in range(args.chats):
        key = i
        session = ChatSession(lm, SessionSettings(sampling=GREEDY))
        session.messages = [Message("user", history(i))]
        sessions[key] = session
        pool.add(key, session)
        pool.activate(key)
        session.generate()
    pool.rebalance(wait=True)
    times: dict[str, list[float]] = {}
    restores: list[dict[str, Any]] = []
    correct = 0
    for key, session in reversed(sessions.items()):  # most recent first
        restore = pool.activate(key)
        result = session.send("Summarise this in one sentence.")
        fresh = ChatSession(lm, SessionSettings(sampling=GREEDY))
        fresh.messages = copy.deepcopy(session.messages[:-1])
        recomputed = fresh.generate()
        correct += recomputed.reply == result.reply
        times.setdefault(restore.source, []).append(restore.seconds)
        # Resuming by recomputing costs the from-scratch run's time to first token.
        times.setdefault("recompute (from-scratch TTFT)", []).append(recomputed.stats.ttft_ms / 1000)
        restores.append({"chat": key, "source": restore.source, "seconds": restore.seconds, "tokens": restore.tokens,
                         "reused_tokens": result.stats.reused_tokens, "prompt_tokens": result.stats.prompt_tokens,
                         "identical": recomputed.reply == result.reply})
        print(f"{key:>7}: restored from {restore.source:<10} in {restore.seconds * 1000:7.0f} ms "
              f"({restore.tokens} tokens), follow-up reused {result.stats.reused_tokens}/{result.stats.prompt_tokens}")
        pool.rebalance(wait=True)
    stop.set()
    sampler.join()
    pool.close()
    print(f"\nfollow-ups identical to a from-scratch run: {correct}/{len(sessions)}")
    print(f"peak KV on the device {peak['device'] / 2**20:.0f} MiB (budget {pool.device_budget / 2**20:.0f} MiB "
          f"+ the active chat), peak in RAM {peak['ram'] / 2**20:.0f} MiB (budget {pool.host_budget / 2**20:.0f} MiB)")
    for source, values in times.items():
        print(f"resume from {source:<30}: median {statistics.median(values) * 1000:7.0f} ms over {len(values)} chats")
    figures.update({
        "kv_bytes_per_chat": one, "snapshot_bytes_per_chat": snapshot_size, "device_budget_bytes": pool.device_budget,
        "host_budget_bytes": pool.host_budget, "identical_follow_ups": correct, "chats": len(sessions),
        "peak_device_bytes": peak["device"], "peak_ram_bytes": peak["ram"],
        "resume_seconds": {source: records.figure(values) for source, values in times.items()},
        "restores": restores,
    })
    return 0 if correct == len(sessions) else 1


if __name__ == "__main__":
    sys.exit(main())
