"""The main window: the chat list, the conversation with its input, the per-chat settings dock and
the status bar, wired to the controller and the engine worker."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QCoreApplication, Qt, QTimer, Signal
from PySide6.QtGui import (
    QAction,
    QActionGroup,
    QCloseEvent,
    QDragEnterEvent,
    QDragMoveEvent,
    QDropEvent,
    QGuiApplication,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app import theme as themes
from app.chat_settings import ChatSettingsPanel
from app.chat_view import ChatView, MessageView, message_views
from app.client import EngineClient
from app.composer import Composer
from app.config import AppConfig, ConfigError, save_config
from app.controller import ChatController, ImportOutcome
from app.data_folder import DataFolderGuard
from app.markdown_render import MarkdownRenderer
from app.meters import Meters, describe_restore
from app.protocol import Budgets, CacheRestored, Loader, ModelInfo, ServerState
from app.sidebar import ChatEntry, Sidebar
from engine.lock import DataFolderLock
from engine.sources import ModelLoadError
from engine.specs import AUTO, LOSSY, CacheSpec
from engine.store import ChatSettings, ChatStore, StoredChat, StoreError

if TYPE_CHECKING:  # imported when first used: the window is shown before anything it does not need yet
    from app.model_picker import ModelPicker, ModelScanner, ScanResult

MEMORY_REFRESH_MS = 1000
BUDGET_SETTINGS = {"kv_budget_mb", "ram_budget_mb", "disk_budget_mb"}
MODEL_SETTINGS = {"model", "device", "dtype", "weights", "gpu_layers", "online", "engine_source", "remote_url",
                  "remote_model"}
MIB = 1024 * 1024


def budgets(config: AppConfig) -> Budgets:
    """The cache budgets of the global settings, in bytes."""
    return Budgets(device=config.kv_budget_mb * MIB,
                   host=None if config.ram_budget_mb is None else config.ram_budget_mb * MIB,
                   disk=config.disk_budget_mb * MIB)


class Banner(QFrame):
    """A line across the top of the conversation that stays until dismissed or resolved: a full disk,
    a salvaged database, replies cut off by the last close. Unlike status bar messages it does not
    time out or cover the engine's progress."""

    def __init__(self, kind: str, text: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.action_button: QPushButton | None = None
        self.extra_buttons: list[QPushButton] = []
        self.setObjectName("banner")
        self.setProperty("kind", kind)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(16, 6, 8, 6)
        self.label = QLabel(text)
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.label, 1)
        self.close_button = QToolButton()
        self.close_button.setText("✕")
        self.close_button.setToolTip("Dismiss")
        self.close_button.setAutoRaise(True)
        self.close_button.clicked.connect(self.deleteLater)
        layout.addWidget(self.close_button)

    def set_action(self, text: str, slot: Callable[[], object]) -> QPushButton:
        """A button beside the text (before ✕), e.g. "Browse"."""
        if self.action_button is None:
            self.action_button = QPushButton(text)
            layout = self.layout()
            assert isinstance(layout, QHBoxLayout)
            layout.insertWidget(layout.count() - 1, self.action_button)
        self.action_button.setText(text)
        self.action_button.clicked.connect(slot)
        return self.action_button

    def add_action(self, text: str, slot: Callable[[], object]) -> QPushButton:
        """One more button beside the text (after those added before)."""
        button = QPushButton(text)
        button.clicked.connect(slot)
        layout = self.layout()
        assert isinstance(layout, QHBoxLayout)
        layout.insertWidget(layout.count() - 1, button)
        self.extra_buttons.append(button)
        return button

    def set_text(self, kind: str, text: str) -> None:
        self.label.setText(text)
        if self.property("kind") != kind:
            self.setProperty("kind", kind)
            self.style().unpolish(self)
            self.style().polish(self)


class MainWindow(QMainWindow):
    """Signals:
        import_done(object): an import started by `import_file` ended (its ImportOutcome), after its dialog.
    """

    import_done = Signal(object)

    def __init__(self, store: ChatStore, config: AppConfig, loader: Loader, save_settings: bool = True,
                 parent: QWidget | None = None, folder_lock: DataFolderLock | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Cachet")
        self.resize(1200, 780)
        self.store = store
        self.config = config
        self.save_settings = save_settings
        self.current_chat: int | None = None
        self.theme = themes.resolve(config.theme)
        self.renderer = MarkdownRenderer(self.theme)

        self.engine = EngineClient(loader, self)
        # The configured model is loaded by default_loader: a large GGUF without a converted copy is asked about
        # at start (app/conversion_consent.py). Off for a loader a test or a caller gives.
        self.consent_at_start = False
        self.controller = ChatController(store, self.engine, config, self)
        # The data folder deleted (or moved, replaced) under the running app: told, and saved again on request.
        self.data_guard = DataFolderGuard(store, folder_lock, self)

        # ----- widgets -------------------------------------------------------------------------------
        self.sidebar = Sidebar()
        self.chat_view = ChatView(self.renderer)
        self.composer = Composer()
        header = QWidget()
        header.setObjectName("chatHeader")
        hl = QHBoxLayout(header)
        hl.setContentsMargins(20, 8, 12, 8)
        self.title_label = QLabel()
        self.title_label.setObjectName("chatTitle")
        self.lossy_badge = QLabel("lossy cache")
        self.lossy_badge.setObjectName("badge")
        self.lossy_badge.setProperty("kind", "lossy")
        self.lossy_badge.setToolTip("This chat's KV cache strategy is lossy: the model may remember parts of the "
                                    "chat only approximately.")
        self.lossy_badge.hide()
        self.context_label = QLabel()
        self.context_label.setObjectName("muted")
        self.settings_button = QToolButton()
        self.settings_button.setText("Chat settings")
        self.settings_button.setCheckable(True)
        self.settings_button.setToolTip("Show or hide this chat's settings (Ctrl+Shift+,)")
        hl.addWidget(self.title_label)
        hl.addWidget(self.lossy_badge)
        hl.addStretch(1)
        hl.addWidget(self.context_label)
        hl.addWidget(self.settings_button)

        column = QWidget()
        cl = QVBoxLayout(column)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.setSpacing(0)
        cl.addWidget(header)
        self.banner_area = QVBoxLayout()
        self.banner_area.setContentsMargins(0, 0, 0, 0)
        self.banner_area.setSpacing(0)
        self.banners: dict[str, Banner] = {}
        cl.addLayout(self.banner_area)
        cl.addWidget(self.chat_view, 1)
        cl.addWidget(self.composer)

        splitter = QSplitter()
        splitter.addWidget(self.sidebar)
        splitter.addWidget(column)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([270, 930])
        splitter.setChildrenCollapsible(False)
        self.setCentralWidget(splitter)

        self.settings_panel = ChatSettingsPanel()
        self.dock = QDockWidget("Chat settings", self)
        self.dock.setObjectName("chatSettingsDock")
        self.dock.setWidget(self.settings_panel)
        self.dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetClosable
                              | QDockWidget.DockWidgetFeature.DockWidgetMovable)
        self.dock.setMinimumWidth(300)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.resizeDocks([self.dock], [380], Qt.Orientation.Horizontal)
        self.dock.hide()
        self.meters = Meters(self.statusBar())
        self._build_menus()
        self.setAcceptDrops(True)  # a .gguf file or a model folder dropped anywhere on the window opens it
        self.picker: ModelPicker | None = None
        self.hint_scanner: ModelScanner | None = None  # the first-run hint's background scan, once started
        self._consent_cancelled = "converting it"  # what a cancelled consent_to_conversion cancelled, in words

        # ----- wiring ---------------------------------------------------------------------------------
        self.sidebar.chat_selected.connect(self.select_chat)
        self.sidebar.new_requested.connect(self.new_chat)
        self.sidebar.rename_requested.connect(self.controller.rename)
        self.sidebar.delete_requested.connect(self.delete_chat)
        self.sidebar.undo_requested.connect(self.undo_delete)
        self.sidebar.search_changed.connect(lambda _t: self.refresh_sidebar())
        self.sidebar.export_requested.connect(self._export_dialog)
        self.composer.send_requested.connect(self._send_from_composer)
        self.composer.stop_requested.connect(self.stop)
        self.chat_view.edit_submitted.connect(self._edit_submitted)
        self.chat_view.regenerate_requested.connect(self.regenerate)
        self.chat_view.notice_action.connect(self._notice_action)
        self.chat_view.copied.connect(lambda what: self.statusBar().showMessage(f"Copied the {what}.", 2000))
        self.settings_button.toggled.connect(self.dock.setVisible)
        self.dock.visibilityChanged.connect(self.settings_button.setChecked)
        self.settings_panel.apply_requested.connect(self._apply_chat_settings)

        self.controller.chats_changed.connect(self.refresh_sidebar)
        self.controller.chat_touched.connect(self._chat_touched)
        self.controller.messages_changed.connect(self._messages_changed)
        self.controller.stream_changed.connect(self._stream_changed)
        self.controller.state_changed.connect(self._state_changed)
        self.controller.cache_changed.connect(self._cache_changed)
        self.controller.turn_finished.connect(self._turn_finished)
        self.controller.save_state_changed.connect(self._save_state_changed)
        self.controller.write_failed.connect(lambda text: self.show_banner("write", "error", text))
        self.controller.import_finished.connect(self._import_finished)
        self.data_guard.lost.connect(self._data_folder_lost)
        self.engine.load_progress.connect(self._load_progress)
        self.engine.status.connect(lambda text: self.statusBar().showMessage(text, 6000))
        self.engine.model_ready.connect(self._model_ready)
        self.engine.model_failed.connect(self._model_failed)
        self.engine.cache_restored.connect(self._cache_restored)
        self.engine.server_state.connect(self._server_state)

        app = QGuiApplication.instance()
        if isinstance(app, QGuiApplication):
            app.styleHints().colorSchemeChanged.connect(self._system_scheme_changed)
        self._memory_timer = QTimer(self)
        self._memory_timer.timeout.connect(self.refresh_memory)
        self._memory_timer.timeout.connect(self.meters.refresh_server)
        self._memory_timer.start(MEMORY_REFRESH_MS)

        self.apply_theme()
        self.refresh_sidebar()
        chats = self.store.chats()
        self.select_chat(chats[0].id if chats else None)
        # What the store found on opening goes in banners, not the status bar, where "Starting the
        # engine…" is shown at the same time.
        if self.store.salvaged:
            self.show_banner("salvaged", "warning", self.store.salvaged)
        if self.store.lost_writes:
            self.show_banner("lost-writes", "warning", self.store.lost_writes)
        if self.store.recovered:
            self.show_banner("recovered", "info",
                             f"{self.store.recovered} reply was cut off when Cachet last closed; it is marked "
                             "“interrupted”." if self.store.recovered == 1 else
                             f"{self.store.recovered} replies were cut off when Cachet last closed; they are marked "
                             "“interrupted”.")
        self.composer.input.setFocus()

    # ----- banners ---------------------------------------------------------------------------------------
    def show_banner(self, key: str, kind: str, text: str) -> Banner:
        """Show `text` in the banner `key` (replacing its text if it is shown)."""
        banner = self.banners.get(key)
        if banner is not None:
            try:
                banner.set_text(kind, text)
                return banner
            except RuntimeError:  # dismissed: its C++ object is gone
                pass
        banner = Banner(kind, text)
        banner.destroyed.connect(lambda _=None, k=key: self.banners.pop(k, None))
        self.banners[key] = banner
        self.banner_area.addWidget(banner)
        return banner

    def hide_banner(self, key: str) -> None:
        banner = self.banners.pop(key, None)
        if banner is not None:
            banner.hide()
            banner.deleteLater()

    def banner_text(self, key: str) -> str | None:
        banner = self.banners.get(key)
        return banner.label.text() if banner is not None else None

    def _data_folder_lost(self, text: str) -> None:
        fresh = self.banners.get("data-folder") is None
        banner = self.show_banner("data-folder", "error", text)
        if fresh and self.data_guard.store.detached() is not None:
            banner.set_action("Save them again", self.save_data_again)
            banner.add_action("Save a copy as…", self._save_copy_dialog)

    def save_data_again(self) -> bool:
        """Re-create the data folder and write every chat into it (DataFolderGuard.save_again); the banner
        says how it went. True when the chats are on disk again."""
        try:
            sentence = self.data_guard.save_again()
        except StoreError as exc:
            self.show_banner("data-folder", "error", f"{self.data_guard.problem or ''} Saving them again failed: "
                                                     f"{exc}".strip())
            return False
        self.hide_banner("data-folder")
        if self.controller.unsaved:
            self.controller.flush_unsaved()
        if self.save_settings:
            save_config(self.config)  # not written while the folder was gone (see apply_config)
        self.show_banner("data-folder-saved", "info", sentence)
        self.refresh_sidebar()
        return True

    def _save_copy_dialog(self) -> bool:
        path, _ = QFileDialog.getSaveFileName(self, "Save a copy of every chat", str(Path.home() / "chats.sqlite3"),
                                              "Chat database (*.sqlite3)")
        if not path:
            return False
        try:
            sentence = self.data_guard.save_copy(Path(path))
        except StoreError as exc:
            QMessageBox.warning(self, "The copy was not saved", str(exc))
            return False
        self.show_banner("data-folder-saved", "info", sentence)
        return True

    def _save_state_changed(self) -> None:
        problem = self.controller.save_problem
        if problem:
            self.show_banner("unsaved", "error", problem)
        else:
            if "unsaved" in self.banners:
                self.statusBar().showMessage("Everything is saved again.", 6000)
            self.hide_banner("unsaved")

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        self._action(file_menu, "New chat", "Ctrl+N", self.new_chat)
        self._action(file_menu, "Import chat (JSON)…", None, self._import_dialog)
        self._action(file_menu, "Export chat as Markdown…", None, lambda: self._export_dialog(self.current_chat, "md"))
        self._action(file_menu, "Export chat as JSON…", None, lambda: self._export_dialog(self.current_chat, "json"))
        file_menu.addSeparator()
        self._action(file_menu, "Browse models on this computer…", None, self.browse_models)
        self._action(file_menu, "Settings…", "Ctrl+,", self.open_settings)
        file_menu.addSeparator()
        self._action(file_menu, "Quit", QKeySequence.StandardKey.Quit, self.close)
        chat_menu = bar.addMenu("&Chat")
        self._action(chat_menu, "Search chats", "Ctrl+F", self.focus_search)
        self._action(chat_menu, "Stop the reply", "Esc", self._escape)
        self._action(chat_menu, "Regenerate the last reply", "Ctrl+R", self.regenerate)
        self._action(chat_menu, "Rename chat", "F2", self._rename_current)
        self._action(chat_menu, "Chat settings", "Ctrl+Shift+,", self.toggle_chat_settings)
        view_menu = bar.addMenu("&View")
        group = QActionGroup(self)
        self.theme_actions: dict[str, QAction] = {}
        for key, label in (("system", "Follow the system theme"), ("light", "Light"), ("dark", "Dark")):
            act = QAction(label, self, checkable=True)
            act.setChecked(self.config.theme == key)
            act.triggered.connect(lambda _=False, k=key: self.set_theme(k))
            group.addAction(act)
            view_menu.addAction(act)
            self.theme_actions[key] = act

    def _action(self, menu: object, text: str, shortcut: str | QKeySequence.StandardKey | None,
                slot: object) -> QAction:
        act = QAction(text, self)
        if shortcut is not None:
            act.setShortcut(QKeySequence(shortcut))
        act.triggered.connect(slot)  # type: ignore[arg-type]
        menu.addAction(act)  # type: ignore[attr-defined]
        self.addAction(act)
        return act

    # ----- engine lifecycle -----------------------------------------------------------------------
    def start_engine(self) -> None:
        """Start the worker and load the model (call after the window is shown)."""
        self.meters.loading("Starting the engine…")
        if self.consent_at_start:
            self._consent_at_start()
        self.engine.set_budgets(budgets(self.config))
        self.engine.start()
        if self.config.serve:
            self.engine.set_server(self.config.serve_port)
        self._update_chat_chrome()

    def _start_model_hint(self) -> None:
        """The first-run hint's scan of the disk, once the first model load has ended (loaded or not): started
        beside the load, it competed with it for the CPU and disturbed the precision probe's timings (a probe
        taken then was found unsteady and measured again at the next start)."""
        if self.hint_scanner is None and self._wants_model_hint():
            from app.model_picker import ModelScanner

            self.hint_scanner = ModelScanner(self)
            self.hint_scanner.finished.connect(self._hint_scanned)
            self.hint_scanner.start(self.config.model_folders, with_fits=False)

    def _consent_at_start(self) -> None:
        """Ask about converting the configured GGUF before the first load; cancelled, nothing is loaded and
        the window says why (the settings keep the model, and the next start asks again)."""
        from app.__main__ import default_loader

        consented = self.consent_to_conversion(self.config)
        if consented is None:
            name = Path(self.config.model.strip()).name

            what = self._consent_cancelled

            def cancelled(progress: Any = None) -> Any:
                raise ModelLoadError(f"{name} was not opened: {what} was cancelled. Open it again to convert "
                                     "it, or choose another model.")

            self.engine.loader = cancelled
        elif consented != self.config:
            self.config = self.controller.config = consented
            if self.save_settings:
                save_config(consented)
            self.engine.loader = default_loader(consented)

    def consent_to_conversion(self, config: AppConfig) -> AppConfig | None:
        """`config` with the user's answer remembered when its model is a large GGUF without a converted copy
        (app/conversion_consent.py); `config` itself when there is nothing to ask; None when cancelled (the
        question, or the check before it)."""
        from app import conversion_consent

        try:
            question = conversion_consent.find_question(self, config)  # in a thread: hashing may take seconds
        except conversion_consent.CheckCancelled:
            self._consent_cancelled = "checking whether it was converted before"
            return None
        if question is None:
            return config
        answer = conversion_consent.ask(self, question)
        if answer is None:
            self._consent_cancelled = "converting it"
            return None
        return config.with_changes(gguf_conversion={**config.gguf_conversion, config.model.strip(): answer})

    def shutdown(self) -> None:
        """Stop every reply, join the worker, and store what was streaming."""
        self._memory_timer.stop()
        self.engine.shutdown()
        # The worker's last answers (the stopped replies) are queued for this thread: deliver them.
        QCoreApplication.sendPostedEvents(self.engine, 0)
        self.controller.settle_streaming()

    def closeEvent(self, event: QCloseEvent) -> None:
        # First, while the worker still runs: saved again now, the snapshots written at shutdown go there too.
        if self.data_guard.check() is not None and self.data_guard.store.detached() is not None \
                and not self._quit_with_lost_folder():
            event.ignore()
            return
        if self.controller.unsaved and not self.controller.flush_unsaved() and not self._quit_unsaved():
            event.ignore()
            return
        self.hide()  # gone at once, even while the worker finishes a step of loading or saves caches
        QCoreApplication.processEvents()
        self.shutdown()
        if self.controller.unsaved:
            self.controller.flush_unsaved()  # the replies settled on shutdown
        with suppress(StoreError):  # a full disk: deleted chats stay hidden and are purged at a later quit
            self.store.purge_deleted()
        super().closeEvent(event)

    def _quit_with_lost_folder(self) -> bool:
        """The data folder was deleted while the app ran and its chats were not saved again: ask before they
        are lost with the process. True to quit (saved again, copied, or the user's choice to lose them)."""
        while True:
            box = QMessageBox(QMessageBox.Icon.Warning, "The chats are not on disk",
                              f"{self.data_guard.problem}\n\nSave them again before quitting?", parent=self)
            again = box.addButton(f"Save them again in {self.data_guard.folder}",
                                  QMessageBox.ButtonRole.AcceptRole)
            copy = box.addButton("Save a copy as…", QMessageBox.ButtonRole.ActionRole)
            box.addButton("Quit without saving", QMessageBox.ButtonRole.DestructiveRole)
            box.addButton(QMessageBox.StandardButton.Cancel)
            box.setDefaultButton(again)
            box.exec()
            clicked = box.clickedButton()
            if clicked is again:
                if self.save_data_again():
                    return True
            elif clicked is copy:
                if self._save_copy_dialog():
                    return True
            else:
                return box.buttonRole(clicked) == QMessageBox.ButtonRole.DestructiveRole
            # the save failed or the file dialog was cancelled: the banner says why; ask again

    def _quit_unsaved(self) -> bool:
        """Changes are still unsaved (disk full) when the user quits: True to quit anyway."""
        box = QMessageBox(QMessageBox.Icon.Warning, "Changes are not saved yet",
                          f"{self.controller.save_problem}\n\nFree some space and try again, or quit and lose "
                          "the changes made since the disk filled up.", parent=self)
        retry = box.addButton("Try again", QMessageBox.ButtonRole.AcceptRole)
        box.addButton("Quit without saving", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        clicked = box.clickedButton()
        if clicked is retry:
            return self.controller.flush_unsaved() or self._quit_unsaved()
        return box.buttonRole(clicked) == QMessageBox.ButtonRole.DestructiveRole

    def _load_progress(self, text: str) -> None:
        self.meters.loading(text)
        self._update_chat_chrome()

    def _model_ready(self, model: ModelInfo) -> None:
        self.meters.ready(model)
        self._start_model_hint()
        if self.current_chat is not None:
            self._restore_notices(self.current_chat)  # the context length is known now
        self.settings_panel.set_model(model)
        self._show_current_settings()
        self.refresh_memory()
        self._update_chat_chrome()
        self.refresh_sidebar()
        if self.current_chat is not None:
            self._messages_changed(self.current_chat)
            self.controller.open_chat(self.current_chat)

    def _cache_restored(self, event: CacheRestored) -> None:
        if event.chat_id == self.current_chat and event.worth_telling:
            text = describe_restore(event)
            self.statusBar().showMessage(text[0].upper() + text[1:] + ".", 8000)

    def _server_state(self, state: ServerState) -> None:
        self.meters.set_server(state)
        if state.error and self.config.serve:
            self.statusBar().showMessage(f"The server for other apps did not start: {state.error}", 10000)

    def _model_failed(self, message: str) -> None:
        self.meters.failed(message)
        self._update_chat_chrome()
        self._start_model_hint()
        QMessageBox.warning(self, "The model could not be loaded",
                            f"{message}\n\nChoose another model in Settings (Ctrl+,).")

    # ----- chats --------------------------------------------------------------------------------------
    def new_chat(self) -> int | None:
        chat_id = self.controller.new_chat()
        if chat_id is None:
            return None
        self.sidebar.search.clear()
        self.select_chat(chat_id)
        self.composer.input.setFocus()
        return chat_id

    def select_chat(self, chat_id: int | None) -> None:
        if chat_id == self.current_chat and chat_id is not None:
            return
        self.current_chat = chat_id
        self.sidebar.select(chat_id)
        self.chat_view.set_messages([])
        self.chat_view.set_notices([])
        if chat_id is not None and not self.controller.runtime(chat_id).busy:
            self.controller.reload(chat_id)  # opening a chat reads it from the database
        self.meters.turn(self.controller.last_stats(chat_id) if chat_id is not None else None)
        if chat_id is not None:
            self._restore_notices(chat_id)
            self._messages_changed(chat_id, scroll_to_end=True)
            self._state_changed(chat_id)
            self.controller.open_chat(chat_id)  # its cache comes back while the user reads
        self._update_chat_chrome()
        self._show_current_settings()

    def _restore_notices(self, chat_id: int) -> None:
        """A chat reopened after a restart says again when it is near the context limit."""
        rt = self.controller.runtime(chat_id)
        if not rt.notices and not rt.busy:
            near = self.controller.near_context_notice(chat_id, self.controller.last_stats(chat_id))
            if near is not None:
                rt.notices = [near]
                self.chat_view.set_notices(list(rt.notices))

    def _turn_finished(self, chat_id: int) -> None:
        if chat_id == self.current_chat:  # the meters show the chat on screen, not one in the background
            self.meters.turn(self.controller.last_stats(chat_id))

    def delete_chat(self, chat_id: int) -> None:
        title = self.store.chat(chat_id).title
        entries = [e.chat_id for e in self.sidebar.entries()]
        self.controller.delete(chat_id)
        if chat_id == self.current_chat:
            rest = [c for c in entries if c != chat_id]
            after = entries.index(chat_id) if chat_id in entries else 0
            self.current_chat = None
            self.select_chat(rest[min(after, len(rest) - 1)] if rest else None)
        self.sidebar.show_undo(title)

    def undo_delete(self) -> None:
        chat_id = self.controller.undo_delete()
        if chat_id is not None:
            self.select_chat(chat_id)

    def _rename_current(self) -> None:
        item = self.sidebar.list.currentItem()
        if item is not None:
            self.sidebar.list.editItem(item)

    def toggle_chat_settings(self) -> None:
        self.dock.setVisible(not self.dock.isVisible())

    def focus_search(self) -> None:
        self.sidebar.search.setFocus()
        self.sidebar.search.selectAll()

    def _strategy(self, cache: CacheSpec) -> tuple[str, bool]:
        """A chat's strategy as shown ("auto: quantized" once the advisor has chosen) and whether it is lossy."""
        model = self.engine.model
        if model is not None and model.remote:
            return "server's cache", False
        if cache.strategy != AUTO or model is None:
            return cache.strategy, cache.strategy in LOSSY
        effective = cache.resolve(model.auto_cache).strategy
        return f"auto: {effective}", effective in LOSSY

    def _entry(self, chat: StoredChat) -> ChatEntry:
        rt = self.controller.runtimes.get(chat.id)
        strategy, lossy = self._strategy(chat.settings.cache)
        place = rt.cache.where if rt is not None and rt.cache is not None else "none"
        if self.engine.model is not None and self.engine.model.remote:
            place = "server"
        busy = rt.state if rt is not None and rt.busy else ""
        return ChatEntry(chat.id, chat.title, chat.updated_at, place, strategy, lossy, busy)

    def refresh_sidebar(self) -> None:
        """Read the list of chats again (chats added, deleted, imported; a search)."""
        self.sidebar.set_entries([self._entry(chat) for chat in self.store.chats(self.sidebar.search.text())],
                                 self.current_chat)
        self._update_chat_chrome()

    def _chat_touched(self, chat_id: int) -> None:
        """One chat's title, activity or settings changed: redraw its entry only."""
        if self.sidebar.search.text().strip():
            self.refresh_sidebar()  # it may now match the search, or no longer
            return
        try:
            chat = self.store.chat(chat_id)
        except KeyError:
            return
        self.sidebar.update_entry(self._entry(chat))
        if chat_id == self.current_chat:
            self._update_chat_chrome()

    # ----- turns ----------------------------------------------------------------------------------------
    def _send_from_composer(self, text: str) -> None:
        if self.current_chat is None:
            self.new_chat()
        if self.current_chat is None:
            return  # no chat could be created (the banner says why); the text stays in the input
        if self.controller.send(self.current_chat, text):
            self.composer.clear()
            self.chat_view.following = True

    def send(self, text: str) -> None:
        """Type `text` into the input and send it (what pressing Enter does)."""
        self.composer.input.setPlainText(text)
        self.composer.input.submitted.emit()

    def stop(self) -> None:
        if self.current_chat is not None:
            self.controller.stop(self.current_chat)

    def _escape(self) -> None:
        focus = QApplication.focusWidget()
        for w in self.chat_view.message_widgets:
            if w.editor is not None and w.editor is focus:
                w.cancel_edit()
                return
        self.stop()

    def regenerate(self) -> None:
        if self.current_chat is not None:
            self.controller.regenerate(self.current_chat)
            self.chat_view.following = True

    def _edit_submitted(self, position: int, text: str) -> None:
        if self.current_chat is not None:
            self.controller.edit(self.current_chat, position, text)
            self.chat_view.following = True

    def _notice_action(self, key: str) -> None:
        if self.current_chat is not None:
            self.controller.act(self.current_chat, key)

    # ----- keeping the view in step -----------------------------------------------------------------
    def _pending_text(self, state: str) -> str:
        if self.engine.load_error:
            return "No model is loaded."
        if not self.engine.ready:
            return "Waiting for the model to load… (your message is queued)"
        if state == "queued":
            return "Queued: another chat's reply is being written…"
        return "Reading the conversation…"

    def _views(self, chat_id: int) -> list[MessageView]:
        rt = self.controller.runtime(chat_id)
        busy = rt.state in ("queued", "generating")
        pending = self._pending_text(rt.state) if busy and rt.reply_id is None else None
        return message_views(self.controller.messages(chat_id), rt.text if rt.reply_id else None, rt.reply_id,
                             pending, rt.busy)

    def _messages_changed(self, chat_id: int, scroll_to_end: bool = False) -> None:
        if chat_id != self.current_chat:
            return
        self.chat_view.set_messages(self._views(chat_id), scroll_to_end=scroll_to_end)
        self._update_chat_chrome()

    def _stream_changed(self, chat_id: int) -> None:
        rt = self.controller.runtimes.get(chat_id)
        if chat_id != self.current_chat or rt is None or rt.reply_id is None:
            return
        self.chat_view.update_streaming(MessageView(
            key=f"m{rt.reply_id}", position=self.chat_view.message_widgets[-1].view.position
            if self.chat_view.message_widgets else 0, role="assistant", text=rt.text, status="streaming"))

    def _redraw_entry(self, chat_id: int) -> None:
        """A chat's live state (busy, where its cache is) changed: redraw its entry from memory."""
        rt = self.controller.runtimes.get(chat_id)
        entry = next((e for e in self.sidebar.entries() if e.chat_id == chat_id), None)
        if rt is not None and entry is not None:
            self.sidebar.update_entry(replace(entry, cache_place=rt.cache.where if rt.cache is not None else "none",
                                              busy=rt.state if rt.busy else ""))

    def _state_changed(self, chat_id: int) -> None:
        self._redraw_entry(chat_id)
        if chat_id != self.current_chat:
            return
        rt = self.controller.runtime(chat_id)
        self.chat_view.set_notices(list(rt.notices))
        self._messages_changed(chat_id)  # busy or not: the placeholder, Edit and Regenerate
        self._show_current_settings()

    def _cache_changed(self, chat_id: int) -> None:
        self._redraw_entry(chat_id)
        if chat_id == self.current_chat:
            self._show_current_settings()

    def _update_chat_chrome(self) -> None:
        chat_id = self.current_chat
        rt = self.controller.runtimes.get(chat_id) if chat_id is not None else None
        self.composer.set_generating(rt is not None and rt.state in ("queued", "generating"))
        if chat_id is None:
            self.title_label.setText("Cachet")
            self.lossy_badge.hide()
            self.context_label.setText("")
            hint = "Type a message below to start a chat." if self.engine.ready or not self.engine.loading else \
                "Loading the model… You can type your first message already."
            self.chat_view.set_empty_hint(hint)
            return
        chat = self.store.chat(chat_id)
        self.title_label.setText(chat.title or "New chat")
        self.lossy_badge.setVisible(self._strategy(chat.settings.cache)[1])
        model = self.engine.model
        stats = self.controller.last_stats(chat_id)  # this run's last reply, or the stored one after a restart
        if stats and model is not None:
            used = int(str(stats.get("prompt_tokens", 0))) + int(str(stats.get("generated_tokens", 0)))
            self.context_label.setText(f"{used:,} / {model.context_length:,} tokens" if model.context_length
                                       else f"{used:,} tokens")
        else:
            self.context_label.setText("")
        hint = "Ask anything. Enter sends, Shift+Enter adds a line." if self.engine.ready or not self.engine.loading \
            else "Loading the model… You can type your first message already."
        self.chat_view.set_empty_hint(hint)

    def _show_current_settings(self) -> None:
        chat_id = self.current_chat
        if chat_id is None:
            self.settings_panel.show_chat(None, None)
            return
        rt = self.controller.runtimes.get(chat_id)
        self.settings_panel.show_chat(chat_id, self.store.chat(chat_id).settings, rt.state if rt and rt.busy else "",
                                      rt.cache if rt else None)

    def _apply_chat_settings(self, chat_id: int, settings: ChatSettings) -> None:
        self.controller.set_settings(chat_id, settings)
        self._update_chat_chrome()

    def refresh_memory(self) -> None:
        model = self.engine.model
        here = "gpu" if model is not None and model.on_gpu else "ram"
        held = [rt.cache for rt in self.controller.runtimes.values() if rt.cache is not None and rt.cache.bytes]
        if model is not None and model.gpu_layers is not None and model.gpu_device:  # split: KV on GPU and in RAM
            ready = [c for c in held if c.where == "gpu"]
            moved = [c for c in held if c.where == "ram"]
            free = self.meters.refresh_split_memory(
                sum(c.gpu_bytes for c in ready), len(ready),
                sum(c.bytes - c.gpu_bytes for c in ready) + sum(c.bytes for c in moved), len(moved))
            if free:
                self.settings_panel.set_free_memory(free)
            return
        warm = [c for c in held if c.where == here]
        idle = [c for c in held if c.where == "ram" and here != "ram"]  # with a GPU: moved to RAM
        free = self.meters.refresh_memory(sum(c.bytes for c in warm), len(warm), sum(c.bytes for c in idle), len(idle))
        if free:
            self.settings_panel.set_free_memory(free)

    # ----- theme ----------------------------------------------------------------------------------------
    def set_theme(self, choice: str) -> None:
        self.apply_config(self.config.with_changes(theme=choice))

    def apply_theme(self) -> None:
        self.theme = themes.resolve(self.config.theme)
        app = QGuiApplication.instance()
        if isinstance(app, QGuiApplication):
            themes.apply(app, self.theme)
        self.renderer = MarkdownRenderer(self.theme)
        self.chat_view.set_renderer(self.renderer)
        if self.config.theme in self.theme_actions:
            self.theme_actions[self.config.theme].setChecked(True)

    def _system_scheme_changed(self) -> None:
        if self.config.theme == "system":
            self.apply_theme()

    # ----- global settings ------------------------------------------------------------------------------
    def open_settings(self) -> None:
        from app.settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.config, self, model=self.meters.model)
        if dialog.exec():
            self.apply_config(dialog.result_config(), reconnect=dialog.key_changed)
            if dialog.chosen_data_dir is not None:
                self.statusBar().showMessage(f"From the next start, chats are kept in {dialog.chosen_data_dir}.", 10000)

    # ----- models on this computer --------------------------------------------------------------------
    def browse_models(self) -> ModelPicker:
        """Open the model picker (without blocking); the chosen model is opened as if chosen in Settings."""
        from app.model_picker import ModelPicker

        if self.picker is not None:
            self.picker.raise_()
            return self.picker
        picker = ModelPicker(self.config, self)
        picker.finished.connect(lambda _code: self._picker_closed(picker))
        self.picker = picker
        picker.open()
        return picker

    def _picker_closed(self, picker: ModelPicker) -> None:
        self.picker = None
        picker.deleteLater()
        if picker.folders != self.config.model_folders:
            self.apply_config(self.config.with_changes(model_folders=list(picker.folders)))
        if picker.chosen_path:
            self.open_model(Path(picker.chosen_path))

    def open_model(self, path: Path) -> bool:
        """Switch to the model at `path` (a .gguf file or a model folder) as choosing it in Settings does;
        what cannot be opened is refused with the reason in a banner, and nothing changes."""
        from app.model_picker import check_model_path

        try:
            model = check_model_path(path)
            new = self.config.with_changes(model=str(path), engine_source="local")
        except ConfigError as exc:
            self.show_banner("model-refused", "warning", f"Not opened: {exc}")
            return False
        self.hide_banner("model-refused")
        self.hide_banner("models-found")
        if new.diff(self.config) & MODEL_SETTINGS:
            self.apply_config(new)
            if self.config.model == new.model:  # (not when converting it was cancelled)
                self.statusBar().showMessage(f"Opening {model.name} ({path})…", 10000)
        else:
            self.statusBar().showMessage(f"{model.name} is already the model in use.", 6000)
        return True

    def _wants_model_hint(self) -> bool:
        c = self.config
        return c.engine_source == "local" and c.model.strip() in ("", "default") and not c.model_hint_dismissed

    def _hint_scanned(self, result: ScanResult) -> None:
        from app.model_picker import source_names

        usable = result.usable
        if not usable or not self._wants_model_hint():
            return
        n = len(usable)
        fresh = "models-found" not in self.banners
        banner = self.show_banner("models-found", "info",
                                  f"{n} model{'s' if n != 1 else ''} found on this computer ({source_names(usable)})"
                                  " that Cachet can open where they are.")
        if fresh:
            banner.set_action("Browse", self.browse_models)
            banner.close_button.clicked.connect(self._dismiss_model_hint)

    def _dismiss_model_hint(self) -> None:
        self.apply_config(self.config.with_changes(model_hint_dismissed=True))

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls() and any(url.isLocalFile() for url in event.mimeData().urls()):
            event.acceptProposedAction()
        else:
            super().dragEnterEvent(event)

    def dragMoveEvent(self, event: QDragMoveEvent) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()
        else:
            super().dragMoveEvent(event)

    def dropEvent(self, event: QDropEvent) -> None:
        paths = [Path(url.toLocalFile()) for url in event.mimeData().urls() if url.isLocalFile()]
        if not paths:
            super().dropEvent(event)
            return
        event.acceptProposedAction()
        if len(paths) > 1:
            self.show_banner("model-refused", "warning",
                             f"Not opened: {len(paths)} files were dropped; drop one model (a .gguf file or a model "
                             "folder) at a time.")
            return
        self.open_model(paths[0])

    def apply_config(self, new: AppConfig, reconnect: bool = False) -> None:
        """Apply only what changed; a different model is loaded in the worker (`reconnect`: a remote
        server's API key changed, so its connection is made again)."""
        changed = new.diff(self.config) | ({"remote_url"} if reconnect else set())
        if changed & MODEL_SETTINGS and new.engine_source == "local":
            consented = self.consent_to_conversion(new)
            if consented is None:  # cancelled: the model in use stays, the other changes apply
                self.statusBar().showMessage(f"{Path(new.model.strip()).name} was not opened; the model in use "
                                             "stays.", 10000)
                consented = replace(new, **{k: getattr(self.config, k) for k in MODEL_SETTINGS})
            new = consented
            changed = new.diff(self.config) | ({"remote_url"} if reconnect else set())
        if not changed:
            return
        self.config = new
        self.controller.config = new
        if self.save_settings and self.data_guard.problem is None:  # saving would re-create a deleted folder
            save_config(new)
        if "theme" in changed:
            self.apply_theme()
        if changed & BUDGET_SETTINGS:
            self.engine.set_budgets(budgets(new))
        if changed & {"serve", "serve_port"} and not changed & MODEL_SETTINGS:
            self.engine.set_server(new.serve_port if new.serve else None)
        if changed & MODEL_SETTINGS:
            from app.__main__ import default_loader

            for rt in self.controller.runtimes.values():
                rt.cache = None
            if changed & {"serve", "serve_port"}:
                self.engine.set_server(new.serve_port if new.serve else None)  # started once it has loaded
            self.engine.load(default_loader(new))
            self.meters.loading("Connecting to the server…" if new.engine_source == "remote" else "Loading the model…")
            self.refresh_sidebar()

    # ----- files ---------------------------------------------------------------------------------------
    def _export_dialog(self, chat_id: int | None, kind: str) -> None:
        if chat_id is None:
            return
        title = self.store.chat(chat_id).title or "chat"
        safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in title).strip() or "chat"
        suffix, label = (".md", "Markdown (*.md)") if kind == "md" else (".json", "JSON (*.json)")
        path, _ = QFileDialog.getSaveFileName(self, "Export chat", str(Path.home() / f"{safe}{suffix}"), label)
        if not path:
            return
        try:
            if kind == "md":
                self.controller.export_markdown(chat_id, Path(path))
            else:
                self.controller.export_json(chat_id, Path(path))
        except OSError as exc:
            QMessageBox.warning(self, "Export failed", str(exc))
            return
        self.statusBar().showMessage(f"Exported to {path}", 5000)

    def _import_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import a chat", str(Path.home()), "Cachet chat (*.json)")
        if not path:
            return
        self.import_file(Path(path))

    def import_file(self, path: Path) -> None:
        """Import a chat file: read in a thread (a slow or hostile file never holds up the window), then a
        dialog names what is wrong with it, or which settings were reset; `import_done` follows."""
        self.statusBar().showMessage(f"Importing {path.name}…", 5000)
        self.controller.start_import(path)

    def _import_finished(self, outcome: ImportOutcome) -> None:
        path, imported = outcome.path, outcome.imported
        if imported is None:
            QMessageBox.warning(self, "Import failed", f"{path.name} was not imported.\n\n{outcome.error}")
        else:
            self.select_chat(imported.chat.id)
            if imported.repaired:
                QMessageBox.information(self, "Imported with default settings",
                                        f"{path.name} was imported, but some of its settings cannot work and were "
                                        "reset to their defaults:\n\n• " + "\n• ".join(imported.repaired))
        self.import_done.emit(outcome)
