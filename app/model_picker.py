"""The models already on this computer, in a dialog: what LM Studio, Ollama, GPT4All and the Hugging
Face cache downloaded, and the folders the user adds (engine/discovery.py finds and describes them,
engine.memory.fits_by_precision says whether each fits this machine per weight precision).

The scan runs in a thread, never on the GUI thread (a first scan reads every file's header; a
folder model's config goes through transformers), and reports back with a queued signal. Models
Cachet cannot open (unsupported, broken) are listed greyed, with the reason, and cannot be chosen.

Also here: `check_model_path`, which says whether a file or folder dropped on the window is a model
Cachet can open, and `ModelScanner`, which the window's first-run hint uses too.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QModelIndex, QObject, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.config import AppConfig, ConfigError
from engine import discovery
from engine.discovery import DiscoveredModel, Location

GIB = 1024**3
COLUMNS = ("Name", "Architecture", "Parameters", "Quantization", "Context", "Size", "Found in")
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
PATH_ROLE = Qt.ItemDataRole.UserRole + 2


@dataclass(frozen=True)
class ScanResult:
    """What one scan found. `fits[i]` belongs to `models[i]` ({} for a model that cannot be used, or
    when fits were not asked for); `ladder` names the precisions the fits cover."""

    models: list[DiscoveredModel]
    locations: list[Location]
    fits: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    ladder: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def usable(self) -> list[DiscoveredModel]:
        return [m for m in self.models if m.usable]


def scan_models(folders: Sequence[str], *, with_fits: bool = True, device: str = "auto") -> ScanResult:
    """Discover the models (blocking: call it off the GUI thread) and, with `with_fits`, whether each
    usable one fits this machine per weight precision."""
    locations = discovery.default_locations()
    locations += [Location("folder", Path(f).expanduser()) for f in folders]
    try:
        models = discovery.scan(locations, cache=discovery.cache_file())
    except Exception as exc:  # a bug must not leave the dialog scanning for ever
        return ScanResult([], locations, error=f"The scan failed: {type(exc).__name__}: {exc}")
    if not with_fits or not any(m.usable for m in models):
        return ScanResult(models, locations)
    from engine import memory
    from engine.models import pick_device

    try:
        hardware = memory.read_hardware(pick_device(device))
        ladder = [p for p, _ in memory.precision_ladder("auto", hardware)]
        fits = [memory.fits_by_precision(m, hardware, ladder) if m.usable else {} for m in models]
    except Exception as exc:  # the table is still worth showing without the fit columns
        return ScanResult(models, locations, error=f"Whether they fit could not be worked out: {exc}")
    return ScanResult(models, locations, fits, ladder)


class ModelScanner(QObject):
    """Runs `scan_models` in a thread.

    Signals:
        finished(ScanResult): on the GUI thread, once the scan is done (`running` is False by then).
    """

    finished = Signal(object)
    _delivered = Signal(object)  # emitted from the scan's thread, queued to this object's (the GUI) thread

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.running = False
        self._delivered.connect(self._deliver)

    def start(self, folders: Sequence[str], *, with_fits: bool = True, device: str = "auto") -> None:
        self.running = True
        signal, folders = self._delivered, list(folders)

        def work() -> None:
            result = scan_models(folders, with_fits=with_fits, device=device)
            with suppress(RuntimeError):  # the dialog was closed before the scan ended
                signal.emit(result)

        threading.Thread(target=work, name="cachet-model-scan", daemon=True).start()

    def _deliver(self, result: object) -> None:
        self.running = False
        self.finished.emit(result)


def source_names(models: Sequence[DiscoveredModel]) -> str:
    """The applications the models came from, in the order they are searched: "LM Studio, Ollama"."""
    order = list(discovery.SOURCES)
    sources = sorted({m.source for m in models}, key=lambda s: order.index(s) if s in order else len(order))
    return ", ".join(discovery.SOURCES.get(s, s) for s in sources)


def where_looked(locations: Sequence[Location]) -> str:
    return "; ".join(f"{discovery.SOURCES.get(loc.source, loc.source)}: {loc.path}" for loc in locations)


def check_model_path(path: Path) -> DiscoveredModel:
    """A file or folder the user gave (dropped on the window) described, when Cachet can open it;
    raises ConfigError saying why not otherwise."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist.")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"{path.name} is not a model: Cachet opens a .gguf file or a Hugging Face model "
                              "folder (one with config.json).")
        model = discovery.describe_gguf(path, "folder", str(path.parent))
    elif path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (f" It holds {len(ggufs)} GGUF file{'s' if len(ggufs) != 1 else ''} ({ggufs[0]}…): drop one of "
                    "them, or add the folder in File → Browse models on this computer…" if ggufs else "")
            raise ConfigError(f"{path.name} is not a model folder: it has no config.json.{hint}")
        model = discovery.describe_folder(path, "folder", str(path.parent))
    else:
        raise ConfigError(f"{path.name} is neither a file nor a folder.")
    if not model.usable:
        raise ConfigError(f"{path.name} cannot be opened ({model.status}): {model.reason}.")
    return model


def _count(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _size(n: int) -> str:
    if not n:
        return "—"
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def _item(text: str, sort: object = None) -> QStandardItem:
    item = QStandardItem(text)
    item.setEditable(False)
    item.setData(text.lower() if sort is None else sort, SORT_ROLE)
    return item


FIT_TIPS = {"yes": "fits with its whole context", "sink": "fits only with attention sinks (a rolling window)",
            "no": "does not fit", "?": "its config could not be read"}


class ModelPicker(QDialog):
    """Choose one of the models on this computer.

    `chosen_path` is the chosen model's file or folder once accepted; `folders` the added folders, as
    added and removed here (the caller keeps them in AppConfig.model_folders, whether or not a model
    was chosen).

    Signals:
        scanned(ScanResult): the table shows a new scan.
    """

    scanned = Signal(object)

    def __init__(self, config: AppConfig, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Models on this computer")
        self.resize(1180, 520)
        self.config = config
        self.folders: list[str] = list(config.model_folders)
        self.chosen_path: str | None = None
        self.result_: ScanResult | None = None
        self._again = False
        layout = QVBoxLayout(self)

        intro = QLabel("GGUF files and Hugging Face model folders that LM Studio, Ollama, GPT4All and the Hugging "
                       "Face cache downloaded, and those in the folders you add. Cachet opens them where they are, "
                       "without copying them. Greyed ones cannot be opened here: point at one to see why.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        top = QHBoxLayout()
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter by name, architecture, quantization, where it was found…")
        self.filter.setClearButtonEnabled(True)
        self.add_folder_button = QPushButton("Add folder…")
        self.add_folder_button.setToolTip("Also look in a folder of your own (kept in the settings)")
        self.rescan_button = QPushButton("Scan again")
        top.addWidget(self.filter, 1)
        top.addWidget(self.add_folder_button)
        top.addWidget(self.rescan_button)
        layout.addLayout(top)
        # The added folders, each with a link that stops searching it; it wraps however many there are.
        self.folders_label = QLabel()
        self.folders_label.setWordWrap(True)
        self.folders_label.setTextFormat(Qt.TextFormat.RichText)
        self.folders_label.setTextInteractionFlags(Qt.TextInteractionFlag.LinksAccessibleByMouse
                                                   | Qt.TextInteractionFlag.LinksAccessibleByKeyboard)
        layout.addWidget(self.folders_label)

        self.model = QStandardItemModel(0, 0, self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setSortingEnabled(True)
        self.table.setWordWrap(False)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setStretchLastSection(True)
        layout.addWidget(self.table, 1)

        self.state = QLabel()  # "Scanning…", how many were found, or where it looked when none was
        self.state.setWordWrap(True)
        self.state.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.state)
        self.path_label = QLabel()
        self.path_label.setObjectName("muted")
        self.path_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.path_label)
        self.error = QLabel()
        self.error.setStyleSheet("color: #d9534f;")
        self.error.setWordWrap(True)
        self.error.hide()
        layout.addWidget(self.error)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        ok = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        ok.setText("Use this model")
        layout.addWidget(self.buttons)

        self.scanner = ModelScanner(self)
        self.scanner.finished.connect(self._scanned)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self.filter.textChanged.connect(self._filter_changed)
        self.add_folder_button.clicked.connect(self._choose_folder)
        self.rescan_button.clicked.connect(self.rescan)
        self.folders_label.linkActivated.connect(self._folder_link)
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)
        self.table.doubleClicked.connect(lambda _index: self.accept() if self.selected_path() else None)
        self._show_folders()
        self.rescan()

    # ----- scanning ---------------------------------------------------------------------------------------
    def rescan(self) -> None:
        """Look again, off the GUI thread; the table says "Scanning…" meanwhile."""
        if self.scanner.running:
            self._again = True  # a folder was added meanwhile: look once more when this scan ends
            return
        self._again = False
        self.state.setText("Scanning LM Studio's, Ollama's and GPT4All's folders, the Hugging Face cache"
                           + (" and your folders" if self.folders else "") + "…")
        self.add_folder_button.setEnabled(False)
        self.rescan_button.setEnabled(False)
        self.folders_label.setEnabled(False)
        self._update_ok()
        self.scanner.start(self.folders, device=self.config.device)

    @property
    def scanning(self) -> bool:
        return self.scanner.running

    def _scanned(self, result: ScanResult) -> None:
        if self._again:
            self.rescan()
            return
        self.result_ = result
        self.add_folder_button.setEnabled(True)
        self.rescan_button.setEnabled(True)
        self.folders_label.setEnabled(True)
        self._fill(result)
        usable = len(result.usable)
        if result.error and not result.models:
            self.state.setText(result.error)
        elif not result.models:
            self.state.setText(
                "No models found. Looked in " + where_looked(result.locations) + ". If your models are "
                "elsewhere, add their folder with “Add folder…”: GGUF files and Hugging Face model folders "
                "(config.json with safetensors weights) in it are listed.")
        else:
            others = len(result.models) - usable
            self.state.setText(f"{len(result.models)} model{'s' if len(result.models) != 1 else ''} found, "
                               f"{usable} that Cachet can open" + (f" ({others} greyed: point at one to see why)"
                                                                    if others else "") + "."
                               + (f" {result.error}" if result.error else "") + self._fit_legend(result))
        self.scanned.emit(result)

    def _fit_legend(self, result: ScanResult) -> str:
        if not result.ladder:
            return ""
        return (f" Columns {', '.join(result.ladder)}: does it fit this machine with its weights in that "
                "precision — yes; N/L: N of its L layers on the GPU, the rest in RAM; sink: only with attention "
                "sinks; no.")

    def _fill(self, result: ScanResult) -> None:
        selected = self.selected_path()
        headers = [*COLUMNS, *result.ladder, "Status"]
        self.model.clear()
        self.model.setColumnCount(len(headers))
        self.model.setHorizontalHeaderLabels(headers)
        fits = result.fits or [{} for _ in result.models]
        for m, fit in zip(result.models, fits, strict=True):
            status = "ok" if m.usable else f"{m.status}: {m.reason}"
            row = [
                _item(m.name), _item(m.architecture or "—"), _item(_count(m.params), m.params or 0),
                _item(m.quantization or "—"),
                _item(f"{m.context_length:,}" if m.context_length else "—", m.context_length or 0),
                _item(_size(m.size_bytes), m.size_bytes), _item(m.source_label),
            ]
            for precision in result.ladder:
                cell = fit.get(precision, {})
                item = _item(cell.get("cell", "—"))
                item.setToolTip(self._fit_tip(precision, cell))
                row.append(item)
            rank = {"usable": 0, "unsupported": 1, "broken": 2}.get(m.status, 3)
            row.append(_item(status, f"{rank} {m.name.lower()}"))  # by status, then by name
            tip = f"{m.path}\nFound in {m.source_label}: {m.found_in}"
            for item in row:
                item.setData(m.path, PATH_ROLE)
                if not m.usable:
                    item.setFlags(Qt.ItemFlag.NoItemFlags)  # greyed and never selectable
                    item.setToolTip(f"Cannot be opened ({m.status}): {m.reason}\n{tip}")
                elif not item.toolTip():
                    item.setToolTip(tip)
            self.model.appendRow(row)
        header = self.table.horizontalHeader()
        for column in range(len(headers) - 1):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        self.table.resizeColumnToContents(0)
        self.table.setColumnWidth(0, min(self.table.columnWidth(0), 320))
        # usable first, then by name (the scan's order), until the user sorts by another column
        self.table.sortByColumn(len(headers) - 1, Qt.SortOrder.AscendingOrder)
        if selected:
            self.select_path(selected)
        self._update_ok()

    @staticmethod
    def _fit_tip(precision: str, cell: dict[str, Any]) -> str:
        word = cell.get("cell")
        if word is None:
            return ""
        if word == "?":
            return f"{precision}: {FIT_TIPS['?']} ({cell.get('error')})"
        plan = cell.get("plan") or {}
        if "/" in str(word):
            text = f"{word} of its layers on the GPU, the rest in RAM"
        else:
            text = FIT_TIPS.get(str(word), str(word))
        tokens = cell.get("tokens_fit")
        more = f"; KV {cell['kv']}" if cell.get("kv") else ""
        more += f"; {tokens:,} tokens fit" if isinstance(tokens, int) else ""
        size = plan.get("total_bytes")
        more += f"; weights {size / GIB:.2f} GiB" if isinstance(size, int) else ""
        return f"Weights in {precision}: {text}{more}."

    # ----- choosing ---------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, str]]:
        """The rows shown (after the filter), each as {header: text}, plus "enabled" ("yes"/"no")."""
        headers = [str(self.proxy.headerData(c, Qt.Orientation.Horizontal)) for c in range(self.proxy.columnCount())]
        shown = []
        for r in range(self.proxy.rowCount()):
            index = self.proxy.index(r, 0)
            row = {h: str(self.proxy.index(r, c).data()) for c, h in enumerate(headers)}
            row["enabled"] = "yes" if self.proxy.flags(index) & Qt.ItemFlag.ItemIsEnabled else "no"
            shown.append(row)
        return shown

    def select_path(self, path: str) -> bool:
        """Select the row of the model at `path`; False when it is not shown or cannot be chosen."""
        for r in range(self.proxy.rowCount()):
            index = self.proxy.index(r, 0)
            if index.data(PATH_ROLE) == path and self.proxy.flags(index) & Qt.ItemFlag.ItemIsSelectable:
                self.table.selectRow(r)
                return True
        return False

    def select_name(self, name: str) -> bool:
        """Select the row of the model named `name`, as a click on it would."""
        for r in range(self.proxy.rowCount()):
            index = self.proxy.index(r, 0)
            if index.data() == name:
                self.table.setCurrentIndex(index)
                self.table.selectRow(r)
                return self.selected_path() is not None
        return False

    def selected_path(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        index: QModelIndex = rows[0]
        if not self.proxy.flags(index) & Qt.ItemFlag.ItemIsEnabled:
            return None
        path = index.data(PATH_ROLE)
        return str(path) if path else None

    def _selection_changed(self) -> None:
        path = self.selected_path()
        self.path_label.setText(path or "")
        self._update_ok()

    def _filter_changed(self, text: str) -> None:
        self.proxy.setFilterFixedString(text.strip())
        if self.selected_path() is None:
            self.path_label.setText("")
        self._update_ok()

    def _update_ok(self) -> None:
        ok = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        ok.setEnabled(not self.scanner.running and self.selected_path() is not None)

    def accept(self) -> None:
        path = self.selected_path()
        if path is None:
            return
        self.chosen_path = path
        super().accept()

    # ----- folders ----------------------------------------------------------------------------------------
    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A folder with GGUF files or model folders", str(Path.home()))
        if folder:
            self.add_folder(folder)

    def add_folder(self, folder: str | Path) -> bool:
        """Search `folder` too (checked as the settings check it) and scan again; False with the reason
        shown when it cannot be added."""
        self.error.hide()
        path = Path(folder).expanduser()
        text = str(path.resolve()) if path.is_absolute() else str(path)
        if not path.is_dir():
            self.error.setText(f"{folder} is not a folder.")
            self.error.show()
            return False
        if text in self.folders:
            self.error.setText(f"{text} is already searched.")
            self.error.show()
            return False
        try:
            self.config = self.config.with_changes(model_folders=[*self.folders, text])
        except ConfigError as exc:
            self.error.setText(str(exc))
            self.error.show()
            return False
        self.folders = list(self.config.model_folders)
        self._show_folders()
        self.rescan()
        return True

    def remove_folder(self, folder: str) -> bool:
        """Stop searching `folder`, one the user added, and scan again; False when it is not one of them."""
        self.error.hide()
        if folder not in self.folders:
            return False
        self.config = self.config.with_changes(model_folders=[f for f in self.folders if f != folder])
        self.folders = list(self.config.model_folders)
        self._show_folders()
        self.rescan()
        return True

    def _folder_link(self, link: str) -> None:
        kind, _, number = link.partition(":")
        if kind == "remove" and number.isdigit() and int(number) < len(self.folders):
            self.remove_folder(self.folders[int(number)])

    def _show_folders(self) -> None:
        """List the added folders above the table, each with its "Remove" link (hidden when there are none)."""
        self.folders_label.setVisible(bool(self.folders))
        items = [f"{html.escape(folder)} (<a href=\"remove:{n}\">Remove</a>)" for n, folder in enumerate(self.folders)]
        self.folders_label.setText("Your folders: " + ", ".join(items))
        self.folders_label.setToolTip("Models in these folders are listed too; “Remove” stops looking in one "
                                      "(the folder and its files stay where they are).")
