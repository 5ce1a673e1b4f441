"""The list of chats: newest activity first, each with its title, last activity, and badges for
where its KV cache is and which strategy it uses. New, rename (F2 or double-click), delete
with undo, and search over titles and message text."""

from __future__ import annotations

import time
from dataclasses import dataclass

from PySide6.QtCore import QModelIndex, QPersistentModelIndex, QPoint, QRect, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QColor, QFont, QFontMetrics, QKeySequence, QPainter, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QVBoxLayout,
    QWidget,
)

ROLE_ENTRY = Qt.ItemDataRole.UserRole + 1
PLACE_LABEL = {"gpu": "on GPU", "ram": "in RAM", "disk": "on disk", "none": "no cache", "server": "on the server"}
PLACE_COLOUR = {"gpu": "#2e9d5b", "ram": "#2f6fde", "disk": "#8a6d3b", "none": "#8e8e93", "server": "#6b5fb5"}
UNDO_SECONDS = 10


@dataclass(frozen=True)
class ChatEntry:
    chat_id: int
    title: str
    updated_at: float
    cache_place: str  # "gpu" | "ram" | "disk" | "none" | "server" (a remote engine keeps it)
    strategy: str
    lossy: bool
    busy: str = ""  # "", "queued", "generating", "rebuilding"


def when(timestamp: float, now: float | None = None) -> str:
    """Last activity, short: a time today, a weekday this week, else the date."""
    now = time.time() if now is None else now
    t, n = time.localtime(timestamp), time.localtime(now)
    if t.tm_year == n.tm_year and t.tm_yday == n.tm_yday:
        return time.strftime("%H:%M", t)
    if now - timestamp < 6 * 86400:
        return time.strftime("%a", t)
    return time.strftime("%d %b" if t.tm_year == n.tm_year else "%d %b %Y", t)


class ChatDelegate(QStyledItemDelegate):
    HEIGHT = 52

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex | QPersistentModelIndex) -> QSize:
        return QSize(option.rect.width(), self.HEIGHT)

    def paint(self, painter: QPainter, option: QStyleOptionViewItem,
              index: QModelIndex | QPersistentModelIndex) -> None:
        entry: ChatEntry | None = index.data(ROLE_ENTRY)
        if entry is None:
            return
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        pal = option.palette  # type: ignore[attr-defined]
        rect: QRect = option.rect.adjusted(6, 2, -6, -2)  # type: ignore[attr-defined]
        state = option.state  # type: ignore[attr-defined]
        selected = bool(state & QStyle.StateFlag.State_Selected)
        if selected:
            painter.setBrush(pal.color(QPalette.ColorRole.Highlight).lighter(170)
                             if pal.color(QPalette.ColorRole.Window).lightness() > 128
                             else pal.color(QPalette.ColorRole.Highlight).darker(160))
            painter.setPen(Qt.PenStyle.NoPen)
            painter.drawRoundedRect(rect, 6, 6)
        elif state & QStyle.StateFlag.State_MouseOver:
            painter.setBrush(pal.color(QPalette.ColorRole.AlternateBase))
            painter.setPen(Qt.PenStyle.NoPen)
            painter.drawRoundedRect(rect, 6, 6)
        inner = rect.adjusted(8, 5, -8, -5)
        base_font: QFont = option.font  # type: ignore[attr-defined]
        title_font = QFont(base_font)
        title_font.setWeight(QFont.Weight.DemiBold)
        small = QFont(base_font)
        small.setPointSizeF(max(7.0, base_font.pointSizeF() * 0.85))
        text_colour = pal.color(QPalette.ColorRole.Text)
        muted = pal.color(QPalette.ColorRole.PlaceholderText)

        stamp = when(entry.updated_at)
        painter.setFont(small)
        fm_small = QFontMetrics(small)
        stamp_w = fm_small.horizontalAdvance(stamp) + 4
        top_line = QRect(inner.left(), inner.top(), inner.width(), QFontMetrics(title_font).height())
        painter.setPen(muted)
        painter.drawText(top_line, int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), stamp)
        painter.setFont(title_font)
        painter.setPen(text_colour)
        title = entry.title or "New chat"
        elided = QFontMetrics(title_font).elidedText(title, Qt.TextElideMode.ElideRight, inner.width() - stamp_w - 6)
        painter.drawText(top_line.adjusted(0, 0, -stamp_w, 0),
                         int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter), elided)

        # second line: cache badge, strategy, lossy, activity
        y = top_line.bottom() + 5
        x = inner.left()
        painter.setFont(small)
        h = fm_small.height() + 2
        x = self._badge(painter, x, y, h, PLACE_LABEL.get(entry.cache_place, entry.cache_place),
                        QColor(PLACE_COLOUR.get(entry.cache_place, "#8e8e93")), fm_small)
        painter.setPen(muted)
        label = entry.strategy or "auto"
        painter.drawText(QRect(x + 6, y, fm_small.horizontalAdvance(label) + 4, h),
                         int(Qt.AlignmentFlag.AlignVCenter), label)
        x += 10 + fm_small.horizontalAdvance(label) + 4
        if entry.lossy:
            x = self._badge(painter, x, y, h, "lossy", QColor("#c77c02"), fm_small) + 6
        if entry.busy:
            painter.setPen(QColor(pal.color(QPalette.ColorRole.Highlight)))
            painter.drawText(QRect(x, y, inner.right() - x, h),
                             int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), entry.busy + "…")
        painter.restore()

    @staticmethod
    def _badge(painter: QPainter, x: int, y: int, h: int, text: str, colour: QColor, fm: QFontMetrics) -> int:
        w = fm.horizontalAdvance(text) + 10
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(colour)
        painter.drawRoundedRect(QRect(x, y, w, h), 4, 4)
        painter.setPen(QColor("#ffffff"))
        painter.drawText(QRect(x, y, w, h), int(Qt.AlignmentFlag.AlignCenter), text)
        return x + w

    def updateEditorGeometry(self, editor: QWidget, option: QStyleOptionViewItem,
                             index: QModelIndex | QPersistentModelIndex) -> None:
        rect: QRect = option.rect  # type: ignore[attr-defined]
        editor.setGeometry(rect.adjusted(10, 4, -10, -(rect.height() // 2)))


class Sidebar(QFrame):
    """Signals: chat_selected(int), new_requested(), rename_requested(int, str), delete_requested(int),
    undo_requested(), search_changed(str), export_requested(int, str format)."""

    chat_selected = Signal(int)
    new_requested = Signal()
    rename_requested = Signal(int, str)
    delete_requested = Signal(int)
    undo_requested = Signal()
    search_changed = Signal(str)
    export_requested = Signal(int, str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("sidebar")
        self.setMinimumWidth(220)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 10, 8, 8)
        layout.setSpacing(8)
        top = QHBoxLayout()
        self.search = QLineEdit()
        self.search.setObjectName("sidebarSearch")
        self.search.setPlaceholderText("Search chats (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.new_button = QPushButton("New")
        self.new_button.setToolTip("New chat (Ctrl+N)")
        top.addWidget(self.search, 1)
        top.addWidget(self.new_button)
        layout.addLayout(top)

        self.list = QListWidget()
        self.list.setItemDelegate(ChatDelegate(self.list))
        self.list.setMouseTracking(True)
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.list.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked
                                  | QAbstractItemView.EditTrigger.EditKeyPressed)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        layout.addWidget(self.list, 1)

        self.empty_label = QLabel("No chats yet.\nPress Ctrl+N to start one.")
        self.empty_label.setObjectName("muted")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(self.empty_label)

        self.undo_bar = QFrame()
        self.undo_bar.setObjectName("notice")
        undo_layout = QHBoxLayout(self.undo_bar)
        undo_layout.setContentsMargins(8, 4, 4, 4)
        self.undo_label = QLabel()
        self.undo_label.setWordWrap(True)
        self.undo_button = QPushButton("Undo")
        undo_layout.addWidget(self.undo_label, 1)
        undo_layout.addWidget(self.undo_button)
        self.undo_bar.hide()
        layout.addWidget(self.undo_bar)
        self._undo_timer = QTimer(self)
        self._undo_timer.setSingleShot(True)
        self._undo_timer.timeout.connect(self.undo_bar.hide)

        self._filling = False
        self.search.textChanged.connect(self.search_changed)
        self.new_button.clicked.connect(self.new_requested)
        self.undo_button.clicked.connect(self._undo)
        self.list.currentItemChanged.connect(self._current_changed)
        self.list.itemChanged.connect(self._item_edited)
        self.list.customContextMenuRequested.connect(self._menu)
        delete = QAction("Delete chat", self.list)
        delete.setShortcut(QKeySequence.StandardKey.Delete)
        delete.setShortcutContext(Qt.ShortcutContext.WidgetShortcut)
        delete.triggered.connect(self._delete_current)
        self.list.addAction(delete)

    def set_entries(self, entries: list[ChatEntry], current: int | None) -> None:
        """Replace the list, keeping the scroll position and selecting `current`."""
        self._filling = True
        scroll = self.list.verticalScrollBar().value()
        self.list.clear()
        for e in entries:
            item = QListWidgetItem(e.title or "New chat")
            item.setData(ROLE_ENTRY, e)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
            item.setToolTip(_tooltip(e))
            self.list.addItem(item)
            if e.chat_id == current:
                self.list.setCurrentItem(item)
        self.list.verticalScrollBar().setValue(scroll)
        self.empty_label.setVisible(not entries)
        self.empty_label.setText("No chat matches." if self.search.text().strip() else
                                 "No chats yet.\nPress Ctrl+N to start one.")
        self._filling = False

    def update_entry(self, entry: ChatEntry) -> None:
        """Redraw one chat's entry, moved to its place by last activity (newest first)."""
        for i in range(self.list.count()):
            item = self.list.item(i)
            old = item.data(ROLE_ENTRY)
            if old is not None and old.chat_id == entry.chat_id:
                if old == entry:
                    return
                self._filling = True
                item.setText(entry.title or "New chat")
                item.setData(ROLE_ENTRY, entry)
                item.setToolTip(_tooltip(entry))
                target = next((j for j, e in enumerate(self.entries()) if e.chat_id != entry.chat_id
                               and (e.updated_at, e.chat_id) < (entry.updated_at, entry.chat_id)), self.list.count())
                target = target - 1 if target > i else target
                if target != i:
                    current = self.list.currentItem() is item
                    self.list.takeItem(i)
                    self.list.insertItem(target, item)
                    if current:
                        self.list.setCurrentItem(item)
                self._filling = False
                return

    def select(self, chat_id: int | None) -> None:
        """Show `chat_id` as the current chat without announcing it (the window chose it)."""
        self._filling = True
        for i, entry in enumerate(self.entries()):
            if entry.chat_id == chat_id and self.list.currentRow() != i:
                self.list.setCurrentRow(i)
        self._filling = False

    def entries(self) -> list[ChatEntry]:
        return [self.list.item(i).data(ROLE_ENTRY) for i in range(self.list.count())]

    def show_undo(self, title: str) -> None:
        self.undo_label.setText(f"Deleted “{title or 'New chat'}”.")
        self.undo_bar.show()
        self._undo_timer.start(UNDO_SECONDS * 1000)

    def _undo(self) -> None:
        self.undo_bar.hide()
        self.undo_requested.emit()

    def _current_changed(self, current: QListWidgetItem | None, _previous: QListWidgetItem | None) -> None:
        if self._filling or current is None:
            return
        entry = current.data(ROLE_ENTRY)
        if entry is not None:
            self.chat_selected.emit(entry.chat_id)

    def _item_edited(self, item: QListWidgetItem) -> None:
        if self._filling:
            return
        entry = item.data(ROLE_ENTRY)
        if entry is not None and item.text() != entry.title:
            self.rename_requested.emit(entry.chat_id, item.text())

    def _delete_current(self) -> None:
        item = self.list.currentItem()
        if item is not None and item.data(ROLE_ENTRY) is not None:
            self.delete_requested.emit(item.data(ROLE_ENTRY).chat_id)

    def _menu(self, pos: QPoint) -> None:
        item = self.list.itemAt(pos)
        if item is None:
            return
        entry: ChatEntry = item.data(ROLE_ENTRY)
        menu = QMenu(self)
        menu.addAction("Rename", lambda: self.list.editItem(item))
        menu.addAction("Export as Markdown…", lambda: self.export_requested.emit(entry.chat_id, "md"))
        menu.addAction("Export as JSON…", lambda: self.export_requested.emit(entry.chat_id, "json"))
        menu.addSeparator()
        menu.addAction("Delete", lambda: self.delete_requested.emit(entry.chat_id))
        menu.exec(self.list.viewport().mapToGlobal(pos))


def _tooltip(e: ChatEntry) -> str:
    return (f"{e.title or 'New chat'}\nCache: {PLACE_LABEL.get(e.cache_place, e.cache_place)}, "
            f"strategy {e.strategy or 'auto'}" + (" (lossy)" if e.lossy else ""))
