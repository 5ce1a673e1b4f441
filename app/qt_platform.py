"""Before Qt starts on Linux: are the X11 libraries its `xcb` platform plugin needs there?

Qt 6.5+ needs `libxcb-cursor0` (and a few other xcb utility libraries) that many fresh Linux
installs lack; without them Qt aborts with "Could not load the Qt platform plugin xcb", which
tells a user nothing. This module finds the missing libraries with the same dynamic loader Qt
uses and says, in plain words, which package installs them. No Qt is imported here: the check has
to run before Qt can fail.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class XLibrary:
    soname: str
    debian: str  # Debian, Ubuntu, Mint
    fedora: str  # Fedora, RHEL; openSUSE names them the same way
    arch: str


# What Qt 6's xcb plugin (libqxcb.so and libQt6XcbQpa.so.6) links against beyond Qt's own libraries:
# read off `ldd` of the PySide6 wheel's plugin. The first one is the one most often missing.
XCB_LIBRARIES = (
    XLibrary("libxcb-cursor.so.0", "libxcb-cursor0", "xcb-util-cursor", "xcb-util-cursor"),
    XLibrary("libxcb-icccm.so.4", "libxcb-icccm4", "xcb-util-wm", "xcb-util-wm"),
    XLibrary("libxcb-keysyms.so.1", "libxcb-keysyms1", "xcb-util-keysyms", "xcb-util-keysyms"),
    XLibrary("libxcb-image.so.0", "libxcb-image0", "xcb-util-image", "xcb-util-image"),
    XLibrary("libxcb-render-util.so.0", "libxcb-render-util0", "xcb-util-renderutil", "xcb-util-renderutil"),
    XLibrary("libxcb-util.so.1", "libxcb-util1", "xcb-util", "xcb-util"),
    XLibrary("libxkbcommon-x11.so.0", "libxkbcommon-x11-0", "libxkbcommon-x11", "libxkbcommon-x11"),
    XLibrary("libxcb-xkb.so.1", "libxcb-xkb1", "libxcb", "libxcb"),
    XLibrary("libxcb-randr.so.0", "libxcb-randr0", "libxcb", "libxcb"),
    XLibrary("libxcb-shape.so.0", "libxcb-shape0", "libxcb", "libxcb"),
    XLibrary("libX11-xcb.so.1", "libx11-xcb1", "libX11-xcb", "libx11"),
    XLibrary("libxcb.so.1", "libxcb1", "libxcb", "libxcb"),
)


def can_load(soname: str) -> bool:
    """True when the dynamic loader finds `soname`, searching as it will for Qt's plugin."""
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def uses_xcb(environ: Mapping[str, str], platform: str = sys.platform) -> bool:
    """Whether Qt will start its xcb (X11) platform plugin in this environment."""
    if not platform.startswith("linux"):
        return False
    chosen = environ.get("QT_QPA_PLATFORM", "")
    if chosen:
        return chosen.split(";")[0].split(":")[0] == "xcb"
    # Unset: Qt takes Wayland in a Wayland session and X11 otherwise.
    return not (environ.get("WAYLAND_DISPLAY") and environ.get("XDG_SESSION_TYPE") == "wayland")


def missing_xcb_libraries(environ: Mapping[str, str] | None = None, platform: str = sys.platform,
                          loadable: Callable[[str], bool] = can_load) -> list[XLibrary]:
    """The libraries Qt's xcb plugin needs that cannot be loaded (empty when Qt will not use xcb)."""
    if not uses_xcb(os.environ if environ is None else environ, platform):
        return []
    return [lib for lib in XCB_LIBRARIES if not loadable(lib.soname)]


def explain(missing: list[XLibrary]) -> str:
    """The message for a user whose system lacks `missing`: what is wrong and the command that fixes it."""
    names = ", ".join(lib.soname for lib in missing)
    debian = " ".join(dict.fromkeys(lib.debian for lib in missing))
    fedora = " ".join(dict.fromkeys(lib.fedora for lib in missing))
    arch = " ".join(dict.fromkeys(lib.arch for lib in missing))
    return (
        "Cachet cannot open its window: this system lacks X11 libraries that Qt, the toolkit Cachet's "
        f"window is drawn with, needs ({names}).\n\n"
        "Install them, then start Cachet again:\n"
        f"  Debian, Ubuntu, Mint:  sudo apt install {debian}\n"
        f"  Fedora:                sudo dnf install {fedora}\n"
        f"  Arch:                  sudo pacman -S {arch}\n\n"
        "Your chats and settings are untouched."
    )


def tell_user(message: str) -> None:
    """Print `message` to stderr and, for a start from a desktop menu (no terminal to read it), show it
    with the desktop's own dialog tool when one is installed."""
    print(message, file=sys.stderr, flush=True)
    if sys.stderr.isatty() or not os.environ.get("DISPLAY"):
        return
    for tool, args in (("zenity", ["--error", "--title=Cachet", "--no-wrap", f"--text={message}"]),
                       ("kdialog", ["--title", "Cachet", "--error", message]),
                       ("xmessage", ["-center", message])):
        path = shutil.which(tool)
        if path:
            try:
                subprocess.run([path, *args], check=False, timeout=600)
            except (OSError, subprocess.SubprocessError):
                continue
            return
