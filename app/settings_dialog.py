"""Global settings: the model (or a remote server), device and dtype, the KV memory budget, the
local server for other apps, the theme, the data folder.

The dialog edits a copy of the AppConfig; `result_config()` is validated, and the window applies
only what differs (a new model means reloading it in the worker).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QApplication,
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
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.config import DTYPES, THEMES, WEIGHTS, AppConfig, ConfigError
from app.model_picker import ModelPicker
from app.protocol import ModelInfo
from engine import api_keys, paths
from engine.remote import Endpoint, RemoteError, list_models


class _ModelList(QObject):
    """Carries a server's model list (or why there is none) from the thread that asked back to the dialog."""

    done = Signal(str, object)  # (base URL asked, list of ids or the error text)


WEIGHT_NAMES = {"auto": "auto (what fits, most faithful first)", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16",
                "int8": "int8 (optimum-quanto)", "int4": "int4 (optimum-quanto)"}
NO_CUDA_TIP = "This machine has no CUDA GPU that torch can use: every layer runs on the device."


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (imports torch; the window has already, once its model loaded)."""
    import torch

    return bool(torch.cuda.is_available())


class SettingsDialog(QDialog):
    def __init__(self, config: AppConfig, parent: QWidget | None = None, model: ModelInfo | None = None) -> None:
        """`model`: the loaded model, whose weight precision and layer split the dialog shows."""
        super().__init__(parent)
        self.setWindowTitle("Cachet settings")
        self.setMinimumWidth(560)
        self.original = config
        self.model_folders = list(config.model_folders)  # the picker's added folders, saved on OK
        self.picker: ModelPicker | None = None
        self.key_changed = False  # the remote server's API key was changed (the connection is made again)
        outer = QVBoxLayout(self)
        # the settings scroll: with the notes under Precision and Weights the dialog is taller than a laptop's
        # screen, and Qt then squeezes the wrapped notes until their lines are cut
        self.scroll_area = QScrollArea()
        self.scroll_area.setWidgetResizable(True)
        self.scroll_area.setFrameShape(QScrollArea.Shape.NoFrame)
        self.scroll_area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.setContentsMargins(0, 0, 0, 0)
        self.scroll_area.setWidget(content)
        outer.addWidget(self.scroll_area, 1)

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
        browse_row = QHBoxLayout()
        browse_row.setContentsMargins(22, 0, 0, 0)
        self.browse_button = QPushButton("Browse models on this computer…")
        self.browse_button.setToolTip("The models LM Studio, Ollama, GPT4All and the Hugging Face cache downloaded, "
                                      "and those in folders you add: whether each fits this machine, and why some "
                                      "cannot be opened")
        browse_row.addWidget(self.browse_button)
        browse_row.addStretch(1)
        ml.addLayout(browse_row)
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
        self.remote = QRadioButton("An OpenAI-compatible server (vLLM, llama.cpp, Ollama, another Cachet)")
        self.remote.setToolTip("The chats are answered by a server on this or a bigger machine; it keeps its own "
                               "cache (vLLM's prefix caching, llama.cpp's slots, Cachet's pool).")
        group.addButton(self.remote)
        ml.addWidget(self.remote)
        remote_form = QFormLayout()
        remote_form.setContentsMargins(22, 0, 0, 0)
        self.remote_url = QLineEdit()
        self.remote_url.setPlaceholderText("http://127.0.0.1:8000/v1")
        self.remote_key = QLineEdit()
        self.remote_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.remote_key.setPlaceholderText("none")
        self.remote_key.setToolTip(f"Kept in {api_keys.where()}, never in the settings file.")
        model_row = QHBoxLayout()
        self.remote_model = QComboBox()
        self.remote_model.setEditable(True)
        self.remote_model.setMinimumWidth(240)
        editor = self.remote_model.lineEdit()
        assert editor is not None  # an editable combo box has one
        editor.setPlaceholderText("the server's first model")
        self.fetch_models = QPushButton("Fetch models")
        self.fetch_models.setToolTip("Ask the server which models it offers (GET /v1/models)")
        model_row.addWidget(self.remote_model, 1)
        model_row.addWidget(self.fetch_models)
        self.remote_note = QLabel()
        self.remote_note.setWordWrap(True)
        self.remote_note.hide()
        remote_form.addRow("Address", self.remote_url)
        remote_form.addRow("API key", self.remote_key)
        remote_form.addRow("Model", model_row)
        remote_form.addRow(self.remote_note)
        ml.addLayout(remote_form)
        layout.addWidget(model_box)

        run_box = QGroupBox("Hardware and memory")
        form = QFormLayout(run_box)
        self.device = QComboBox()
        self.device.setEditable(True)
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.device.setToolTip("auto: a CUDA GPU if present, else Apple's MPS, else the CPU")
        self.dtype = QComboBox()
        self.dtype.addItems(list(DTYPES))
        self.dtype.setToolTip("auto: bf16 on GPUs that support it, fp16 on other GPUs; on the CPU the fastest of "
                              "float32, bfloat16 and float32 with bf16 weight copies, measured once on this "
                              "machine. Only float32 is exact: a kept cache then answers as recomputing would.")
        self.precision_now = QLabel()
        self.precision_now.setWordWrap(True)
        self.precision_now.setText(describe_precision(model))
        self.precision_now.setVisible(bool(self.precision_now.text()))
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
        self.weights = QComboBox()
        for w in WEIGHTS:
            self.weights.addItem(WEIGHT_NAMES[w], w)
        self.weights.setToolTip("The weights' precision. auto: the memory advisor picks the most faithful one whose "
                                "weights and a chat of the model's context fit. int8/int4 quantize the linear layers "
                                "over the precision above, once, and keep the quantized copy on disk.")
        layers = model.layers if model is not None and model.layers and not model.remote else 0
        self.gpu_layers = QSpinBox()
        self.gpu_layers.setRange(-1, layers or 9999)
        self.gpu_layers.setSpecialValueText("auto")
        self.gpu_layers.setSuffix(f" of {layers}" if layers else "")
        self.has_cuda = cuda_available()
        if self.has_cuda:
            self.gpu_layers.setToolTip("Decoder layers on the GPU; the others run from RAM on the CPU, slower "
                                       "(llama.cpp's n_gpu_layers). auto: all of them when they fit, else as many "
                                       "as fit.")
        else:
            self.gpu_layers.setEnabled(False)
            self.gpu_layers.setToolTip(NO_CUDA_TIP)
        self.weights_now = QLabel()
        self.weights_now.setWordWrap(True)
        self.weights_now.setText(describe_weights(model))
        self.weights_now.setVisible(bool(self.weights_now.text()))
        form.addRow("Device", self.device)
        form.addRow("Precision", self.dtype)
        form.addRow(self.precision_now)
        form.addRow("Weights", self.weights)
        form.addRow("Layers on the GPU", self.gpu_layers)
        form.addRow(self.weights_now)
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

        serve_box = QGroupBox("Other apps")
        sl = QHBoxLayout(serve_box)
        self.serve = QCheckBox("Serve chats to other apps on localhost, port")
        self.serve.setToolTip("An OpenAI-compatible server (/v1/chat/completions) on 127.0.0.1 only, with the "
                              "model and caches loaded here: editors, agents and scripts re-use the caches of "
                              "their conversations. Other machines cannot reach it.")
        self.serve_port = QSpinBox()
        self.serve_port.setRange(1024, 65535)
        self.serve_url = QLabel()
        self.serve_url.setTextInteractionFlags(self.serve_url.textInteractionFlags()
                                               | Qt.TextInteractionFlag.TextSelectableByMouse)
        sl.addWidget(self.serve)
        sl.addWidget(self.serve_port)
        sl.addWidget(self.serve_url, 1)
        layout.addWidget(serve_box)

        self.error = QLabel()
        self.error.setStyleSheet("color: #d9534f;")
        self.error.setWordWrap(True)
        self.error.hide()
        outer.addWidget(self.error)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        outer.addWidget(self.buttons)

        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        file_button.clicked.connect(self._choose_file)
        self.browse_button.clicked.connect(self.browse_models)
        folder_button.clicked.connect(self._choose_folder)
        open_button.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(paths.data_dir()))))
        self.change_data_dir.clicked.connect(self._choose_data_dir)
        self.default_data_dir.clicked.connect(lambda: self.set_data_dir(paths.default_data_dir()))
        for b in (self.bundled, self.local, self.hub, self.remote):
            b.toggled.connect(self._update_model_fields)
        self.fetch_models.clicked.connect(self._fetch_models)
        self._model_list = _ModelList(self)
        self._model_list.done.connect(self._models_fetched)
        self.serve.toggled.connect(self._update_serve_fields)
        self.serve_port.valueChanged.connect(self._update_serve_fields)
        self._fill(config)
        self.fit_to_screen()

    def fit_to_screen(self) -> None:
        """As tall as the settings need, up to 90% of the screen's height (the rest scrolls)."""
        content = self.scroll_area.widget()
        assert content is not None  # set in __init__
        content.adjustSize()
        screen = self.screen() or QApplication.primaryScreen()
        room = int(screen.availableGeometry().height() * 0.9) if screen is not None else 800
        chrome = self.sizeHint().height() - self.scroll_area.sizeHint().height()
        self.resize(max(self.width(), self.minimumWidth()), min(content.sizeHint().height() + chrome, room))

    def _fill(self, c: AppConfig) -> None:
        model = c.model.strip()
        self.remote_url.setText(c.remote_url)
        self.remote_model.setCurrentText(c.remote_model)
        self.remote_key.setText(api_keys.load(c.remote_url.strip()) or "" if c.remote_url.strip() else "")
        self.serve.setChecked(c.serve)
        self.serve_port.setValue(c.serve_port)
        if c.engine_source == "remote":
            self.remote.setChecked(True)
            if model not in ("", "default"):
                self.local_path.setText(model)
        elif model in ("", "default"):
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
        self.weights.setCurrentIndex(max(0, self.weights.findData(c.weights)))
        self.gpu_layers.setValue(-1 if c.gpu_layers is None else c.gpu_layers)
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
        for w in (self.remote_url, self.remote_key, self.remote_model, self.fetch_models):
            w.setEnabled(self.remote.isChecked())
        self.serve.setEnabled(not self.remote.isChecked())
        self.serve.setToolTip(self.serve.toolTip() if not self.remote.isChecked() else
                              "Serving needs a model loaded here, not a remote engine.")
        self._update_serve_fields()

    def _update_serve_fields(self) -> None:
        on = self.serve.isChecked() and self.serve.isEnabled()
        self.serve_port.setEnabled(on)
        self.serve_url.setText(f"http://127.0.0.1:{self.serve_port.value()}/v1" if on else "")

    def _endpoint(self) -> Endpoint:
        return Endpoint(self.remote_url.text().strip(), self.remote_model.currentText().strip(),
                        self.remote_key.text().strip() or None)

    def _fetch_models(self) -> None:
        """Ask the server for its models off the GUI thread (an unreachable address waits seconds)."""
        try:
            endpoint = self._endpoint().validate()
        except RemoteError as exc:
            self._remote_message(str(exc), error=True)
            return
        self.fetch_models.setEnabled(False)
        self._remote_message(f"Asking {endpoint.root} for its models…")
        signal = self._model_list.done

        def ask() -> None:
            try:
                result: object = list_models(endpoint)
            except RemoteError as exc:
                result = str(exc)
            signal.emit(endpoint.root, result)

        threading.Thread(target=ask, name="cachet-list-models", daemon=True).start()

    def _models_fetched(self, root: str, result: object) -> None:
        self.fetch_models.setEnabled(self.remote.isChecked())
        if isinstance(result, str):
            self._remote_message(result, error=True)
            return
        models = [str(m) for m in result] if isinstance(result, list) else []
        current = self.remote_model.currentText().strip()
        self.remote_model.clear()
        self.remote_model.addItems(models)
        self.remote_model.setCurrentText(current if current in models or not models else models[0])
        self._remote_message(f"{root} offers {len(models)} model{'s' if len(models) != 1 else ''}."
                             if models else f"{root} offers no model.", error=not models)

    def _remote_message(self, text: str, error: bool = False) -> None:
        self.remote_note.setText(text)
        self.remote_note.setStyleSheet("color: #d9534f;" if error else "")
        self.remote_note.show()

    def browse_models(self) -> ModelPicker:
        """Open the model picker (window-modal, without blocking); the chosen model fills in the local path."""
        picker = ModelPicker(replace(self.original, model_folders=self.model_folders), self)
        picker.setWindowModality(Qt.WindowModality.WindowModal)
        picker.finished.connect(lambda _code: self._picker_closed(picker))
        self.picker = picker
        picker.open()
        return picker

    def _picker_closed(self, picker: ModelPicker) -> None:
        self.model_folders = list(picker.folders)
        if picker.chosen_path:
            self.local.setChecked(True)
            self.local_path.setText(picker.chosen_path)
            self.error.hide()
        picker.deleteLater()
        self.picker = None

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
        self.fit_to_screen()

    def result_config(self) -> AppConfig:
        """The edited copy; raises ConfigError when a value is invalid."""
        source = "local"
        if self.bundled.isChecked():
            model = "default"
        elif self.local.isChecked():
            model = self.local_path.text().strip()
        elif self.hub.isChecked():
            model = self.hub_id.text().strip()
        else:  # a remote engine: the local model stays what it was, for when the user comes back
            model, source = self.original.model, "remote"
            if not self.remote_url.text().strip():
                raise ConfigError("Server address: give one like http://127.0.0.1:8000/v1.")
        return self.original.with_changes(
            engine_source=source, remote_url=self.remote_url.text().strip(),
            remote_model=self.remote_model.currentText().strip(), serve=self.serve.isChecked(),
            serve_port=self.serve_port.value(), model_folders=list(self.model_folders),
            model=model, online=self.online.isChecked(), device=self.device.currentText().strip(),
            dtype=self.dtype.currentText(), weights=str(self.weights.currentData()),
            gpu_layers=self._gpu_layers(), kv_budget_mb=self.kv_budget.value(),
            ram_budget_mb=None if self.ram_budget.value() < 0 else self.ram_budget.value(),
            disk_budget_mb=self.disk_budget.value(),
            theme=str(self.theme.currentData()), default_system_prompt=self.default_prompt.toPlainText().strip(),
        )

    def _gpu_layers(self) -> int | None:
        """The spin's value, "auto" being None (as the advisor plans). Without CUDA the spin is off: layers on
        a GPU (a setting from a machine with one) cannot apply here and go back to auto, 0 stays."""
        if not self.has_cuda:
            return self.original.gpu_layers if not self.original.gpu_layers else None
        return None if self.gpu_layers.value() < 0 else self.gpu_layers.value()

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
            if self.remote.isChecked():
                self.key_changed = self._save_key()
            if self.chosen_data_dir is not None:
                paths.set_data_dir(self.chosen_data_dir)
        except (ConfigError, paths.DataDirError, OSError) as exc:
            self.error.setText(str(exc))
            self.error.show()
            return
        super().accept()


    def _save_key(self) -> bool:
        """Keep the remote server's API key (keyring or a user-only file); True when it changed."""
        url, key = self.remote_url.text().strip(), self.remote_key.text().strip()
        if (api_keys.load(url) or "") == key:
            return False
        api_keys.save(url, key)
        return True


def describe_precision(model: ModelInfo | None) -> str:
    """"Now: bfloat16 — measured fastest on this CPU (…). bfloat16: replies can differ …", for the loaded model."""
    if model is None or model.remote:
        return ""
    note = model.precision_note if model.precision_note != "chosen" else ""
    # the probe's note starts with the precision's own name ("bfloat16: measured fastest …"): said once
    why = f", {note.split(': ', 1)[-1]}" if note else ""
    return f"Now: {model.dtype}{why}. {model.exactness_note}"


def describe_weights(model: ModelInfo | None) -> str:
    """"Now: int4 weights over bfloat16 · 20 of 30 layers on cuda:0, 10 in RAM (why)", for the loaded model."""
    if model is None or model.remote or not model.weights:
        return ""
    # the dtype label already reads "int4 weights over bfloat16" for quantized weights
    text = f"Now: {model.dtype if model.weights in ('int8', 'int4') else model.weights + ' weights'}"
    text += f" · {model.split}" if model.split else f" · every layer on {model.device}"
    return text + (f" ({model.weights_note})" if model.weights_note else "")


def _budget_box(minimum: int, special: str, tip: str) -> QSpinBox:
    """A size in MiB whose lowest value means `special` ("automatic", "no snapshots")."""
    box = QSpinBox()
    box.setRange(minimum, 10_000_000)
    box.setSuffix(" MiB")
    box.setSpecialValueText(special)
    box.setGroupSeparatorShown(True)
    box.setToolTip(tip)
    return box
