"""How fast a large GGUF model is listed: Cachet's header reader against `gguf.GGUFReader`, and a cached scan.

    .venv/bin/python scripts/bench_discovery.py [--runs 5] [--size-gib 5]

Writes, in a temporary folder, a GGUF file with a Llama-3-sized tokenizer (128,256 tokens and
280,147 merges, which come before the tensor list in the header) and a Llama-3.1-8B-shaped
tensor list, then extends it to `--size-gib` with a sparse hole in place of the tensor data.
Prints the median time to read its header (Cachet), the time `gguf.GGUFReader` takes to open
the same file, and the median time of a whole discovery scan with the description cache warm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB, MERGES = 128_256, 280_147


def write_llama_header(path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("Bench-8B")
    writer.add_context_length(131072)
    writer.add_block_count(32)
    writer.add_embedding_length(4096)
    writer.add_feed_forward_length(14336)
    writer.add_head_count(32)
    writer.add_head_count_kv(8)
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" + "x" * (i % 9) for i in range(VOCAB)])
    writer.add_token_merges([f"a{i} b{i}" for i in range(MERGES)])
    writer.add_token_types([1] * VOCAB)
    writer.add_chat_template("{{ messages }}")
    shapes = [("token_embd.weight", (VOCAB, 4096))]
    for i in range(32):
        shapes += [(f"blk.{i}.attn_q.weight", (4096, 4096)), (f"blk.{i}.attn_k.weight", (1024, 4096)),
                   (f"blk.{i}.attn_v.weight", (1024, 4096)), (f"blk.{i}.attn_output.weight", (4096, 4096)),
                   (f"blk.{i}.ffn_gate.weight", (14336, 4096)), (f"blk.{i}.ffn_up.weight", (14336, 4096)),
                   (f"blk.{i}.ffn_down.weight", (4096, 14336)), (f"blk.{i}.attn_norm.weight", (4096,)),
                   (f"blk.{i}.ffn_norm.weight", (4096,))]
    shapes += [("output_norm.weight", (4096,)), ("output.weight", (VOCAB, 4096))]
    for name, shape in shapes:  # tensor infos only: the data is a sparse hole below
        quantized = len(shape) == 2
        raw_dtype = GGMLQuantizationType.Q4_K if quantized else GGMLQuantizationType.F32
        byte_shape = (*shape[:-1], shape[-1] // 256 * 144) if quantized else shape
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8 if quantized else np.float32),
                               int(np.prod(byte_shape)) * (1 if quantized else 4), raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-gib", type=float, default=5.0, help="file size after the sparse hole")
    args = parser.parse_args()

    from engine import discovery
    from engine.gguf_header import read_header

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        path = folder / "Bench-8B-Q4_K_M.gguf"
        write_llama_header(path)
        header_size = path.stat().st_size
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
        print(f"gguf.GGUFReader: {time.perf_counter() - started:.1f} s (once)")

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


if __name__ == "__main__":
    main()
