"""Quick speed probe of Cachet's decode and follow-up TTFT at a short and a long history, per precision
and speculative mode, in one process (the figures to compare are ratios taken in the same run).

    PYTHONPATH=. .venv/bin/python scripts/speed_probe.py [--histories 256 8192] [--dtypes float32 bfloat16]
        [--speculative off auto] [--repeat 3] [--tokens 64] [--json out.json]

Per (dtype, mode, history): the median follow-up TTFT (a ~30-token question after the history, cache
kept) and the median decode rate over `--tokens` generated tokens (a long answer), over `--repeat` runs.
The full benchmark (`python -m engine bench`) is the record; this is the quick loop used while tuning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine import models  # noqa: E402
from engine.bench import workload  # noqa: E402
from engine.bench.systems import CachetSystem  # noqa: E402
from engine.caches import CacheSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--histories", type=int, nargs="+", default=[256, 8192])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--speculative", nargs="+", default=["off", "auto"])
    p.add_argument("--cache", default="dynamic")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    for dtype in args.dtypes:
        lm = models.load(models.DEFAULT_MODEL, device="cpu", dtype=dtype)
        tokenizer = lm.tokenizer

        def render(m: Any, tokenizer: Any = tokenizer) -> int:
            text = tokenizer.apply_chat_template(list(m), add_generation_prompt=False, tokenize=False)
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        def tok(t: str, tokenizer: Any = tokenizer) -> list[int]:
            return list(tokenizer(t, add_special_tokens=False)["input_ids"])

        def detok(ids: list[int], tokenizer: Any = tokenizer) -> str:
            return str(tokenizer.decode(ids, skip_special_tokens=True))
        limit = lm.context_length - 64 - args.tokens - 64
        for mode in args.speculative:
            for target in args.histories:
                h = workload.build_history(min(target, limit), render, tok, detok)
                system = CachetSystem(lm, CacheSpec(strategy=args.cache), speculative=mode)
                system.prepare(h.messages)
                system.reply(workload.as_messages(h, workload.LONG_ANSWER), 4, 4)  # warm-up
                ttfts: list[float] = []
                rates: list[float] = []
                steps: list[float] = []
                for i in range(args.repeat):
                    system.prepare(h.messages)
                    r = system.reply(workload.as_messages(h, workload.FOLLOW_UPS[i % len(workload.FOLLOW_UPS)]), 1, 1)
                    ttfts.append(r.ttft_ms)
                    system.prepare(h.messages)
                    r = system.reply(workload.as_messages(h, workload.LONG_ANSWER), args.tokens + 1, args.tokens + 1)
                    rates.append(r.rate(0, args.tokens) or 0.0)  # 0: the reply ended before the window
                    steps.append(r.tokens_per_step or 1.0)
                system.close()
                row = {"dtype": dtype, "speculative": mode, "history": h.tokens, "ttft_ms": statistics.median(ttfts),
                       "tok_s": statistics.median(rates), "tokens_per_step": statistics.median(steps),
                       "precision_note": getattr(lm, "precision_note", None)}
                rows.append(row)
                print(f"{dtype:<9} spec={mode:<5} history {h.tokens:>6,}: TTFT {row['ttft_ms']:7.0f} ms "
                      f"(runs {', '.join(f'{t:.0f}' for t in ttfts)}), decode {row['tok_s']:5.1f} tok/s "
                      f"(runs {', '.join(f'{t:.1f}' for t in rates)}), {row['tokens_per_step']:.2f} tok/step",
                      flush=True)
        del lm
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "when": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
