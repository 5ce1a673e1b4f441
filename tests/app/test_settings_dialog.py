"""The global settings dialog: the data folder can be moved, a local model that is not there is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.config import AppConfig
from engine.store import ChatStore


def test_the_data_folder_can_be_moved_from_the_settings(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings_dialog import SettingsDialog
    from engine import paths

    monkeypatch.delenv("CACHET_DATA_DIR")  # a normal start: the folder comes from the settings
    monkeypatch.setattr(paths, "default_data_dir", lambda: tmp_path / "default")  # not the user's real folder
    assert paths.data_dir() == tmp_path / "default"
    dialog = SettingsDialog(AppConfig())
    qtbot.addWidget(dialog)
    assert dialog.change_data_dir.isEnabled()

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    dialog.set_data_dir(a_file)
    assert dialog.error.isVisibleTo(dialog) and "is a file" in dialog.error.text()
    assert dialog.chosen_data_dir is None

    elsewhere = tmp_path / "elsewhere" / "Cachet"
    dialog.set_data_dir(elsewhere)
    assert not dialog.error.isVisibleTo(dialog) and dialog.chosen_data_dir == elsewhere
    assert "Used from the next start" in dialog.data_dir_note.text()
    dialog.accept()
    assert paths.data_dir() == elsewhere and elsewhere.is_dir()

    store = ChatStore()  # the next start's store lives there
    store.create_chat(title="moved")
    store.close()
    assert (elsewhere / "chats.sqlite3").exists()

    back = SettingsDialog(AppConfig())
    qtbot.addWidget(back)
    back.default_data_dir.click()
    back.accept()
    assert paths.data_dir() == tmp_path / "default" and not paths.location_file().exists()

    monkeypatch.setenv("CACHET_DATA_DIR", str(tmp_path / "flag"))  # --data-dir decides: the buttons say so
    locked = SettingsDialog(AppConfig())
    qtbot.addWidget(locked)
    assert not locked.change_data_dir.isEnabled() and "--data-dir" in locked.change_data_dir.toolTip()


def test_the_settings_refuse_a_local_model_that_is_not_there(qtbot: Any, tmp_path: Path) -> None:
    from app.settings_dialog import SettingsDialog

    dialog = SettingsDialog(AppConfig())
    qtbot.addWidget(dialog)
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    for path, says in ((tmp_path / "missing.gguf", "does not exist"), (not_a_model, "not a .gguf"),
                       (empty_folder, "no config.json")):
        dialog.local.setChecked(True)
        dialog.local_path.setText(str(path))
        dialog.accept()
        assert dialog.result() == 0 and dialog.error.isVisibleTo(dialog), path
        assert says in dialog.error.text(), dialog.error.text()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    dialog.local_path.setText(str(folder))
    dialog.accept()
    assert dialog.result() == 1
