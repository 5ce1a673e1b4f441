"""Global settings: the model, device and dtype, the KV memory budget, the theme, the data folder.

The dialog edits a copy of the AppConfig; `result_config()` is validated, and the window applies
only what differs (a new model means reloading it in the worker).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.config import DTYPES, THEMES, AppConfig, ConfigError
from engine import paths


class SettingsDialog(QDialog):
    def __init__(self, config: AppConfig, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Cachet settings")
        self.setMinimumWidth(560)
        self.original = config
        layout = QVBoxLayout(self)

        model_box = QGroupBox("Model")
        ml = QVBoxLayout(model_box)
        self.bundled = QRadioButton("Bundled: SmolLM2-135M-Instruct (small, fast, runs anywhere)")
        self.local = QRadioButton("A local GGUF file or Hugging Face model folder")
        self.hub = QRadioButton("A Hugging Face Hub id")
        group = QButtonGroup(self)
        for b in (self.bundled, self.local, self.hub):
            group.addButton(b)
        ml.addWidget(self.bundled)
        ml.addWidget(self.local)
        row = QHBoxLayout()
        row.setContentsMargins(22, 0, 0, 0)
        self.local_path = QLineEdit()
        self.local_path.setPlaceholderText("/path/to/model.gguf or /path/to/model-folder")
        file_button = QPushButton("File…")
        folder_button = QPushButton("Folder…")
        row.addWidget(self.local_path, 1)
        row.addWidget(file_button)
        row.addWidget(folder_button)
        ml.addLayout(row)
        ml.addWidget(self.hub)
        row2 = QHBoxLayout()
        row2.setContentsMargins(22, 0, 0, 0)
        self.hub_id = QLineEdit()
        self.hub_id.setPlaceholderText("owner/name, e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
        self.online = QCheckBox("Allow downloading")
        self.online.setToolTip("Off: only models already in your Hugging Face cache are used; nothing is fetched.")
        row2.addWidget(self.hub_id, 1)
        row2.addWidget(self.online)
        ml.addLayout(row2)
        layout.addWidget(model_box)

        run_box = QGroupBox("Hardware and memory")
        form = QFormLayout(run_box)
        self.device = QComboBox()
        self.device.setEditable(True)
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.device.setToolTip("auto: a CUDA GPU if present, else Apple's MPS, else the CPU")
        self.dtype = QComboBox()
        self.dtype.addItems(list(DTYPES))
        self.dtype.setToolTip("auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on the CPU")
        self.kv_budget = _budget_box(0, "automatic",
                                     "GPU memory (RAM without a GPU) for the KV caches of all chats together. "
                                     "Beyond it, the caches of the chats used longest ago move to RAM, then to "
                                     "disk, and come back when you open the chat. Automatic: what is free once "
                                     "the model is loaded.")
        self.ram_budget = _budget_box(-1, "automatic",
                                      "RAM for the caches of idle chats. Automatic: a quarter of the RAM with a "
                                      "GPU; without one the KV budget already is RAM, so only a small share.")
        self.disk_budget = _budget_box(0, "no snapshots",
                                       "Disk space for caches saved as snapshots: idle chats beyond the RAM budget, "
                                       "and every chat when Cachet quits, so a chat resumes after a restart "
                                       "without reading it all again.")
        form.addRow("Device", self.device)
        form.addRow("Precision", self.dtype)
        form.addRow("KV cache budget", self.kv_budget)
        form.addRow("RAM for idle chats", self.ram_budget)
        form.addRow("Disk for snapshots", self.disk_budget)
        layout.addWidget(run_box)

        look_box = QGroupBox("Appearance and chats")
        form2 = QFormLayout(look_box)
        self.theme = QComboBox()
        for t in THEMES:
            self.theme.addItem({"system": "Follow the system", "light": "Light", "dark": "Dark"}[t], t)
        self.default_prompt = QPlainTextEdit()
        self.default_prompt.setFixedHeight(60)
        self.default_prompt.setPlaceholderText("System prompt for new chats (optional)")
        form2.addRow("Theme", self.theme)
        form2.addRow("New chats' system prompt", self.default_prompt)
        data_row = QVBoxLayout()
        data_buttons = QHBoxLayout()
        self.data_dir = QLineEdit(str(paths.data_dir()))
        self.data_dir.setReadOnly(True)
        self.data_dir.setToolTip("Where chats, settings and cache snapshots live.")
        self.change_data_dir = QPushButton("Change…")
        self.default_data_dir = QPushButton("Default")
        open_button = QPushButton("Open")
        data_row.addWidget(self.data_dir)
        for button in (self.change_data_dir, self.default_data_dir, open_button):
            data_buttons.addWidget(button)
        data_buttons.addStretch(1)
        data_row.addLayout(data_buttons)
        if paths.data_dir_is_overridden():
            for button in (self.change_data_dir, self.default_data_dir):
                button.setEnabled(False)
                button.setToolTip("This run was started with --data-dir (or CACHET_DATA_DIR), which decides "
                                  "the folder.")
        self.data_dir_note = QLabel()
        self.data_dir_note.setWordWrap(True)
        self.data_dir_note.hide()
        self.chosen_data_dir: Path | None = None  # None: unchanged
        form2.addRow("Data folder", data_row)
        form2.addRow(self.data_dir_note)  # the whole width: a wrapped label in the field column is cut short
        layout.addWidget(look_box)

        self.error = QLabel()
        self.error.setStyleSheet("color: #d9534f;")
        self.error.setWordWrap(True)
        self.error.hide()
        layout.addWidget(self.error)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        layout.addWidget(self.buttons)

        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        file_button.clicked.connect(self._choose_file)
        folder_button.clicked.connect(self._choose_folder)
        open_button.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(paths.data_dir()))))
        self.change_data_dir.clicked.connect(self._choose_data_dir)
        self.default_data_dir.clicked.connect(lambda: self.set_data_dir(paths.default_data_dir()))
        for b in (self.bundled, self.local, self.hub):
            b.toggled.connect(self._update_model_fields)
        self._fill(config)

    def _fill(self, c: AppConfig) -> None:
        model = c.model.strip()
        if model in ("", "default"):
            self.bundled.setChecked(True)
        elif model.count("/") == 1 and not model.startswith(("/", ".", "~")) and not model.endswith(".gguf"):
            self.hub.setChecked(True)
            self.hub_id.setText(model)
        else:
            self.local.setChecked(True)
            self.local_path.setText(model)
        self.online.setChecked(c.online)
        self.device.setCurrentText(c.device)
        self.dtype.setCurrentText(c.dtype)
        self.kv_budget.setValue(c.kv_budget_mb)
        self.ram_budget.setValue(-1 if c.ram_budget_mb is None else c.ram_budget_mb)
        self.disk_budget.setValue(c.disk_budget_mb)
        self.theme.setCurrentIndex(max(0, self.theme.findData(c.theme)))
        self.default_prompt.setPlainText(c.default_system_prompt)
        self._update_model_fields()

    def _update_model_fields(self) -> None:
        self.local_path.setEnabled(self.local.isChecked())
        self.hub_id.setEnabled(self.hub.isChecked())
        self.online.setEnabled(self.hub.isChecked())

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a GGUF model", "", "GGUF models (*.gguf)")
        if path:
            self.local.setChecked(True)
            self.local_path.setText(path)

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a Hugging Face model folder")
        if path:
            self.local.setChecked(True)
            self.local_path.setText(path)

    def _choose_data_dir(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for Cachet's chats", str(paths.data_dir()))
        if folder:
            self.set_data_dir(Path(folder))

    def set_data_dir(self, folder: Path) -> None:
        """Choose another data folder (checked now, written on OK, used from the next start)."""
        self.error.hide()
        try:
            folder = paths.check_data_dir(folder)
        except paths.DataDirError as exc:
            self.error.setText(str(exc))
            self.error.show()
            return
        current = paths.data_dir()
        self.chosen_data_dir = None if folder == current else folder
        self.data_dir.setText(str(folder))
        if self.chosen_data_dir is None:
            self.data_dir_note.hide()
            return
        self.data_dir_note.setText(
            f"Used from the next start, for chats and settings. Those in {current} stay there: copy "
            "them over while Cachet is closed to take them along."
        )
        self.data_dir_note.show()
        layout = self.layout()
        if layout is not None:
            layout.activate()
        self.adjustSize()

    def result_config(self) -> AppConfig:
        """The edited copy; raises ConfigError when a value is invalid."""
        if self.bundled.isChecked():
            model = "default"
        elif self.local.isChecked():
            model = self.local_path.text().strip()
        else:
            model = self.hub_id.text().strip()
        return self.original.with_changes(
            model=model, online=self.online.isChecked(), device=self.device.currentText().strip(),
            dtype=self.dtype.currentText(), kv_budget_mb=self.kv_budget.value(),
            ram_budget_mb=None if self.ram_budget.value() < 0 else self.ram_budget.value(),
            disk_budget_mb=self.disk_budget.value(),
            theme=str(self.theme.currentData()), default_system_prompt=self.default_prompt.toPlainText().strip(),
        )

    def check_model(self) -> None:
        """A local model must be there now (a GGUF file, or a folder with config.json): say so here
        rather than after the window has tried to load it. Hub ids are checked when loaded."""
        from engine.sources import ModelLoadError, resolve

        if not self.local.isChecked():
            return
        path = self.local_path.text().strip()
        if not path:
            raise ConfigError("Model: choose a GGUF file or a model folder.")
        try:
            source = resolve(path)
        except ModelLoadError as exc:
            raise ConfigError(f"Model: {exc}") from exc
        if source.kind == "hub":
            raise ConfigError(f"Model: there is no file or folder at {path}.")

    def accept(self) -> None:
        try:
            self.result_config()
            self.check_model()
            if self.chosen_data_dir is not None:
                paths.set_data_dir(self.chosen_data_dir)
        except (ConfigError, paths.DataDirError, OSError) as exc:
            self.error.setText(str(exc))
            self.error.show()
            return
        super().accept()


def _budget_box(minimum: int, special: str, tip: str) -> QSpinBox:
    """A size in MiB whose lowest value means `special` ("automatic", "no snapshots")."""
    box = QSpinBox()
    box.setRange(minimum, 10_000_000)
    box.setSuffix(" MiB")
    box.setSpecialValueText(special)
    box.setGroupSeparatorShown(True)
    box.setToolTip(tip)
    return box
