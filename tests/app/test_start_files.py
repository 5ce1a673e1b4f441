"""Files that crashed every start (issue 12 items 5, 6, 10, 13): settings.json with wrong types or
nested 100k deep, location.json pointing at a file, at /proc or at a missing folder, and the
notices shown at start-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.config import AppConfig, load_config
from engine import paths

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen

@pytest.mark.parametrize("text", [
    '{"model": 123}', '{"device": ["cuda"]}', '{"online": "yes"}', '{"theme": null}',
    '{"default_sampling": {"temperature": "hot"}}', '{"default_cache": {"strategy": "sink", "window": "wide"}}',
    '{"default_system_prompt": {"a": 1}}', "[" * 100_000 + "]" * 100_000, '"just a string"', "\x00\xff",
])
def test_a_settings_file_with_wrong_types_falls_back_to_the_defaults(tmp_path: Path, text: str) -> None:
    path = tmp_path / "settings.json"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    assert load_config(path) == AppConfig()  # before the fix: AttributeError / RecursionError every start


def test_a_bad_field_does_not_take_the_good_ones_with_it(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"model": 123, "theme": "dark", "default_sampling": {"temperature": 0.2}}))
    assert load_config(path) == AppConfig(theme="dark", default_sampling={"temperature": 0.2})


def _choose(folder: Path) -> None:
    paths.location_file().parent.mkdir(parents=True, exist_ok=True)
    paths.location_file().write_text(json.dumps({"data_dir": str(folder)}))


def test_a_missing_chosen_folder_is_reported_not_silently_empty(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("CACHET_DATA_DIR")
    _choose(tmp_path / "unplugged-drive" / "Cachet")
    problem = paths.data_dir_problem()
    assert problem is not None and problem.missing and problem.chosen
    assert "missing" in problem.reason
    assert not (tmp_path / "unplugged-drive").exists()  # not created behind the user's back


@pytest.mark.parametrize("where", ["file", "proc", "under-a-file"])
def test_a_chosen_folder_that_cannot_hold_data_is_reported(tmp_path: Path, monkeypatch: Any, where: str) -> None:
    monkeypatch.delenv("CACHET_DATA_DIR")
    target = {"file": tmp_path / "a-file", "proc": Path("/proc/x"),
              "under-a-file": tmp_path / "a-file" / "below"}[where]
    (tmp_path / "a-file").write_text("not a folder")
    _choose(target)
    problem = paths.data_dir_problem()
    assert problem is not None and str(target) in problem.reason
    assert problem.missing == (where == "proc")  # /proc exists: "x" in it is a missing folder, which cannot be made


def test_the_start_offers_the_default_folder_and_takes_its_lock(qtbot: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from PySide6.QtWidgets import QMessageBox

    from app.single_instance import claim_data_folder

    monkeypatch.delenv("CACHET_DATA_DIR")
    monkeypatch.setattr(paths, "default_data_dir", lambda: tmp_path / "default")
    (tmp_path / "a-file").write_text("x")
    _choose(tmp_path / "a-file")
    asked: list[str] = []

    def answer(box: QMessageBox) -> int:
        asked.append(box.text())
        default = next(b for b in box.buttons() if b.text().startswith("Use the default folder"))
        default.click()
        return 0

    monkeypatch.setattr(QMessageBox, "exec", answer)
    claim = claim_data_folder()  # before the fix: a traceback at start
    assert claim is not None
    try:
        assert asked and "a-file" in asked[0]
        assert claim.folder == tmp_path / "default" and claim.lock.held
        assert not paths.location_file().exists()  # the default is the choice now
    finally:
        claim.release()


def test_start_up_notices_are_banners_and_leave_the_status_bar_to_the_engine(
        qtbot: Any, make_window: Any, tmp_path: Path) -> None:
    from engine.store import ChatStore

    store = ChatStore()
    chat = store.create_chat()
    store.add_message(chat.id, "user", "\u202eevil title")
    store.add_message(chat.id, "assistant", "cut", status="streaming")
    store.close()
    win = make_window(wait_ready=False)
    win.start_engine()
    assert "cut off" in (win.banner_text("recovered") or "")
    assert win.statusBar().currentMessage() == ""  # before: it covered "Starting the engine…"
    assert win.meters.model_label.isVisible()
    assert win.sidebar.entries()[0].title == "evil title"
    assert win.title_label.text() == "evil title"
