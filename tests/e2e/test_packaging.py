"""An installed or frozen Cachet finds everything it ships, never needs the test suite, explains a
missing system library, and the wheel installed outside the checkout answers a message."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from app import qt_platform
from engine import models, resources, sources
from engine.resources import MissingResourceError, resource_path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "packaging"))
import check_wheel  # noqa: E402  (packaging/ is scripts, deliberately not a package: it would shadow PyPI's)


def test_production_code_never_imports_the_test_suite() -> None:
    offenders = []
    for path in [*(ROOT / "app").rglob("*.py"), *(ROOT / "engine").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert offenders == []


def test_the_wheel_ships_the_code_the_resources_and_not_the_tests(tmp_path: Path) -> None:
    wheel = check_wheel.build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {str(p.relative_to(ROOT)) for d in ("app", "engine") for p in (ROOT / d).rglob("*.py")}
    assert code <= names  # pyproject.toml's package list names every package
    data = {str(p.relative_to(ROOT / "resources")) for p in (ROOT / "resources").rglob("*") if p.is_file()}
    assert {"cachet.qss", "icons/cachet.png", "icons/cachet.svg", "fidelity.json", "texts/alice.txt"} <= data
    assert {f"cachet_resources/{name}" for name in data} <= names  # all of resources/, as cachet_resources
    assert not any(n.startswith(("tests/", "packaging/", "scripts/", "resources/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cachet = app.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_resources_are_found_in_the_checkout_and_a_missing_one_says_so() -> None:
    sheet = resource_path("cachet.qss")
    assert sheet == ROOT / "resources" / "cachet.qss"
    assert "#chatHeader" in sheet.read_text(encoding="utf-8")
    assert resource_path("fidelity.json").is_file() and resource_path("texts", "alice.txt").is_file()
    with pytest.raises(MissingResourceError, match="nothing.qss is missing from this installation"):
        resource_path("nothing.qss")


def test_resources_are_found_in_a_frozen_bundle_and_in_an_installed_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two places a checkout's tests never exercise: PyInstaller's bundle folder (sys._MEIPASS)
    and resources/ installed as the package cachet_resources (pyproject.toml's package-dir)."""
    installed = tmp_path / "site-packages" / resources.PACKAGE
    installed.mkdir(parents=True)
    (installed / resources.MARKER).write_text("/* installed */", encoding="utf-8")
    monkeypatch.syspath_prepend(str(installed.parent))
    resources.resources_root.cache_clear()
    try:
        assert resource_path("cachet.qss") == installed / "cachet.qss"
        monkeypatch.setattr(sys, "frozen", True, raising=False)
        monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path / "bundle"), raising=False)
        resources.resources_root.cache_clear()
        assert resources.resources_root() == tmp_path / "bundle" / "resources"
        with pytest.raises(MissingResourceError, match="cachet.qss is missing from the frozen app"):
            resource_path("cachet.qss")
    finally:
        monkeypatch.undo()
        resources.resources_root.cache_clear()
    assert resource_path("cachet.qss") == ROOT / "resources" / "cachet.qss"


def test_missing_x11_libraries_are_named_with_the_command_that_installs_them() -> None:
    absent = {"libxcb-cursor.so.0", "libxcb-icccm.so.4"}
    missing = qt_platform.missing_xcb_libraries({"DISPLAY": ":0"}, "linux", lambda so: so not in absent)
    assert [lib.soname for lib in missing] == ["libxcb-cursor.so.0", "libxcb-icccm.so.4"]
    text = qt_platform.explain(missing)
    assert "sudo apt install libxcb-cursor0 libxcb-icccm4" in text
    assert "sudo dnf install xcb-util-cursor xcb-util-wm" in text
    assert "untouched" in text
    # Qt will not use X11 here, so nothing is missing for it
    for environ, platform in (({"QT_QPA_PLATFORM": "offscreen"}, "linux"), ({}, "win32"), ({}, "darwin"),
                              ({"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland"}, "linux")):
        assert qt_platform.missing_xcb_libraries(environ, platform, lambda so: False) == []
    assert qt_platform.uses_xcb({"QT_QPA_PLATFORM": "xcb"}, "linux")
    assert qt_platform.uses_xcb({"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "x11"}, "linux")


def test_the_app_explains_missing_x11_libraries_instead_of_crashing(tmp_path: Path) -> None:
    """A real start with the xcb plugin on a machine that lacks its libraries (or a stand-in for one)."""
    present = [lib.soname for lib in qt_platform.XCB_LIBRARIES if qt_platform.can_load(lib.soname)]
    if len(present) == len(qt_platform.XCB_LIBRARIES):
        pytest.skip("this machine has every library Qt's xcb plugin needs")
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "DISPLAY": ":1999"}
    out = subprocess.run([sys.executable, "-m", "app", "--data-dir", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Cachet cannot open its window" in out.stderr and "sudo apt install" in out.stderr
    assert "Traceback" not in out.stderr and "qt.qpa" not in out.stderr  # Qt never got to fail


def run_self_test(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    return subprocess.run([sys.executable, "-m", "tests.launch_app", *extra, "--data-dir", str(tmp_path),
                           "--self-test"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_self_test_answers_one_message_and_stores_it(tmp_path: Path) -> None:
    out = run_self_test(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("cachet-self-test:")]
    assert "style sheet applied, measured cache costs found" in lines[1]
    assert lines[-1].startswith("cachet-self-test: ok")
    from engine.store import ChatStore

    store = ChatStore(tmp_path / "data" / "chats.sqlite3")
    try:
        [chat] = store.chats()
        assert [m.role for m in store.messages(chat.id)] == ["user", "assistant"]
    finally:
        store.close()


def test_self_test_fails_with_the_reason_when_the_model_cannot_load(tmp_path: Path) -> None:
    out = run_self_test(tmp_path, "--model-fails", "No such model: /nowhere")
    assert out.returncode == 1
    assert "cachet-self-test: FAILED: " in out.stderr and "No such model: /nowhere" in out.stderr


@pytest.mark.real_model
def test_a_frozen_app_loads_the_shipped_conversion_with_the_gguf_identity(
        real_lm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = real_lm.identity.split(":")[1].split("|")[0]
    shipped = tmp_path.joinpath("_internal", "models", "SmolLM2-135M-Instruct")
    shipped.parent.mkdir(parents=True)
    shipped.symlink_to(models.converted_dir(digest), target_is_directory=True)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path / "_internal"), raising=False)
    monkeypatch.setattr(sources, "bundled_model_path", lambda: pytest.fail("the frozen app looked for the GGUF"))
    monkeypatch.setattr(models, "_convert_gguf", lambda *_a: pytest.fail("the frozen app converted the model"))
    source = models.resolve("default")
    assert (source.kind, source.location) == ("folder", str(shipped))
    again = models.load("default", device="cpu", dtype="float32")
    assert again.identity == real_lm.identity  # chats' KV snapshots stay valid across source and installed app
    assert again.source.display_name == real_lm.source.display_name


@pytest.mark.real_model
@pytest.mark.timeout(600)
def test_pip_install_outside_the_checkout_answers_with_the_bundled_model(
        real_lm: Any, shared_cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    del real_lm  # converted once into the shared cache, which the installed app reuses
    assert check_wheel.main(["--cache-dir", str(shared_cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "cachet-self-test: style sheet applied, measured cache costs found" in out
    assert "reply after" in out and "Paris" in out
