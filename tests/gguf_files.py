"""Real GGUF files for tests, written with the `gguf` package's writer: llama.cpp's tensor names and
metadata keys, tiny tensors, and a real (byte-level) vocabulary when a test needs one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import LlamaFileType

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


def write_gguf(path: Path, *, arch: str = "llama", name: str = "Tiny Llama", layers: int = 2, hidden: int = 64,
               heads: int = 4, kv_heads: int = 2, ff: int = 128, vocab: int = 32, context: int = 2048,
               tied: bool = False, chat_template: bool = True, file_type: LlamaFileType | None = LlamaFileType.ALL_F32,
               dtype: type = np.float32, extra: dict[str, object] | None = None, loadable: bool = False) -> Path:
    """A llama.cpp-style decoder-only GGUF of `layers` blocks; returns `path`. `loadable`: with the token
    scores, types and merges transformers' GGUF tokenizer reads, so that models.load opens it."""
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
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["t", "0", "1", "t1", "t10"] + [f"t{i}" for i in range(5, vocab)] if loadable
                          else [f"t{i}" for i in range(vocab)])
    if loadable:
        writer.add_token_scores([0.0] * vocab)
        writer.add_token_types([1] * vocab)
        writer.add_token_merges(["t 1", "t1 0"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra or {}).items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def tensor(name: str, *shape: int) -> None:  # numpy (out, in) order, as llama.cpp's converter writes
        writer.add_tensor(name, rng.standard_normal(shape).astype(dtype if len(shape) == 2 else np.float32))

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    tensor("output_norm.weight", hidden)
    if not tied:
        tensor("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
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

