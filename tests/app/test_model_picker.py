"""The models already on this computer, in the window: the picker lists fake LM Studio, Ollama and
Hugging Face cache layouts (real GGUF headers and safetensors files in tmp_path) with the CLI's columns,
greys out what cannot be opened, filters, remembers added folders, and fills in the chosen model; a
model dropped on the window is opened; the first-run hint is shown once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent

from app.config import AppConfig, ConfigError, load_config, save_config
from engine import discovery
from tests.engine.test_discovery import write_hf_folder, write_ollama_model
from tests.gguf_files import write_gguf, write_mmproj
from tests.tiny import tiny_loaded_model

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen

SCAN_MS = 60_000
LOAD_MS = 60_000
USABLE_NAMES = {"Tiny-Q8_0", "tiny:latest", "org/tiny-chat"}


def fake_disk(root: Path) -> Path:
    """A home folder where LM Studio, Ollama and the Hugging Face hub have downloaded models, some damaged."""
    home = root / "home"
    lms = home / ".lmstudio" / "models"
    write_gguf(lms / "lmstudio-community" / "Tiny-GGUF" / "Tiny-Q8_0.gguf", name="Tiny", context=4096)
    write_mmproj(lms / "lmstudio-community" / "Tiny-GGUF" / "mmproj-Tiny-F16.gguf")
    cut = write_gguf(lms / "someone" / "Cut-GGUF" / "Cut.gguf")
    with cut.open("r+b") as fh:
        fh.truncate(300)
    ollama = home / ".ollama" / "models"
    write_ollama_model(ollama, "tiny", "latest", write_gguf(root / "blob.gguf", layers=3))
    write_ollama_model(ollama, "gone", "7b", None)
    write_hf_folder(home / ".cache" / "huggingface" / "hub" / "models--org--tiny-chat" / "snapshots" / "r1")
    return home


_DEFAULT_LOCATIONS = discovery.default_locations  # before any fixture replaces it


def look_in(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point the usual places (LM Studio, Ollama, GPT4All, the HF cache) at `home` instead of the real one."""
    monkeypatch.setattr(discovery, "default_locations",
                        lambda *args, **kwargs: _DEFAULT_LOCATIONS(platform="linux", home=home, env={}))


def scanned_picker(qtbot: Any, config: AppConfig | None = None) -> Any:
    from app.model_picker import ModelPicker

    picker = ModelPicker(config or AppConfig())
    qtbot.addWidget(picker)
    assert picker.scanning and "Scanning" in picker.state.text()
    assert not picker.buttons.button(picker.buttons.StandardButton.Ok).isEnabled()
    with qtbot.waitSignal(picker.scanned, timeout=SCAN_MS):
        pass
    assert not picker.scanning
    return picker


def test_the_picker_lists_every_model_with_the_columns_of_the_cli(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    look_in(monkeypatch, fake_disk(tmp_path))
    picker = scanned_picker(qtbot)
    result = picker.result_
    assert result is not None and result.ladder[-2:] == ["int8", "int4"]  # fp32 or bf16 first, by the device
    headers = [str(picker.proxy.headerData(c, Qt.Orientation.Horizontal)) for c in range(picker.proxy.columnCount())]
    assert headers == ["Name", "Architecture", "Parameters", "Quantization", "Context", "Size", "Found in",
                       *result.ladder, "Status"]
    rows = {row["Name"]: row for row in picker.rows()}
    assert set(rows) == USABLE_NAMES | {"mmproj-Tiny-F16", "Cut", "gone:7b"}
    tiny = rows["Tiny-Q8_0"]
    assert (tiny["Architecture"], tiny["Quantization"], tiny["Context"], tiny["Found in"], tiny["Status"]) == \
        ("llama", "F32", "4,096", "LM Studio", "ok")
    assert tiny["Parameters"].endswith("K") and tiny["Size"].endswith("MiB")
    assert all(tiny[p] == "yes" for p in result.ladder)  # a tiny model fits with every precision
    assert rows["tiny:latest"]["Found in"] == "Ollama" and rows["org/tiny-chat"]["Found in"] == "Hugging Face cache"
    assert rows["org/tiny-chat"]["Context"] == "4,096" and rows["org/tiny-chat"]["Quantization"] == "F16"

    assert {name for name, row in rows.items() if row["enabled"] == "yes"} == USABLE_NAMES
    assert rows["Cut"]["Status"].startswith("broken: not a readable GGUF file")
    assert rows["gone:7b"]["Status"].startswith("broken: the model blob")
    assert rows["mmproj-Tiny-F16"]["Status"].startswith("unsupported: a vision projector")
    assert all(rows[n][p] == "—" for n in ("Cut", "gone:7b") for p in result.ladder)
    assert "6 models found, 3 that Cachet can open" in picker.state.text()


def test_broken_models_cannot_be_chosen_and_the_chosen_one_is_given_back(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    look_in(monkeypatch, fake_disk(tmp_path))
    picker = scanned_picker(qtbot)
    ok = picker.buttons.button(picker.buttons.StandardButton.Ok)
    cut = next(r for r in range(picker.proxy.rowCount()) if picker.proxy.index(r, 0).data() == "Cut")
    index = picker.proxy.index(cut, 0)
    assert "Cannot be opened (broken): not a readable GGUF file" in index.data(Qt.ItemDataRole.ToolTipRole)
    assert not picker.select_name("Cut") and not ok.isEnabled()
    picker.accept()
    assert picker.chosen_path is None and picker.result() != picker.DialogCode.Accepted  # OK did nothing
    assert picker.select_name("tiny:latest") and ok.isEnabled()
    blob = picker.selected_path()
    assert blob is not None and Path(blob).parent.name == "blobs" and picker.path_label.text() == blob
    picker.accept()
    assert picker.chosen_path == blob and picker.result() == picker.DialogCode.Accepted


def test_the_filter_narrows_the_list(qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    look_in(monkeypatch, fake_disk(tmp_path))
    picker = scanned_picker(qtbot)
    picker.filter.setText("ollama")
    assert {r["Name"] for r in picker.rows()} == {"tiny:latest", "gone:7b"}  # the "Found in" column matches
    picker.filter.setText("TINY-q8")
    assert [r["Name"] for r in picker.rows()] == ["Tiny-Q8_0"]
    picker.filter.setText("nothing like this")
    assert picker.rows() == [] and picker.selected_path() is None
    picker.filter.clear()
    assert len(picker.rows()) == 6


def test_nothing_found_says_where_it_looked_and_how_to_add_a_folder(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    look_in(monkeypatch, tmp_path / "empty-home")
    picker = scanned_picker(qtbot)
    text = picker.state.text()
    assert text.startswith("No models found. Looked in LM Studio: ") and "Add folder…" in text
    assert f"Ollama: {tmp_path / 'empty-home' / '.ollama' / 'models'}" in text and "Hugging Face cache: " in text


def test_an_added_folder_is_searched_kept_in_the_settings_and_its_model_chosen(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings_dialog import SettingsDialog

    look_in(monkeypatch, fake_disk(tmp_path))
    mine = tmp_path / "my models"
    write_hf_folder(mine / "my-model")
    dialog = SettingsDialog(AppConfig())
    qtbot.addWidget(dialog)
    assert dialog.bundled.isChecked()
    with qtbot.waitSignal(dialog.browse_button.clicked):
        dialog.browse_button.click()
    picker = dialog.picker
    assert picker is not None
    with qtbot.waitSignal(picker.scanned, timeout=SCAN_MS):
        pass
    assert "my-model" not in {r["Name"] for r in picker.rows()}

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert not picker.add_folder(a_file) and "is not a folder" in picker.error.text()
    with qtbot.waitSignal(picker.scanned, timeout=SCAN_MS):
        assert picker.add_folder(mine)
    rows = {r["Name"]: r for r in picker.rows()}
    assert rows["my-model"]["Found in"] == "added folder" and rows["my-model"]["Status"] == "ok"
    assert not picker.add_folder(mine) and "already searched" in picker.error.text()
    assert picker.select_name("my-model")
    picker.accept()
    assert dialog.local.isChecked() and dialog.local_path.text() == str(mine / "my-model")

    config = dialog.result_config()
    assert config.model == str(mine / "my-model") and config.model_folders == [str(mine)]
    save_config(config)
    assert load_config().model_folders == [str(mine)]  # remembered for the next start
    again = SettingsDialog(load_config())
    qtbot.addWidget(again)
    assert again.result_config().model_folders == [str(mine)]


def test_an_added_folder_can_be_removed_and_the_settings_keep_that(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_window: Any) -> None:
    look_in(monkeypatch, tmp_path / "empty-home")
    mine, empty = tmp_path / "my <models>", tmp_path / "nothing here"
    write_hf_folder(mine / "my-model")
    empty.mkdir()
    win = make_window(model_hint_dismissed=True, model_folders=[str(mine), str(empty)])
    win.save_settings = True
    picker = win.browse_models()
    with qtbot.waitSignal(picker.scanned, timeout=SCAN_MS):
        pass
    label = picker.folders_label
    assert label.isVisible() and label.isEnabled()
    assert label.text() == (f'Your folders: {tmp_path}/my &lt;models&gt; (<a href="remove:0">Remove</a>), '
                            f'{empty} (<a href="remove:1">Remove</a>)')
    assert [r["Name"] for r in picker.rows()] == ["my-model"]
    assert picker.select_name("my-model")

    with qtbot.waitSignal(picker.scanned, timeout=SCAN_MS):
        label.linkActivated.emit("remove:0")  # as a click on the first folder's "Remove" does
        assert not label.isEnabled() and "Scanning" in picker.state.text()
    assert picker.folders == [str(empty)] and picker.rows() == [] and picker.selected_path() is None
    assert not picker.buttons.button(picker.buttons.StandardButton.Ok).isEnabled()
    assert label.text() == f'Your folders: {empty} (<a href="remove:0">Remove</a>)'
    assert mine.is_dir()  # only no longer searched: the folder stays on disk
    assert not picker.remove_folder(str(mine))  # not one of the added folders (any more)

    with qtbot.waitSignal(picker.scanned, timeout=SCAN_MS):
        assert picker.remove_folder(str(empty))
    assert picker.folders == [] and label.isHidden()
    picker.reject()
    assert win.config.model_folders == [] and load_config().model_folders == []  # kept as adding is


def test_model_folders_are_validated_like_every_setting() -> None:
    assert AppConfig().model_folders == [] and AppConfig().model_hint_dismissed is False
    for bad in (["relative/folder"], [""], "/one/folder", [3], ["/a", "/a"]):
        with pytest.raises(ConfigError, match="Model folders"):
            AppConfig(model_folders=bad).validate()  # type: ignore[arg-type]
    assert AppConfig.from_dict({"model_folders": ["models"], "model_hint_dismissed": "yes"}) == AppConfig()


def drop(target: Any, *paths: Path) -> None:
    """Drag `paths` over `target` (a widget of the window) and drop them there, as a file manager does."""
    from PySide6.QtCore import QPoint
    from PySide6.QtGui import QDragEnterEvent
    from PySide6.QtWidgets import QApplication

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    args = (Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    enter = QDragEnterEvent(QPoint(5, 5), *args)
    QApplication.sendEvent(target, enter)
    assert enter.isAccepted()
    QApplication.sendEvent(target, QDropEvent(QPointF(5, 5), *args))


def test_a_gguf_dropped_on_the_window_is_opened_and_a_non_model_is_refused(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_window: Any) -> None:
    import app.__main__

    asked: list[str] = []

    def loader_for(config: AppConfig) -> Any:
        asked.append(config.model)
        return lambda progress=None: tiny_loaded_model(seed=1)

    monkeypatch.setattr(app.__main__, "default_loader", loader_for)
    win = make_window()
    gguf = write_gguf(tmp_path / "dropped" / "Dropped-F32.gguf")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    cut = write_gguf(tmp_path / "Cut.gguf")
    with cut.open("r+b") as fh:
        fh.truncate(300)
    folder = tmp_path / "ggufs"
    write_gguf(folder / "a.gguf")

    drop(win.composer.input, notes)  # on the message input: not typed in as a path, the window refuses it
    assert "notes.txt is not a model" in (win.banner_text("model-refused") or "")
    assert win.composer.input.toPlainText() == ""
    drop(win.sidebar, cut)
    assert "Cut.gguf cannot be opened (broken): not a readable GGUF file" in (win.banner_text("model-refused") or "")
    drop(win.chat_view.viewport(), folder)
    assert "no config.json. It holds 1 GGUF file (a.gguf…)" in (win.banner_text("model-refused") or "")
    drop(win.chat_view.viewport(), gguf, notes)
    assert "drop one model" in (win.banner_text("model-refused") or "")
    assert win.config.model == "default" and asked == []  # nothing refused was opened

    with qtbot.waitSignal(win.engine.model_ready, timeout=LOAD_MS):
        drop(win.chat_view.viewport(), gguf)
        assert win.statusBar().currentMessage() == f"Opening Dropped-F32 ({gguf})…"
    assert win.config.model == str(gguf) and asked == [str(gguf)]
    assert win.banner_text("model-refused") is None
    assert win.engine.ready and win.engine.load_error is None  # the worker loaded what the new loader gave


def test_the_first_run_hint_is_shown_once_and_its_dismissal_remembered(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_window: Any) -> None:
    look_in(monkeypatch, fake_disk(tmp_path))
    win = make_window()
    win.save_settings = True  # as the app runs: settings are written to the data folder
    qtbot.waitUntil(lambda: win.banner_text("models-found") is not None, timeout=SCAN_MS)
    assert win.banner_text("models-found") == ("3 models found on this computer (LM Studio, Ollama, Hugging Face "
                                               "cache) that Cachet can open where they are.")
    banner = win.banners["models-found"]
    assert banner.action_button is not None and banner.action_button.text() == "Browse"
    banner.action_button.click()
    assert win.picker is not None
    with qtbot.waitSignal(win.picker.scanned, timeout=SCAN_MS):
        pass
    win.picker.reject()
    assert win.picker is None and win.config.model == "default"

    banner.close_button.click()
    assert win.config.model_hint_dismissed and load_config().model_hint_dismissed
    qtbot.waitUntil(lambda: win.banner_text("models-found") is None)

    again = make_window(model_hint_dismissed=load_config().model_hint_dismissed)
    assert again.hint_scanner is None and again.banner_text("models-found") is None
    other_model = make_window(model=str(tmp_path / "some.gguf"))  # (the tests' loader ignores the path)
    assert other_model.hint_scanner is None and other_model.banner_text("models-found") is None


def test_a_model_chosen_from_the_menu_is_opened_and_added_folders_are_kept(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_window: Any) -> None:
    import app.__main__

    asked: list[str] = []
    monkeypatch.setattr(app.__main__, "default_loader",
                        lambda config: asked.append(config.model) or (lambda progress=None: tiny_loaded_model()))
    look_in(monkeypatch, fake_disk(tmp_path))
    mine = tmp_path / "mine"
    write_hf_folder(mine / "my-model")
    win = make_window(model_hint_dismissed=True)
    win.save_settings = True
    picker = win.browse_models()
    with qtbot.waitSignal(picker.scanned, timeout=SCAN_MS):
        pass
    with qtbot.waitSignal(picker.scanned, timeout=SCAN_MS):
        picker.add_folder(mine)
    assert picker.select_name("my-model")
    with qtbot.waitSignal(win.engine.model_ready, timeout=LOAD_MS):
        picker.accept()
    assert asked == [str(mine / "my-model")] and win.config.model == str(mine / "my-model")
    assert load_config().model_folders == [str(mine)] and load_config().model == str(mine / "my-model")


def test_the_first_run_scan_waits_until_the_model_has_loaded(
        qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_window: Any) -> None:
    """The hint's scan of the disk starts once the first load has ended, so that it does not compete with the
    load (and with the CPU precision probe's timings, which a busy machine makes unsteady)."""
    import threading

    look_in(monkeypatch, fake_disk(tmp_path))
    from PySide6.QtCore import QCoreApplication

    loading, release = threading.Event(), threading.Event()

    def slow_loader(*args: Any, **kwargs: Any) -> Any:
        loading.set()
        release.wait(30)
        return tiny_loaded_model()

    win = make_window(loader=slow_loader, wait_ready=False)
    win.start_engine()
    qtbot.waitUntil(loading.is_set, timeout=LOAD_MS)  # the worker is in the load, held there
    QCoreApplication.sendPostedEvents()  # whatever the start queued for the window has run
    assert win.hint_scanner is None and win.engine.loading  # nothing scanned while the model loads
    with qtbot.waitSignal(win.engine.model_ready, timeout=LOAD_MS):
        release.set()
    assert win.hint_scanner is not None
    qtbot.waitUntil(lambda: win.banner_text("models-found") is not None, timeout=SCAN_MS)
