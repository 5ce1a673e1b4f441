"""The one way Cachet finds the data files it ships: the top-level `resources/` folder.

`resources/` holds the style sheet, the icons (`icons/cachet.svg` is their source), the measured
cost of lossy caches (`fidelity.json`) and the long text the benchmark and the fidelity figures
read (`texts/`). It is found in this order:

1. the frozen app: `resources/` inside PyInstaller's bundle folder (packaging/cachet.spec collects
   the folder there);
2. an installed wheel: the package `cachet_resources`, which is `resources/` shipped as package
   data (pyproject.toml maps the folder to that name, so nothing called just `resources` lands in
   site-packages);
3. a checkout: `resources/` beside `engine/`.

Nothing is looked up relative to the working directory.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path

PACKAGE = "cachet_resources"  # the name resources/ is installed under (pyproject.toml)
MARKER = "cachet.qss"  # a file every copy of resources/ has


class MissingResourceError(FileNotFoundError):
    """A data file that should have been installed with Cachet is not there (a broken install)."""


@cache
def resources_root() -> Path:
    """The folder the shipped data files are in (see the module docstring for the order)."""
    bundle = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and bundle:
        return Path(bundle) / "resources"
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / MARKER).is_file():
                return Path(location)
    return Path(__file__).resolve().parents[1] / "resources"


def resource_location(*parts: str) -> Path:
    """Where the file `parts` of resources/ is, whether or not it is there (for callers that treat a
    missing file as "no data", and for module-level constants that must not fail at import)."""
    return resources_root().joinpath(*parts)


def resource_path(*parts: str) -> Path:
    """The file `parts` inside resources/ as a real path (Qt and `open` both need one).

    Raises MissingResourceError, naming the file and where it was looked for, when the file is
    absent: a packaging mistake should say so instead of starting with no style sheet.
    """
    target = resource_location(*parts)
    if not target.is_file():
        where = "the frozen app" if getattr(sys, "frozen", False) else "this installation"
        raise MissingResourceError(f"{'/'.join(parts)} is missing from {where} ({target}); reinstall Cachet.")
    return target
