"""A 4,000-token chat resumed after a process restart: from its KV snapshot vs recomputing it.

    .venv/bin/python scripts/bench_resume.py [--tokens 4000] [--out DIR]

Process 1 builds the chat, answers once and saves the cache snapshot; the script then starts a
new process that loads the model and the messages, and answers a follow-up twice: once after
restoring the snapshot, once recomputing the history. It prints both times to first token and
checks that the greedy replies are identical. What both processes print, and the figures, are saved
under --out (scripts/records.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import records  # noqa: E402  (scripts/records.py)

NAME = "bench-resume"
GREEDY = {"temperature": 0.0, "max_new_tokens": 32, "repetition_penalty": 1.0}
FOLLOW_UP = "Who is the main character, in one sentence?"


def first_process(folder: Path, tokens: int) -> None:
    from engine import models
    from engine.sampling import SamplingSettings
    from engine.session import ChatSession, Message, SessionSettings
    from engine.snapshots import SnapshotStore

    lm = models.load("default")
    text = (ROOT / "resources" / "texts" / "alice.txt").read_text(encoding="utf-8")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: tokens - 60]
    session = ChatSession(lm, SessionSettings(sampling=SamplingSettings(**GREEDY)))
    session.messages = [Message("user", "Read this:\n\n" + lm.tokenizer.decode(ids))]
    session.generate()
    SnapshotStore(folder).save("chat", session)
    (folder / "messages.json").write_text(json.dumps(
        [{"role": m.role, "content": m.content, "complete": m.complete, "token_ids": m.token_ids}
         for m in session.messages]))
    print(f"process 1: chat of {len(session.cached_ids)} tokens saved")


def second_process(folder: Path) -> None:
    from engine import models
    from engine.sampling import SamplingSettings
    from engine.session import ChatSession, Message, SessionSettings
    from engine.snapshots import SnapshotStore

    lm = models.load("default")
    saved = json.loads((folder / "messages.json").read_text())

    def fresh() -> ChatSession:
        s = ChatSession(lm, SessionSettings(sampling=SamplingSettings(**GREEDY)))
        s.messages = [Message(**m) for m in saved]
        return s

    warmup = fresh()  # one throw-away forward so both runs below start equally warm
    warmup.forward_logits([1, 2, 3])
    restored = fresh()
    load = SnapshotStore(folder).load("chat", restored)
    a = restored.send(FOLLOW_UP)
    snapshot_ttft = load.seconds * 1000 + a.stats.ttft_ms
    b = fresh().send(FOLLOW_UP)
    print(f"snapshot: {load.reason} ({load.tokens} tokens) in {load.seconds * 1000:.0f} ms, "
          f"then TTFT {a.stats.ttft_ms:.0f} ms (reused {a.stats.reused_tokens}/{a.stats.prompt_tokens}) "
          f"→ {snapshot_ttft:.0f} ms to the first token")
    print(f"recompute: TTFT {b.stats.ttft_ms:.0f} ms (prefilled {b.stats.prefilled_tokens} tokens)")
    print(f"ratio {snapshot_ttft / b.stats.ttft_ms:.1%}; replies identical: {a.reply == b.reply}")
    (folder / "figures.json").write_text(json.dumps({
        "snapshot": {"reason": load.reason, "tokens": load.tokens, "load_ms": load.seconds * 1000,
                     "ttft_ms": a.stats.ttft_ms, "reused_tokens": a.stats.reused_tokens,
                     "prompt_tokens": a.stats.prompt_tokens, "to_first_token_ms": snapshot_ttft},
        "recompute": {"ttft_ms": b.stats.ttft_ms, "prefilled_tokens": b.stats.prefilled_tokens},
        "ratio": snapshot_ttft / b.stats.ttft_ms, "identical_replies": a.reply == b.reply,
    }))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--stage", choices=("1", "2"), help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    records.add_out_argument(p, NAME)
    args = p.parse_args()
    if args.stage == "1":
        first_process(args.folder, args.tokens)
        return 0
    if args.stage == "2":
        second_process(args.folder)
        return 0
    with records.Run(NAME, args.out, arguments={"tokens": args.tokens}) as run, \
            tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for stage in ("1", "2"):
            # each stage's report is printed here (and so kept in the record); its progress goes to stderr
            done = subprocess.run([sys.executable, __file__, "--stage", stage, "--folder", tmp,
                                   "--tokens", str(args.tokens)], check=True, env=env, stdout=subprocess.PIPE,
                                  text=True)
            print(done.stdout, end="")
        run.figures.update(json.loads((Path(tmp) / "figures.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
