"""Where Cachet keeps its files, each location injectable for tests and smoke runs.

The defaults are the `platformdirs` locations for "Cachet". The data folder can be moved from
the app's settings: the choice is kept in a small `location.json` in the user config folder
(the data folder cannot hold the pointer to itself) and applies from the next start.
`CACHET_DATA_DIR` and `CACHET_CACHE_DIR` override everything (the app's `--data-dir` sets both
under one folder); `CACHET_CONFIG_DIR` moves the pointer file (tests).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "Cachet"


class DataDirError(ValueError):
    """A folder that cannot hold Cachet's data, with the reason."""


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def location_file() -> Path:
    """Where the user's choice of data folder is kept."""
    base = os.environ.get("CACHET_CONFIG_DIR")
    return (Path(base) if base else Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))) / "location.json"


def chosen_data_dir() -> Path | None:
    """The data folder chosen in the settings, if any (an unreadable choice counts as none)."""
    try:
        value = json.loads(location_file().read_text(encoding="utf-8")).get("data_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(value) if isinstance(value, str) and Path(value).is_absolute() else None


def data_dir_is_overridden() -> bool:
    """True when this process was started with --data-dir or CACHET_DATA_DIR (settings cannot move it)."""
    return bool(os.environ.get("CACHET_DATA_DIR"))


def data_dir() -> Path:
    """Chats, settings and snapshots."""
    override = os.environ.get("CACHET_DATA_DIR")
    if override:
        return Path(override)
    return chosen_data_dir() or default_data_dir()


def check_data_dir(folder: Path) -> Path:
    """`folder` made absolute, created and checked writable; raises DataDirError with the reason."""
    folder = folder.expanduser()
    if not folder.is_absolute():
        raise DataDirError(f"{folder} is not an absolute path.")
    if folder.exists() and not folder.is_dir():
        raise DataDirError(f"{folder} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise DataDirError(f"{folder} is not a folder.")
        probe = folder / f".cachet-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataDirError(f"Cannot write to {folder}: {exc.strerror or exc}.") from exc
    return folder


@dataclass(frozen=True)
class DataDirProblem:
    """Why this process's data folder cannot be used, for the user.

    missing: the folder chosen in the settings is gone (an unplugged drive, a renamed folder);
    choosing it again may fix it, and it is not created silently (an empty chat list would look
    as if every chat were lost).
    """

    folder: Path
    reason: str
    missing: bool = False
    chosen: bool = False  # the folder comes from location.json (settings), not --data-dir / the default


def data_dir_problem() -> DataDirProblem | None:
    """What is wrong with the data folder this process would use, or None when it is usable
    (the default or a --data-dir folder is created when absent; a chosen one must exist)."""
    folder = data_dir()
    chosen = not data_dir_is_overridden() and chosen_data_dir() is not None
    if chosen and not folder.exists() and _nearest_existing(folder).is_dir():
        return DataDirProblem(folder, f"The data folder chosen in the settings, {folder}, is missing "
                                      "(is its drive connected, or was it moved?).", missing=True, chosen=True)
    try:
        check_data_dir(folder)
    except DataDirError as exc:
        return DataDirProblem(folder, f"The data folder {folder} cannot be used: {exc}", chosen=chosen)
    return None


def _nearest_existing(folder: Path) -> Path:
    for parent in (folder, *folder.parents):
        if parent.exists():
            return parent
    return Path(folder.anchor or "/")


def set_data_dir(folder: Path | None) -> None:
    """Use `folder` for chats, settings and snapshots from the next start (None: the default)."""
    target = location_file()
    if folder is None or folder == default_data_dir():
        target.unlink(missing_ok=True)
        return
    folder = check_data_dir(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"data_dir": str(folder)}) + "\n", encoding="utf-8")
    os.replace(tmp, target)


def cache_dir() -> Path:
    """Re-creatable files: converted model weights, compiled kernels."""
    override = os.environ.get("CACHET_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def use_base_dir(base: Path) -> None:
    """Point every location of this process at `base` (the `--data-dir` option)."""
    os.environ["CACHET_DATA_DIR"] = str(base / "data")
    os.environ["CACHET_CACHE_DIR"] = str(base / "cache")
