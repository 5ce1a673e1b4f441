"""API keys of remote engines: in the system keyring where there is one, else in a file only the user can read.

The keyring (macOS Keychain, Windows Credential Locker, the Secret Service on Linux desktops) is used
when the `keyring` package is installed and finds a real backend; a headless Linux machine has none,
so the keys then go to `api_keys.json` in the data folder, written atomically with mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from engine import paths

SERVICE = "Cachet remote engine"
FILE_NAME = "api_keys.json"


def _keyring() -> object | None:
    """The keyring module when it has a usable backend, else None."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:  # a broken backend configuration: fall back to the file
        return None
    if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 1) <= 0:
        return None
    return keyring


def key_file(folder: Path | None = None) -> Path:
    return (folder or paths.data_dir()) / FILE_NAME


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write(path: Path, keys: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".api_keys.", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp already makes it 0600 on POSIX; Windows has per-user profiles
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(keys, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def where(folder: Path | None = None, use_keyring: bool = True) -> str:
    """Where keys are kept here, in words, for the settings dialog."""
    if use_keyring and _keyring() is not None:
        return "the system keyring"
    return f"{key_file(folder)} (only you can read it)"


def save(base_url: str, key: str, folder: Path | None = None, use_keyring: bool = True) -> None:
    """Keep `key` for the server at `base_url` (an empty key forgets it)."""
    kr = _keyring() if use_keyring else None
    if kr is not None:
        if key:
            kr.set_password(SERVICE, base_url, key)  # type: ignore[attr-defined]
        else:
            with contextlib.suppress(Exception):
                kr.delete_password(SERVICE, base_url)  # type: ignore[attr-defined]
        return
    path = key_file(folder)
    keys = _read(path)
    if key:
        keys[base_url] = key
    else:
        keys.pop(base_url, None)
    _write(path, keys)


def load(base_url: str, folder: Path | None = None, use_keyring: bool = True) -> str | None:
    """The key kept for `base_url`, or None."""
    kr = _keyring() if use_keyring else None
    if kr is not None:
        try:
            return kr.get_password(SERVICE, base_url)  # type: ignore[attr-defined,no-any-return]
        except Exception:
            return None
    return _read(key_file(folder)).get(base_url)
