"""The message input: multi-line, Enter sends, Shift+Enter starts a new line; Send turns into Stop
while the chat's reply is being written."""

from __future__ import annotations

from PySide6.QtCore import QMimeData, QSize, Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QFrame, QHBoxLayout, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

MAX_LINES = 8


class MessageInput(QPlainTextEdit):
    """Signals: submitted()."""

    submitted = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("composerInput")
        self.setPlaceholderText("Message the model…  (Enter sends, Shift+Enter for a new line)")
        self.setTabChangesFocus(True)
        self.document().contentsChanged.connect(self.updateGeometry)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            if event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
                self.insertPlainText("\n")
            else:
                self.submitted.emit()
            return
        super().keyPressEvent(event)

    def canInsertFromMimeData(self, source: QMimeData) -> bool:
        # A file dropped here is left to the window, which opens a model dropped anywhere on it,
        # rather than typed into the message as its path.
        if source.hasUrls() and any(url.isLocalFile() for url in source.urls()):
            return False
        return super().canInsertFromMimeData(source)

    def sizeHint(self) -> QSize:
        lines = max(1, min(MAX_LINES, int(self.document().size().height())))
        line_height = self.fontMetrics().lineSpacing()
        margins = self.contentsMargins()
        frame = int(self.document().documentMargin() * 2) + margins.top() + margins.bottom() + 10
        return QSize(super().sizeHint().width(), lines * line_height + frame)

    def minimumSizeHint(self) -> QSize:
        return QSize(100, self.fontMetrics().lineSpacing() + 24)


class Composer(QFrame):
    """Signals: send_requested(str text), stop_requested()."""

    send_requested = Signal(str)
    stop_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("composer")
        self.input = MessageInput()
        self.button = QPushButton("Send")
        self.button.setObjectName("sendButton")
        self.button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.button.setMinimumWidth(78)
        self.generating = False
        layout = QHBoxLayout(self)
        layout.setContentsMargins(16, 10, 16, 12)
        layout.addWidget(self.input, 1)
        side = QVBoxLayout()
        side.addStretch(1)
        side.addWidget(self.button)
        layout.addLayout(side)
        self.input.submitted.connect(self._send)
        self.button.clicked.connect(self._clicked)
        self.input.textChanged.connect(self._update_button)
        self._update_button()

    def set_generating(self, generating: bool) -> None:
        """While a reply is written, the button stops it; typing the next message stays possible."""
        self.generating = generating
        self.button.setText("Stop" if generating else "Send")
        self.button.setToolTip("Stop the reply (Esc)" if generating else "Send (Enter)")
        self.button.setProperty("stop", generating)
        self.button.style().unpolish(self.button)
        self.button.style().polish(self.button)
        self._update_button()

    def _update_button(self) -> None:
        self.button.setEnabled(self.generating or bool(self.input.toPlainText().strip()))

    def _clicked(self) -> None:
        if self.generating:
            self.stop_requested.emit()
        else:
            self._send()

    def _send(self) -> None:
        text = self.input.toPlainText().strip()
        if not text or self.generating:
            return
        self.send_requested.emit(text)

    def clear(self) -> None:
        self.input.clear()
