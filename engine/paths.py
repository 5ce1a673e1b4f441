"""Where Cachet keeps its files, each location injectable for tests and smoke runs.

The defaults are the `platformdirs` locations for "Cachet". `CACHET_DATA_DIR` and
`CACHET_CACHE_DIR` override them (the app's `--data-dir` sets both under one folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "Cachet"


def data_dir() -> Path:
    """Chats, settings and snapshots."""
    override = os.environ.get("CACHET_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    """Re-creatable files: converted model weights, compiled kernels."""
    override = os.environ.get("CACHET_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def use_base_dir(base: Path) -> None:
    """Point every location of this process at `base` (the `--data-dir` option)."""
    os.environ["CACHET_DATA_DIR"] = str(base / "data")
    os.environ["CACHET_CACHE_DIR"] = str(base / "cache")
