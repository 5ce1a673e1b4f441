"""The one way Cachet finds the data files it ships: package data read through `importlib.resources`.

Every data file lives inside a package (`app/resources/`: style sheet and icons;
`engine/caches/fidelity.json`: the measured cost of lossy caches) and is declared as package data
in pyproject.toml, so the same call finds it in a checkout, in a wheel installed anywhere, and in
the PyInstaller build (whose spec collects the same files into the same package folders, and whose
importer answers `importlib.resources.files` with those folders). Nothing is looked up relative to
the working directory or to the checkout.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path


class MissingResourceError(FileNotFoundError):
    """A data file that should have been installed with Cachet is not there (a broken install)."""


def resource_location(package: str, *parts: str) -> Path:
    """Where the file `parts` of `package` is, whether or not it is there (for callers that treat a missing
    file as "no data", and for module-level constants that must not fail at import)."""
    target = resources.files(package).joinpath(*parts)
    # Installed and frozen packages are folders on disk, so the Traversable is a pathlib.Path; a zipped
    # install (which Cachet does not produce) would hand back a zipfile.Path instead.
    return target if isinstance(target, Path) else Path(str(target))


def resource_path(package: str, *parts: str) -> Path:
    """The file `parts` inside `package` as a real path (Qt and `open` both need one).

    Raises MissingResourceError, naming the file and the install it was looked for in, when the file
    is absent: a packaging mistake should say so instead of starting with no style sheet.
    """
    target = resource_location(package, *parts)
    if not target.is_file():
        where = "the frozen app" if getattr(sys, "frozen", False) else f"the {package!r} package"
        raise MissingResourceError(f"{'/'.join(parts)} is missing from {where} ({target}); reinstall Cachet.")
    return target
