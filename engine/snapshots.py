"""KV snapshots on disk, so a chat resumes after a restart without recomputing its history.

A snapshot is one safetensors file (never pickle) per conversation: every layer's keys and
values in full precision (as `KVCache.full_kv` gives them) plus metadata —
the exact token ids the cache stands for, the model's identity (file hash + dtype), the
cache strategy's parameters, and a CRC-32 of every tensor's bytes computed while writing. It is
used only when all of that matches the session asking for it, the checksum matches what is read
and every value is finite; a stale, mismatched, truncated, damaged or non-finite file is deleted
and the session recomputes (a damaged snapshot would otherwise give a garbage reply without a word).

Files are written atomically (temp file + `os.replace`) and the folder is kept under a disk
budget by deleting the least recently used snapshots; the temporary files of writes a killed process
never finished are deleted when the store is made (engine/tempfiles.py).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import paths, tempfiles
from engine.caches import CacheSpec

FORMAT = "cachet-kv-2"  # 2: with "checksum" (older snapshots are recomputed once)
DEFAULT_BUDGET = 4 * 1024**3


@dataclass(frozen=True)
class LoadResult:
    ok: bool
    reason: str  # "loaded", "missing", "model changed", "strategy changed", "corrupt", ...
    seconds: float = 0.0
    tokens: int = 0


def checksum(tensors: Any) -> str:
    """CRC-32 of the tensors' bytes, in order (CPU, contiguous tensors): a damaged page of a
    snapshot changes it. zlib's CRC runs at GB/s, a small share of reading the file."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(memoryview(t.contiguous().view(-1).view(_uint8()).numpy()), crc)
    return f"crc32:{crc:08x}"


def _uint8() -> Any:
    import torch

    return torch.uint8


class SnapshotStore:
    def __init__(self, root: Path | None = None, budget_bytes: int = DEFAULT_BUDGET) -> None:
        # Next to the chats database: snapshot names are chat ids, which mean nothing elsewhere.
        self.root = root or paths.data_dir() / "snapshots"
        self.budget_bytes = budget_bytes
        # A data folder that exists now and is gone at a save was deleted while Cachet ran: writing a
        # snapshot there would re-create it with no chats in it (see `save`).
        self._folder_existed = self.root.parent.is_dir()
        # what a killed write left: .<key>.safetensors.<pid>.tmp of processes that are gone
        self.swept = tempfiles.remove_stale(self.root)

    def path(self, key: int | str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(key))
        return self.root / f"{safe}.safetensors"

    # ----- writing -----------------------------------------------------------------------------
    def save(self, key: int | str, session: Any) -> Path | None:
        """Write the session's cache; None when there is nothing to save, or when the data folder that
        holds the snapshots was deleted since this store was made (it is not re-created: an empty data
        folder would look as if every chat were lost; the app asks the user what to do with its chats)."""
        from safetensors.torch import save_file

        cache = session.cache
        if cache is None or not session.cached_ids:
            return None
        if self._folder_existed and not self.root.parent.is_dir():
            return None
        content = cache.full_kv()
        if any(kv is None for kv in content):
            return None
        tensors = {}
        for i, kv in enumerate(content):
            assert kv is not None
            tensors[f"k.{i}"] = kv[0].contiguous().cpu()
            tensors[f"v.{i}"] = kv[1].contiguous().cpu()
        meta = {
            "format": FORMAT,
            "checksum": checksum(tensors[f"{kv}.{i}"] for i in range(len(content)) for kv in "kv"),
            "model": session.lm.identity,
            "spec": json.dumps(session.settings.cache.to_dict(), sort_keys=True),
            "token_ids": json.dumps(session.cached_ids),
            "layers": str(len(content)),
            "saved": str(time.time()),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self.enforce_budget(keep=target)
        return target

    # ----- reading -----------------------------------------------------------------------------
    def load(self, key: int | str, session: Any) -> LoadResult:
        """Restore the session's cache and token ids from its snapshot, if it is valid for it."""
        from safetensors import safe_open

        from engine.caches.convert import fill

        path = self.path(key)
        if not path.is_file():
            return LoadResult(False, "missing")
        started = time.perf_counter()
        try:
            # Read to the CPU: the checksum and the finiteness check run there, then one copy to the device.
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                problem = self._mismatch(meta, session)
                if problem:
                    self.delete(key)
                    return LoadResult(False, problem)
                layers = int(meta["layers"])
                content = [(fh.get_tensor(f"k.{i}"), fh.get_tensor(f"v.{i}")) for i in range(layers)]
            ids = [int(t) for t in json.loads(meta["token_ids"])]
        except Exception as exc:  # truncated or damaged file, bad metadata
            self.delete(key)
            return LoadResult(False, f"corrupt ({type(exc).__name__})")
        if checksum(t for kv in content for t in kv) != meta.get("checksum"):
            self.delete(key)
            return LoadResult(False, "corrupt (checksum)")
        if not all(bool(t.isfinite().all()) for kv in content for t in kv):
            self.delete(key)
            return LoadResult(False, "corrupt (non-finite values)")
        dtype, device = session.lm.dtype, session.lm.device
        content = [(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in content]
        try:
            cache = fill(content, len(ids), session.settings.cache, session.lm.config, session.lm.device)
        except (ValueError, RuntimeError, IndexError):  # fill checks the shapes; a cache may still refuse
            cache = None
        if cache is None:
            self.delete(key)
            return LoadResult(False, "does not fit this cache")
        session.cache = cache
        session.cached_ids = ids
        os.utime(path)  # recently used
        return LoadResult(True, "loaded", time.perf_counter() - started, len(ids))

    @staticmethod
    def _mismatch(meta: dict[str, str], session: Any) -> str | None:
        if meta.get("format") != FORMAT:
            return "unknown format"
        if meta.get("model") != session.lm.identity:
            return "model changed"
        try:
            spec = CacheSpec.from_dict(json.loads(meta.get("spec", "{}")))
        except (ValueError, TypeError):
            return "corrupt (spec)"
        if spec != session.settings.cache:
            return "strategy changed"
        return None

    # ----- housekeeping ------------------------------------------------------------------------
    def delete(self, key: int | str) -> None:
        self.path(key).unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime) if self.root.is_dir() else []

    @staticmethod
    def tokens(path: Path) -> int:
        """How many tokens a snapshot holds, from its header (0 when it cannot be read)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return len(json.loads((fh.metadata() or {}).get("token_ids", "[]")))
        except Exception:  # a damaged file: loading it later deletes it
            return 0

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def enforce_budget(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used snapshots until the folder fits the budget."""
        removed = []
        files = self.files()
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.budget_bytes:
                break
            if p == keep:
                continue
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

