#!/usr/bin/env python3
"""Build Cachet's installers for the system this runs on, and optionally smoke-test the frozen app.

    python packaging/build.py [--smoke] [--skip-freeze] [--no-archives]

Needs the project's environment plus PyInstaller (`pip install -e .[packaging]`, or
`.venv/bin/pip install pyinstaller`). Steps:

1. `python -m engine.prepare --to build/prepared/...`: the bundled model, converted once, shipped as is,
   so the installed app's first start loads it like every later one (no GGUF de-quantization).
2. PyInstaller with packaging/cachet.spec → dist/Cachet/ (one folder; dist/Cachet.app on macOS).
3. Per system, into dist/:
   - Linux: Cachet-<version>-linux-<arch>.tar.gz (the folder, cachet.desktop, icons and
     install-desktop-entry.sh) and, when `appimagetool` is on PATH (or $APPIMAGETOOL names it),
     Cachet-<version>-<arch>.AppImage;
   - Windows: Cachet-<version>-windows-<arch>.zip, and Cachet-<version>-setup.exe when Inno Setup's
     ISCC.exe is found (packaging/windows/cachet.iss);
   - macOS: Cachet-<version>-macos-<arch>.dmg (packaging/macos/make_dmg.sh, hdiutil).
4. `--smoke`: run the frozen app twice on one temporary data folder, headless, in its self-test mode
   (window, bundled model, one answer stored; app/selftest.py) — the first and the second start — and
   fail on a non-zero exit, a traceback or any stderr line not known to be harmless.

Every step prints what it did, how long it took and the size of what it wrote.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
BUILD = ROOT / "build"
DIST = ROOT / "dist"
PREPARED = BUILD / "prepared" / "SmolLM2-135M-Instruct"
ICONS = ROOT / "resources" / "icons"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "arm64", "aarch64": "aarch64"}.get(
    platform.machine().lower(), platform.machine().lower())
# stderr lines of a healthy headless run: Qt's offscreen platform cannot size native windows.
HARMLESS_STDERR = (re.compile(r"^This plugin does not support propagateSizeHints\(\)$"),)


def say(text: str) -> None:
    print(f"build: {text}", flush=True)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def run(cmd: list[str], **kwargs: object) -> None:
    say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


def prepare_model() -> None:
    started = time.perf_counter()
    run([sys.executable, "-m", "engine.prepare", "--to", str(PREPARED)], cwd=ROOT)
    say(f"prepared model: {mib(size_of(PREPARED))} in {time.perf_counter() - started:.0f} s")


def freeze() -> Path:
    started = time.perf_counter()
    run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN", "--distpath", str(DIST),
         "--workpath", str(BUILD / "pyinstaller"), str(PACKAGING / "cachet.spec")], cwd=ROOT)
    folder = DIST / "Cachet"
    say(f"frozen app: {folder} ({mib(size_of(folder))}) in {time.perf_counter() - started:.0f} s")
    return folder


def executable(folder: Path) -> Path:
    return folder / ("cachet.exe" if sys.platform == "win32" else "cachet")


def linux_tarball(folder: Path) -> Path:
    """The one folder plus the desktop entry, its icons and the script that adds it to the menu."""
    stage = BUILD / "linux" / "Cachet"
    shutil.rmtree(stage.parent, ignore_errors=True)
    shutil.copytree(folder, stage, symlinks=True)
    shutil.copy2(PACKAGING / "linux" / "cachet.desktop", stage / "cachet.desktop")
    shutil.copy2(PACKAGING / "linux" / "install-desktop-entry.sh", stage / "install-desktop-entry.sh")
    (stage / "icons").mkdir()
    for icon in ICONS.glob("cachet-*.png"):
        shutil.copy2(icon, stage / "icons" / icon.name)
    shutil.copy2(ICONS / "cachet.png", stage / "icons" / "cachet-256.png")
    target = DIST / f"Cachet-{VERSION}-linux-{ARCH}.tar.gz"
    started = time.perf_counter()
    with tarfile.open(target, "w:gz", compresslevel=6) as tar:
        tar.add(stage, arcname=f"Cachet-{VERSION}")
    say(f"{target.name}: {mib(target.stat().st_size)} (unpacked {mib(size_of(stage))}) in "
        f"{time.perf_counter() - started:.0f} s")
    return target


def linux_appimage(folder: Path) -> Path | None:
    """An AppImage, when appimagetool is available (it is on none of PyPI, Debian or npm: CI downloads it)."""
    tool = os.environ.get("APPIMAGETOOL") or shutil.which("appimagetool") or shutil.which("appimagetool.AppImage")
    if not tool:
        say("AppImage skipped: appimagetool is not installed (set APPIMAGETOOL=/path/to/appimagetool; "
            "the GitHub workflow downloads it)")
        return None
    appdir = BUILD / "Cachet.AppDir"
    shutil.rmtree(appdir, ignore_errors=True)
    shutil.copytree(folder, appdir / "usr" / "lib" / "cachet", symlinks=True)
    shutil.copy2(PACKAGING / "linux" / "AppRun", appdir / "AppRun")
    shutil.copy2(PACKAGING / "linux" / "cachet.desktop", appdir / "cachet.desktop")
    shutil.copy2(ICONS / "cachet.png", appdir / "cachet.png")
    icon_dir = appdir / "usr" / "share" / "icons" / "hicolor" / "256x256" / "apps"
    icon_dir.mkdir(parents=True)
    shutil.copy2(ICONS / "cachet.png", icon_dir / "cachet.png")
    target = DIST / f"Cachet-{VERSION}-{ARCH}.AppImage"
    run([tool, "--no-appstream", str(appdir), str(target)], env={**os.environ, "ARCH": ARCH})
    say(f"{target.name}: {mib(target.stat().st_size)}")
    return target


def windows_installers(folder: Path) -> None:
    target = DIST / f"Cachet-{VERSION}-windows-{ARCH}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, Path("Cachet") / path.relative_to(folder))
    say(f"{target.name}: {mib(target.stat().st_size)}")
    iscc = os.environ.get("ISCC") or shutil.which("iscc") or shutil.which("ISCC") or next(
        (str(p) for p in (Path(os.environ.get("PROGRAMFILES(X86)", r"C:\Program Files (x86)")) / "Inno Setup 6"
                          / "ISCC.exe",) if p.is_file()), None)
    if not iscc:
        say("setup.exe skipped: Inno Setup's ISCC.exe was not found (install Inno Setup 6, or set ISCC)")
        return
    run([iscc, f"/DAppVersion={VERSION}", f"/DSourceDir={folder}", f"/DOutputDir={DIST}",
         str(PACKAGING / "windows" / "cachet.iss")])


def macos_dmg() -> None:
    app = DIST / "Cachet.app"
    target = DIST / f"Cachet-{VERSION}-macos-{ARCH}.dmg"
    run(["bash", str(PACKAGING / "macos" / "make_dmg.sh"), str(app), str(target)])
    say(f"{target.name}: {mib(target.stat().st_size)} (Cachet.app {mib(size_of(app))})")


def smoke(folder: Path) -> bool:
    """Start the frozen app twice on one throwaway data folder in self-test mode; True when both pass."""
    binary = executable(folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHET_", "PYTHON"))}
    env["QT_QPA_PLATFORM"] = "offscreen"
    ok = True
    smoke_started = time.time()
    with tempfile.TemporaryDirectory(prefix="cachet-smoke-") as tmp:
        for attempt in ("first start", "second start"):
            started = time.perf_counter()
            out = subprocess.run([str(binary), "--data-dir", tmp, "--self-test"], env=env, cwd=tmp,
                                 capture_output=True, text=True, timeout=900)
            seconds = time.perf_counter() - started
            for line in out.stdout.splitlines():
                say(f"  {attempt}: {line}")
            unexpected = [ln for ln in out.stderr.splitlines()
                          if ln.strip() and not any(p.match(ln) for p in HARMLESS_STDERR)]
            for line in unexpected:
                say(f"  {attempt}: stderr: {line}")
            passed = out.returncode == 0 and not unexpected and "cachet-self-test: ok" in out.stdout
            say(f"smoke {attempt}: {'passed' if passed else 'FAILED'} (exit {out.returncode}, {seconds:.1f} s "
                "from starting the process to its exit)")
            ok = ok and passed
        written = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())
        say(f"smoke: files written under the data folder: {', '.join(written)}")
    # lstat: a link the spec's trimming left dangling (a library it dropped) is not a write by the app
    beside = [str(p) for p in folder.rglob("*") if p.lstat().st_mtime >= smoke_started]
    if beside:
        say(f"smoke: FAILED: the app wrote next to itself: {beside[:10]}")
        ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="also run the frozen app's self-test, twice")
    parser.add_argument("--skip-freeze", action="store_true", help="reuse dist/Cachet from an earlier build")
    parser.add_argument("--no-archives", action="store_true", help="only the frozen folder: no .tar.gz, AppImage, "
                                                                   "installer or disk image")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.skip_freeze:
        folder = DIST / "Cachet"
    else:
        prepare_model()
        folder = freeze()
    if args.no_archives:
        pass
    elif sys.platform.startswith("linux"):
        linux_tarball(folder)
        linux_appimage(folder)
    elif sys.platform == "win32":
        windows_installers(folder)
    elif sys.platform == "darwin":
        macos_dmg()
    say(f"built in {time.perf_counter() - started:.0f} s")
    if args.smoke and not smoke(folder):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
