"""How fast a large GGUF model is listed: Cachet's header reader against `gguf.GGUFReader`, and a cached scan.

    .venv/bin/python scripts/bench_discovery.py [--runs 5] [--size-gib 5] [--out DIR]

Writes, in a temporary folder, a GGUF file with a Llama-3-sized tokenizer (128,256 tokens and
280,147 merges, which come before the tensor list in the header) and a Llama-3.1-8B-shaped
tensor list, then extends it to `--size-gib` with a sparse hole in place of the tensor data.
Prints the median time to read its header (Cachet), the time `gguf.GGUFReader` takes to open
the same file, and the median time of a whole discovery scan with the description cache warm.
What it prints and the figures are saved under --out (scripts/records.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import records  # noqa: E402  (scripts/records.py)

NAME = "bench-discovery"
VOCAB, MERGES = 128_256, 280_147


def write_llama_header(path: Path) -> None:
    """A Llama-3.1-8B-shaped Q4_K_M GGUF with a Llama-3-sized tokenizer; its tensor data is a sparse hole."""
    from tests.gguf_files import write_gguf

    write_gguf(path, name="Bench-8B", layers=32, hidden=4096, heads=32, kv_heads=8, ff=14336, vocab=VOCAB,
               context=131072, quant="Q4_K_M", tokens=[f"tok{i}" + "x" * (i % 9) for i in range(VOCAB)],
               merges=[f"a{i} b{i}" for i in range(MERGES)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-gib", type=float, default=5.0, help="file size after the sparse hole")
    records.add_out_argument(parser, NAME)
    args = parser.parse_args()
    with records.Run(NAME, args.out, arguments=args) as run:
        measure(args, run.figures)


def measure(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    from engine import discovery
    from engine.gguf_header import read_header

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        path = folder / "Bench-8B-Q4_K_M.gguf"
        write_llama_header(path)
        written = read_header(path)
        header_size = written.data_offset
        needed = written.expected_size or header_size
        if args.size_gib * 1024**3 < needed:  # the tensor list points past a smaller file: readers refuse it
            raise SystemExit(f"error: --size-gib {args.size_gib:g} is smaller than the tensors' data; the file needs "
                             f"at least {needed / 1024**3:.2f} GiB (it is sparse: the hole costs no disk).")
        with path.open("r+b") as fh:
            fh.truncate(int(args.size_gib * 1024**3))
        ours = []
        for _ in range(args.runs):
            started = time.perf_counter()
            header = read_header(path)
            ours.append(time.perf_counter() - started)
        print(f"file: {path.stat().st_size / 1024**3:.1f} GiB ({header_size / 1024**2:.1f} MiB of header, "
              f"{VOCAB:,} tokens, {MERGES:,} merges, {len(header.tensors)} tensors)")
        print(f"Cachet's header reader: median {statistics.median(ours) * 1000:.0f} ms over {args.runs} runs, "
              f"{header.bytes_read / 1024**2:.1f} MiB read")

        from gguf import GGUFReader

        started = time.perf_counter()
        GGUFReader(path)
        reader_s = time.perf_counter() - started
        print(f"gguf.GGUFReader: {reader_s:.1f} s (once)")

        cache = Path(tmp) / "discovery.json"
        locations = [discovery.Location("folder", folder)]
        started = time.perf_counter()
        found = discovery.scan(locations, cache=cache)
        cold = time.perf_counter() - started
        warm = []
        for _ in range(args.runs):
            started = time.perf_counter()
            discovery.scan(locations, cache=cache)
            warm.append(time.perf_counter() - started)
        model = found[0]
        print(f"discovery scan: first {cold * 1000:.0f} ms (header, architecture checks), then median "
              f"{statistics.median(warm) * 1000:.0f} ms from the cache; listed {model.name}: {model.architecture}, "
              f"{model.params / 1e9:.2f}B parameters, {model.quantization}, {model.status}")
        figures.update({
            "file_bytes": path.stat().st_size, "header_bytes": header_size, "tokens": VOCAB, "merges": MERGES,
            "tensors": len(header.tensors), "header_read_s": records.figure(ours),
            "header_bytes_read": header.bytes_read,
            "gguf_reader_s": reader_s, "scan_cold_s": cold, "scan_warm_s": records.figure(warm),
            "listed": {"name": model.name, "architecture": model.architecture, "params": model.params,
                       "quantization": model.quantization, "status": model.status},
        })


if __name__ == "__main__":
    main()
