"""Before a large GGUF without a converted copy is loaded, the window says how much disk the copy takes and
offers converting at every start instead; the answer is remembered per model, Cancel keeps the model in
use, and a disk too full for a copy is said (issue 15 §2); the file is hashed off the GUI thread, and a long
check says so and can be cancelled. A real GGUF header, a lowered threshold."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from app.config import AppConfig
from tests.gguf_files import write_gguf
from tests.tiny import tiny_loaded_model

LOAD_MS = 60_000
pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen


@pytest.fixture
def big_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GGUF whose copy (305.2 KiB) counts as large (one of 160.8 KiB, a single layer, does not), and no
    converted copy of it anywhere."""
    from app import conversion_consent

    monkeypatch.setenv("CACHET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(conversion_consent, "ASK_ABOVE_BYTES", 200_000)
    return write_gguf(tmp_path / "models" / "Big-F32.gguf")


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Each question asked (its texts and buttons); `answers.append({"click": "Convert once"})` before asking."""
    from PySide6.QtWidgets import QMessageBox

    asked: list[dict[str, Any]] = []
    plan: list[str] = []

    def answer(box: QMessageBox) -> int:
        asked.append({"text": box.text(), "detail": box.informativeText(),
                      "buttons": [b.text() for b in box.buttons()]})
        choice = plan.pop(0)
        next(b for b in box.buttons() if b.text().replace("&", "") == choice).click()
        return 0

    monkeypatch.setattr(QMessageBox, "exec", answer)
    asked.append({"plan": plan})
    return asked


def _loaded_configs(monkeypatch: pytest.MonkeyPatch) -> list[AppConfig]:
    import app.__main__

    loaded: list[AppConfig] = []
    monkeypatch.setattr(app.__main__, "default_loader",
                        lambda config: loaded.append(config) or (lambda progress=None: tiny_loaded_model()))
    return loaded


def test_opening_a_large_gguf_asks_first_and_remembers_the_answer(
        qtbot: Any, big_gguf: Path, answers: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        make_window: Any, tmp_path: Path) -> None:
    plan = answers.pop(0)["plan"]
    loaded = _loaded_configs(monkeypatch)
    win = make_window()

    plan.append("Cancel")
    win.open_model(big_gguf)
    assert answers[0]["text"] == (f"Opening Big-F32.gguf converts it once into a copy of 305.2 KiB in "
                                  f"{tmp_path / 'cache' / 'models'} (" + answers[0]["text"].split("(")[1])
    assert answers[0]["text"].endswith(" free).")
    assert "Converting at every start keeps nothing on disk" in answers[0]["detail"]
    assert sorted(answers[0]["buttons"]) == ["Cancel", "Convert at every start", "Convert once"]
    assert win.config.model == "default" and loaded == []  # cancelled: the model in use stays
    assert win.statusBar().currentMessage() == "Big-F32.gguf was not opened; the model in use stays."

    plan.append("Convert at every start")
    with qtbot.waitSignal(win.engine.model_ready, timeout=LOAD_MS):
        win.open_model(big_gguf)
    assert win.config.model == str(big_gguf)
    assert win.config.gguf_conversion == {str(big_gguf): "every_start"} == loaded[-1].gguf_conversion

    small = write_gguf(tmp_path / "models" / "Small-F32.gguf", layers=1)
    with qtbot.waitSignal(win.engine.model_ready, timeout=LOAD_MS):
        win.open_model(small)  # below the threshold: not asked
    with qtbot.waitSignal(win.engine.model_ready, timeout=LOAD_MS):
        win.open_model(big_gguf)
    assert len(answers) == 2 and len(loaded) == 3  # remembered: not asked again


def test_the_loader_converts_at_every_start_when_that_was_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.__main__ import default_loader
    from engine import models

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(models, "load", lambda spec, **kwargs: calls.append(kwargs) or tiny_loaded_model())
    default_loader(AppConfig(model="/m/a.gguf", gguf_conversion={"/m/a.gguf": "every_start"}))(print)
    default_loader(AppConfig(model="/m/b.gguf", gguf_conversion={"/m/b.gguf": "once"}))(print)
    default_loader(AppConfig(model="/m/c.gguf"))(print)
    assert [c["keep_converted"] for c in calls] == [False, True, True]


def test_a_disk_too_full_for_a_copy_is_said_and_only_what_fits_offered(
        qtbot: Any, big_gguf: Path, answers: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        make_window: Any) -> None:
    from app import conversion_consent
    from engine import conversion

    plan = answers.pop(0)["plan"]
    loaded = _loaded_configs(monkeypatch)
    temporary = conversion.temporary_dir()
    free = {"cache": 1000, "temp": 10**12}
    monkeypatch.setattr(conversion, "free_disk", lambda folder: free["temp" if folder == temporary else "cache"])
    win = make_window()

    plan.append("Cancel")
    win.open_model(big_gguf)
    assert "but only 1,000 B is free there" in answers[0]["text"]
    assert sorted(answers[0]["buttons"]) == ["Cancel", "Convert at every start"]

    free["temp"] = 2000  # neither disk has room: only Cancel, saying why
    plan.append("Cancel")
    win.open_model(big_gguf)
    assert answers[1]["buttons"] == ["Cancel"] and "Free some disk space" in answers[1]["detail"]
    assert win.config.model == "default" and loaded == [] and win.config.gguf_conversion == {}

    question = conversion_consent.question_for(AppConfig(model=str(big_gguf)))
    assert question is not None and not question.can_keep and not question.can_convert_each_start


def test_at_start_the_configured_gguf_is_asked_about_before_it_loads(
        qtbot: Any, big_gguf: Path, answers: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        make_window: Any) -> None:
    from PySide6.QtWidgets import QMessageBox

    from app import conversion_consent

    plan = answers.pop(0)["plan"]
    loaded = _loaded_configs(monkeypatch)
    warnings: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda _parent, _title, text: warnings.append(text))

    plan.append("Cancel")
    refused = make_window(model=str(big_gguf), wait_ready=False)
    refused.consent_at_start = True  # as app/__main__.py sets it when it loads the configured model
    with qtbot.waitSignal(refused.engine.model_failed, timeout=LOAD_MS):
        refused.start_engine()
    assert "Big-F32.gguf was not opened: converting it was cancelled" in warnings[0]
    assert loaded == [] and refused.config.model == str(big_gguf)  # the setting is kept for the next start

    plan.append("Convert once")
    win = make_window(model=str(big_gguf), wait_ready=False)
    win.consent_at_start = True
    with qtbot.waitSignal(win.engine.model_ready, timeout=LOAD_MS):
        win.start_engine()
    assert win.config.gguf_conversion == {str(big_gguf): "once"} and loaded[-1] == win.config

    monkeypatch.setattr(conversion_consent, "ASK_ABOVE_BYTES", 2 * 1024**3)  # as shipped
    small = make_window(wait_ready=False)  # the bundled model (a 538 MB copy): nothing asked
    small.consent_at_start = True
    with qtbot.waitSignal(small.engine.model_ready, timeout=LOAD_MS):
        small.start_engine()
    assert len(answers) == 2


def test_the_gguf_is_hashed_off_the_gui_thread_while_the_window_keeps_running(
        qtbot: Any, big_gguf: Path, answers: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        make_window: Any) -> None:
    from PySide6.QtCore import QTimer

    from engine import conversion

    plan = answers.pop(0)["plan"]
    _loaded_configs(monkeypatch)
    real_sha256 = conversion.file_sha256
    hashed_in: list[threading.Thread] = []
    gui_ran = threading.Event()

    def sha256_needing_the_gui(path: Path) -> str:
        hashed_in.append(threading.current_thread())
        # on the GUI thread (as before) this would wait in vain: the timer below could never fire
        assert gui_ran.wait(10), "the window handled no event while the file was hashed"
        return real_sha256(path)

    monkeypatch.setattr(conversion, "file_sha256", sha256_needing_the_gui)
    win = make_window()
    QTimer.singleShot(0, gui_ran.set)
    plan.append("Cancel")
    win.open_model(big_gguf)
    assert hashed_in and threading.main_thread() not in hashed_in
    assert answers[0]["text"].startswith("Opening Big-F32.gguf converts it once into a copy of 305.2 KiB")
    assert win.config.model == "default"


def _slow_hashing(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event, list[Path]]:
    """Hashing as of a file of many GB on a slow disk: each hash waits for `release` (the first Event), then
    sets `hashed` (the second); the list gets every file a hash was started for."""
    from engine import conversion

    real_sha256 = conversion.file_sha256
    release, hashed = threading.Event(), threading.Event()
    hashes: list[Path] = []

    def slow_sha256(path: Path) -> str:
        hashes.append(path)
        release.wait(30)
        digest = real_sha256(path)
        hashed.set()
        return digest

    monkeypatch.setattr(conversion, "file_sha256", slow_sha256)
    return release, hashed, hashes


def _click_cancel(dialog: Any) -> None:
    from PySide6.QtWidgets import QPushButton

    next(b for b in dialog.findChildren(QPushButton) if b.text() == "Cancel").click()


def test_a_long_check_says_so_and_can_be_cancelled(
        qtbot: Any, big_gguf: Path, answers: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        make_window: Any) -> None:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QProgressDialog


    plan = answers.pop(0)["plan"]
    loaded = _loaded_configs(monkeypatch)
    release, hashed, _ = _slow_hashing(monkeypatch)
    win = make_window()
    shown: list[str] = []

    def cancel_when_shown() -> None:
        for dialog in win.findChildren(QProgressDialog):
            if dialog.isVisible() and not shown:
                shown.append(dialog.labelText())
                _click_cancel(dialog)

    watch = QTimer()
    watch.timeout.connect(cancel_when_shown)
    watch.start(20)
    win.open_model(big_gguf)
    assert shown == ["Checking whether Big-F32.gguf was converted before…\n\nThe first time, Cachet reads the whole "
                     "file once to recognise it, which takes a few seconds for each GB."]
    assert answers == [] and loaded == [] and win.config.model == "default"  # cancelled: nothing asked or loaded
    assert win.statusBar().currentMessage() == "Big-F32.gguf was not opened; the model in use stays."

    release.set()  # the hashing ends in the background and is remembered: the next try asks at once
    qtbot.waitUntil(hashed.is_set)
    plan.append("Cancel")
    win.open_model(big_gguf)
    watch.stop()
    assert len(shown) == 1 and answers[0]["text"].startswith("Opening Big-F32.gguf converts it once")


def test_trying_again_while_a_cancelled_check_still_hashes_waits_for_it_instead_of_reading_the_file_twice(
        qtbot: Any, big_gguf: Path, answers: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        make_window: Any) -> None:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QProgressDialog


    plan = answers.pop(0)["plan"]
    _loaded_configs(monkeypatch)
    release, _, hashes = _slow_hashing(monkeypatch)
    win = make_window()
    dialogs: list[str] = []  # the "Checking…" dialogs seen (each marked, as a new one may reuse a freed one's id)

    def on_dialog() -> None:  # the first check: cancel it; the second: let the hashing end
        for dialog in win.findChildren(QProgressDialog):
            if dialog.isVisible() and not dialog.property("seen"):
                dialog.setProperty("seen", True)
                dialogs.append(dialog.labelText())
                if len(dialogs) == 1:
                    _click_cancel(dialog)
                else:
                    release.set()

    watch = QTimer()
    watch.timeout.connect(on_dialog)
    watch.start(20)
    win.open_model(big_gguf)
    assert len(dialogs) == 1 and not release.is_set()  # cancelled while the first hashing still runs
    plan.append("Cancel")
    win.open_model(big_gguf)  # waits for the hashing under way
    watch.stop()
    assert len(dialogs) == 2 and len(hashes) == 1  # the second try waited for the first hashing: the file was read once
    assert answers[0]["text"].startswith("Opening Big-F32.gguf converts it once")


def test_at_start_a_cancelled_check_is_told_as_such(
        qtbot: Any, big_gguf: Path, monkeypatch: pytest.MonkeyPatch, make_window: Any) -> None:
    from PySide6.QtWidgets import QMessageBox

    from app import conversion_consent

    def cancelled_check(parent: Any, config: Any) -> None:
        raise conversion_consent.CheckCancelled("checking was cancelled")

    monkeypatch.setattr(conversion_consent, "find_question", cancelled_check)
    loaded = _loaded_configs(monkeypatch)
    warnings: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda _parent, _title, text: warnings.append(text))
    win = make_window(model=str(big_gguf), wait_ready=False)
    win.consent_at_start = True
    with qtbot.waitSignal(win.engine.model_failed, timeout=LOAD_MS):
        win.start_engine()
    assert "Big-F32.gguf was not opened: checking whether it was converted before was cancelled" in warnings[0]
    assert loaded == [] and win.config.model == str(big_gguf)
