"""Shared fixtures: every test runs against throwaway data/cache folders; tiny random models
for speed; the bundled model loaded once per test session for the few tests that need it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.models import LoadedModel
from tests.tiny import tiny_loaded_model

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder per test session, so the bundled model is converted at most once."""
    return tmp_path_factory.mktemp("cachet-cache")


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, shared_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CACHET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CACHET_CACHE_DIR", str(shared_cache_dir))
    monkeypatch.setenv("CACHET_CONFIG_DIR", str(tmp_path / "config"))  # the data-folder choice, never the user's
    yield


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return tiny_loaded_model(seed=0)


@pytest.fixture(scope="session")
def real_lm(shared_cache_dir: Path) -> LoadedModel:
    """The bundled SmolLM2-135M-Instruct, loaded once for the whole session."""
    from engine import models

    previous = os.environ.get("CACHET_CACHE_DIR")
    os.environ["CACHET_CACHE_DIR"] = str(shared_cache_dir)
    try:
        return models.load("default", device="cpu", dtype="float32")
    finally:
        if previous is None:
            os.environ.pop("CACHET_CACHE_DIR", None)
        else:
            os.environ["CACHET_CACHE_DIR"] = previous
