"""Convert the bundled model ahead of time, so that the app's first start is as fast as later ones.

    python -m engine.prepare                 # into the user cache folder (bootstrap.py setup/run do this)
    python -m engine.prepare --to DIR        # a standalone copy for an installer (packaging/build.py)

The bundled model ships as a 4-bit GGUF file; loading it means de-quantizing every tensor (~20–36 s on
a laptop CPU). The engine does that once and keeps a safetensors copy (engine.models.ensure_converted);
this command does it during set-up instead of during the user's first start, with progress lines.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from engine import models


def prepare(target: Path | None = None, progress: models.ProgressFn | None = None) -> Path:
    """Convert the bundled GGUF (once) and return the converted folder; with `target`, also copy it there.

    The copy records the GGUF's SHA-256 (cachet-source.json), so a model loaded from it has the same
    identity as one loaded from the GGUF file: chats and their KV snapshots stay valid either way.
    """
    report = progress or (lambda _msg: None)
    _digest, folder = models.ensure_converted(models.bundled_model_path(), report)
    if target is None:
        return folder
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", type=Path, help="also copy the converted model into this folder")
    parser.add_argument("--record", type=Path, help="write the converted folder's path into this file "
                                                    "(bootstrap.py checks it instead of importing torch)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def progress(text: str) -> None:
        print(f"prepare: {text}", flush=True)

    try:
        folder = prepare(args.to.resolve() if args.to else None, progress)
    except models.ModelLoadError as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    if args.record:
        args.record.write_text(f"{folder}\n", encoding="utf-8")
    print(f"prepare: the bundled model is ready in {folder} ({time.perf_counter() - started:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
