"""Real GGUF files for tests, written with the `gguf` package's writer: llama.cpp's tensor names and
metadata keys, tiny tensors, and a real (byte-level) vocabulary when a test needs one.

Also the one GGUF writer of the scripts (scripts/screenshots.py's fake home folder, scripts/bench_discovery.py):
with `quant`, a file has the header of a real model's shape and quantization and a sparse hole in place
of its tensor data, so that a "4.7 GiB" model takes no disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType, LlamaFileType

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
# A header-only file's quantization: its file type, the type of its matrices (vectors stay F32), and that
# type's block (elements, bytes).
QUANTS = {"Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, GGMLQuantizationType.Q4_K, 256, 144),
          "Q8_0": (LlamaFileType.MOSTLY_Q8_0, GGMLQuantizationType.Q8_0, 32, 34),
          "Q4_0": (LlamaFileType.MOSTLY_Q4_0, GGMLQuantizationType.Q4_0, 32, 18)}


# The families whose GGUF files transformers' loader reads, as llama.cpp's converter writes each of them:
# architecture (Mistral is llama's architecture in llama.cpp), and the tensors a block has beyond llama's.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}


def write_gguf(path: Path, *, arch: str = "llama", name: str = "Tiny Llama", layers: int = 2, hidden: int = 64,
               heads: int = 4, kv_heads: int = 2, ff: int = 128, vocab: int = 32, context: int = 2048,
               tied: bool = False, chat_template: bool = True, file_type: LlamaFileType | None = LlamaFileType.ALL_F32,
               dtype: type = np.float32, extra: dict[str, object] | None = None, loadable: bool = False,
               head_dim: int | None = None, sliding_window: int | None = None, quant: str | None = None,
               tokens: Sequence[str] | None = None, merges: Sequence[str] = ()) -> Path:
    """A llama.cpp-style decoder-only GGUF of `layers` blocks; returns `path`. `loadable`: with the token
    scores, types and merges transformers' GGUF tokenizer reads, so that models.load opens it.

    `arch`: a GGUF architecture with llama.cpp's tensors for it — llama, qwen2 (q/k/v biases), qwen3 (q/k
    norms), phi3 (fused qkv and gate+up), gemma2 (norms after attention and MLP), gemma3 (both). `head_dim`
    (default hidden // heads) is written as attention.key_length (read by transformers for gemma).

    `quant` (a key of QUANTS): the header only, of a model with its matrices in that quantization (and the
    file type that says so), then a sparse hole as long as their data; the file reads as that model but
    cannot be loaded. `tokens`: the vocabulary written, when not t0…t{vocab-1} (a short stand-in for a large
    vocabulary, whose size the tensors still give; or a long one for timing); `merges`: BPE merges written
    with it, and a type for each token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    if quant is not None:
        file_type = QUANTS[quant][0]
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    if tokens is None:
        tokens = (["t", "0", "1", "t1", "t10"] + [f"t{i}" for i in range(5, vocab)] if loadable
                  else [f"t{i}" for i in range(vocab)])
    writer.add_token_list(list(tokens))
    if loadable:
        writer.add_token_scores([0.0] * vocab)
        writer.add_token_types([1] * vocab)
        writer.add_token_merges(["t 1", "t1 0"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        if arch == "phi3":  # as llama.cpp writes Phi-3's (else its config's 32000 lies beyond a tiny vocabulary)
            writer.add_pad_token_id(1)
        if arch in ("gemma2", "gemma3"):  # transformers builds Gemma's tokenizer with an unknown token
            writer.add_unk_token_id(vocab - 1)
    elif merges:
        writer.add_token_merges(list(merges))
        writer.add_token_types([1] * len(tokens))
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra or {}).items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    head_dim = head_dim or hidden // heads
    if arch in ("gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    rng = np.random.default_rng(0)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    def tensor(name: str, *shape: int) -> None:  # numpy (out, in) order, as llama.cpp's converter writes
        if quant is None:
            writer.add_tensor(name, rng.standard_normal(shape).astype(dtype if len(shape) == 2 else np.float32))
        elif len(shape) == 2:  # a matrix: its rows in blocks of the quantized type, as bytes
            _, raw_dtype, block, block_bytes = QUANTS[quant]
            byte_shape = (shape[0], shape[1] // block * block_bytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                                   raw_dtype=raw_dtype)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4, raw_dtype=GGMLQuantizationType.F32)

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        if arch == "phi3":  # q, k and v in one matrix
            tensor(f"blk.{i}.attn_qkv.weight", q_out + 2 * kv_out, hidden)
        else:
            tensor(f"blk.{i}.attn_q.weight", q_out, hidden)
            tensor(f"blk.{i}.attn_k.weight", kv_out, hidden)
            tensor(f"blk.{i}.attn_v.weight", kv_out, hidden)
        if arch == "qwen2":
            tensor(f"blk.{i}.attn_q.bias", q_out)
            tensor(f"blk.{i}.attn_k.bias", kv_out)
            tensor(f"blk.{i}.attn_v.bias", kv_out)
        if arch in ("qwen3", "gemma3"):
            tensor(f"blk.{i}.attn_q_norm.weight", head_dim)
            tensor(f"blk.{i}.attn_k_norm.weight", head_dim)
        tensor(f"blk.{i}.attn_output.weight", hidden, q_out)
        if arch in ("gemma2", "gemma3"):
            tensor(f"blk.{i}.post_attention_norm.weight", hidden)
            tensor(f"blk.{i}.post_ffw_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        if arch == "phi3":  # gate and up in one matrix
            tensor(f"blk.{i}.ffn_up.weight", 2 * ff, hidden)
        else:
            tensor(f"blk.{i}.ffn_gate.weight", ff, hidden)
            tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    tensor("output_norm.weight", hidden)
    if not tied:
        tensor("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if quant is None:
        writer.write_tensors_to_file()
        writer.close()
        return path
    writer.write_ti_data_to_file()
    writer.close()
    from engine.gguf_header import read_header

    expected = read_header(path).expected_size  # where the data starts (aligned) plus the tensors' bytes
    with path.open("r+b") as fh:
        fh.truncate(expected)
    return path


def write_split_gguf(folder: Path, stem: str, parts: int, **kwargs: object) -> list[Path]:
    """One model written as `parts` files named as llama.cpp's gguf-split names them (metadata in each)."""
    paths = []
    for no in range(parts):
        extra = {"split.no": no, "split.count": parts, "split.tensors.count": 0}
        paths.append(write_gguf(folder / f"{stem}-{no + 1:05d}-of-{parts:05d}.gguf", extra=extra, **kwargs))
    return paths


def write_mmproj(path: Path) -> Path:
    """A vision projector file as llama.cpp's mmproj converter writes them (architecture clip)."""
    writer = GGUFWriter(str(path), "clip")
    writer.add_type("mmproj")
    writer.add_tensor("v.patch_embd.weight", np.zeros((8, 3, 2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

