"""Load time and decode speed of each weight precision (engine/models.py `weights`), in one process.

    .venv/bin/python scripts/bench_weights.py                  # the bundled model, fp32 / bf16 / int8 / int4
    .venv/bin/python scripts/bench_weights.py --fresh --rounds 5 --tokens 32 [--out DIR]

Each precision is loaded twice: with `--fresh` the quantized copies of this model are deleted first, so the
first int8/int4 load quantizes and writes its copy and the second reads it back. Decoding: a 64-token prompt is
prefilled, then `--tokens` greedy one-token steps are timed through a DynamicCache; the precisions take turns
for `--rounds` rounds (so a busy machine slows them alike) and the median tokens/s of each is reported with its
ratio to fp32. What it prints and the figures are saved under --out (scripts/records.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import records  # noqa: E402  (scripts/records.py)
import torch  # noqa: E402

from engine import caches, models  # noqa: E402
from engine.caches import CacheSpec  # noqa: E402
from engine.caches.base import cache_kwargs  # noqa: E402

NAME = "bench-weights"
PRECISIONS = ("fp32", "bf16", "int8", "int4")


def quantized_copies(lm: models.LoadedModel) -> list[Path]:
    key = lm.identity.rsplit("|", 1)[0].removeprefix("gguf-sha256:")
    return sorted((models.paths.cache_dir() / "models").glob(f"{key[:32]}-int*-q*"))


@torch.inference_mode()
def decode_seconds(lm: models.LoadedModel, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds for `tokens` greedy one-token steps after prefilling `prompt`."""
    model = lm.model
    cache = caches.build_cache(CacheSpec(), lm.config, lm.device)
    out = model(prompt, **cache_kwargs(model, cache), use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(tokens):
        out = model(nxt, **cache_kwargs(model, cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--fresh", action="store_true", help="delete this model's quantized copies first")
    records.add_out_argument(parser, NAME)
    args = parser.parse_args(argv)
    with records.Run(NAME, args.out, arguments=args, argv=None if argv is None else [__file__, *argv]) as run:
        run.figures.update(measure(args))
    return 0


def measure(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """Load each precision twice, then decode with them taking turns; prints as it goes, returns the figures."""
    loaded: dict[str, models.LoadedModel] = {}
    loads: dict[str, list[float]] = {}
    for precision in args.precisions:
        times = []
        for attempt in range(2):
            started = time.perf_counter()
            lm = models.load(args.model, device="cpu", dtype=None if precision == "bf16" else "float32",
                             weights=precision)
            times.append(time.perf_counter() - started)
            if attempt == 0 and args.fresh and precision in ("int8", "int4"):
                for folder in quantized_copies(lm):
                    if f"-{precision}-" in folder.name:
                        shutil.rmtree(folder)
                started = time.perf_counter()
                lm = models.load(args.model, device="cpu", dtype="float32", weights=precision)
                times[0] = time.perf_counter() - started  # the first load: quantized now
        loads[precision] = times
        loaded[precision] = lm
        print(f"{lm.precision_label:<24} load {times[0]:6.2f} s, again {times[1]:6.2f} s; "
              f"weights {lm.weights_bytes / 2**20:7.1f} MiB", flush=True)

    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (1, 64))
    speeds: dict[str, list[float]] = {p: [] for p in loaded}
    for lm in loaded.values():  # warm-up
        decode_seconds(lm, prompt, 4)
    for round_ in range(args.rounds):
        for p, lm in loaded.items():
            speeds[p].append(args.tokens / decode_seconds(lm, prompt, args.tokens))
        print(f"round {round_ + 1}: " + ", ".join(f"{p} {v[-1]:.2f} tokens/s" for p, v in speeds.items()), flush=True)
    base = statistics.median(speeds["fp32"]) if "fp32" in speeds else None
    print(f"\ndecode, {args.tokens} tokens after a 64-token prompt, median of {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads:")
    result: dict[str, dict[str, object]] = {}
    for p, values in speeds.items():
        median = statistics.median(values)
        ratio = f"{median / base:.2f}× fp32" if base else ""
        print(f"  {loaded[p].precision_label:<24} {median:6.1f} tokens/s  {ratio}  "
              f"(runs {', '.join(f'{v:.1f}' for v in values)})")
        result[p] = {"precision": loaded[p].precision_label, "tokens_per_s": records.figure(values),
                     "ratio_to_fp32": median / base if base else None, "load_s": {"first": loads[p][0],
                                                                                  "again": loads[p][1]},
                     "weights_bytes": loaded[p].weights_bytes}
    return result


if __name__ == "__main__":
    sys.exit(main())
