"""A GGUF file's converted copy: where it lives, whether it is intact, and how much disk it takes.

No torch here: the window asks `conversion_need` before it loads a large GGUF, to say how much disk
the converted (fp32 safetensors) copy takes and offer converting at every start instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

from engine import paths

CONVERTED_FORMAT = 1  # bump when the layout of converted copies changes
FP32_BYTES = 4  # the converted copy is float32, whatever the GGUF's quantization


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so multi-GB files are hashed once."""
    stat = path.stat()
    index_path = paths.cache_dir() / "hashes.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return str(index[key])
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    with contextlib.suppress(OSError):
        atomic_write_text(index_path, json.dumps(index, indent=0))
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # per thread too: the window's conversion check and the worker's load may both remember a hash
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def converted_dir(gguf_hash: str) -> Path:
    return paths.cache_dir() / "models" / f"{gguf_hash[:32]}-v{CONVERTED_FORMAT}"


def converted_from(folder: Path) -> str | None:
    """The SHA-256 of the GGUF file a folder was converted from by Cachet, if it was (so that a shipped or
    copied conversion keeps the GGUF's identity and its chats' snapshots stay valid)."""
    try:
        digest = json.loads((folder / "cachet-source.json").read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def verify_converted(folder: Path) -> str | None:
    """What is wrong with a converted copy (None: every file Cachet recorded is there with its size
    and SHA-256; copies converted before files were recorded are trusted until they fail to load)."""
    return verify_recorded(folder, "cachet-source.json", required=False)


def verify_recorded(folder: Path, record: str, *, required: bool = True) -> str | None:
    """What is wrong with a folder whose files' sizes and SHA-256s Cachet recorded in `record` (None: nothing).
    `required`: a record without a list of files is damaged (else trusted, as old converted copies are)."""
    try:
        recorded = json.loads((folder / record).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return f"its record {record} is missing or damaged"
    if recorded is None and not required:
        return None
    if not isinstance(recorded, dict) or not recorded:
        return f"its record {record} is damaged"
    for name, facts in sorted(recorded.items()):
        path = folder / name
        if not isinstance(facts, dict) or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != facts.get("size"):
            return f"{name} has {path.stat().st_size:,} bytes, not {facts.get('size'):,}"
        if file_sha256(path) != facts.get("sha256"):
            return f"{name} does not match its checksum"
    return None




class ConversionNeed(NamedTuple):
    """What converting a GGUF file takes: the copy's bytes, the folder it goes to, and what is free there."""

    bytes: int
    folder: Path
    free_bytes: int


def converted_bytes(gguf: Path) -> int:
    """The bytes of the weights in the converted copy of `gguf`: every tensor's elements × 4 (fp32), read
    from the header without touching the weights (the copy's safetensors header, config and tokenizer,
    a few MB, come on top). Raises engine.gguf_header.GGUFHeaderError on a file that is not a GGUF."""
    from engine.gguf_header import read_header

    return sum(t.n_elements for t in read_header(gguf).tensors) * FP32_BYTES


def conversion_need(gguf: Path) -> ConversionNeed | None:
    """None when `gguf` already has an intact converted copy; else how much disk its copy takes, where,
    and how much is free there. Hashes the file the first time (remembered, as loading it does anyway)."""
    size = converted_bytes(gguf)
    folder = converted_dir(file_sha256(gguf))
    if (folder / "model.safetensors").is_file() and verify_converted(folder) is None:
        return None
    return ConversionNeed(size, folder, free_disk(folder))


def free_disk(folder: Path) -> int:
    """Bytes free on the disk that holds `folder` (or would: its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def temporary_dir() -> Path:
    """Where a GGUF converted at every start is written for the time of loading: the system's temporary
    folder (often another disk than the cache folder, or memory), in a folder of Cachet's own."""
    return Path(tempfile.gettempdir()) / "cachet-conversions"
