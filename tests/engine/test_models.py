"""Model sources are resolved and loaded with clear errors for everything a user can get wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import models
from engine.models import ModelLoadError
from tests.tiny import save_tiny_folder


def test_default_resolves_to_the_bundled_gguf() -> None:
    source = models.resolve("default")
    assert source.kind == "gguf"
    assert Path(source.location).name == models.BUNDLED_GGUF
    assert Path(source.location).is_file()


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.resolve(str(tmp_path / "nope" / "model.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.resolve("./no/such/folder")


def test_hub_ids_are_recognised() -> None:
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        models.resolve(str(f))


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        models.load(str(f))
    g = tmp_path / "truncated.gguf"
    g.write_bytes(models.bundled_model_path().read_bytes()[:100_000])
    with pytest.raises(ModelLoadError):
        models.load(str(g))


def test_local_folder_loads_and_chats(tmp_path: Path) -> None:
    folder = save_tiny_folder(tmp_path / "tiny")
    lm = models.load(str(folder), device="cpu", dtype="float32")
    assert lm.device.type == "cpu" and lm.dtype == torch.float32
    assert lm.identity.startswith("folder:") and lm.identity.endswith("|float32")
    assert lm.weights_bytes > 0
    assert lm.stop_token_ids == {lm.tokenizer.eos_token_id}


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    folder = save_tiny_folder(tmp_path / "tiny")
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        models.load(str(folder))


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    folder = save_tiny_folder(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "vit"
    config["architectures"] = ["ViTModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not a text-generation architecture"):
        models.load(str(folder))


def test_unknown_dtype_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        models.pick_dtype(torch.device("cpu"), "float8")


def test_cpu_defaults_to_float32() -> None:
    assert models.pick_dtype(torch.device("cpu")) == torch.float32


def test_offline_hub_id_not_cached_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="offline|Could not load"):
        models.load("nobody-here/no-such-model-xyz", offline=True)
