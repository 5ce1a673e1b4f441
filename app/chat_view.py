"""The conversation: message bubbles (Markdown replies, plain user text), notices, and a view
that follows a streaming reply unless the user scrolled up."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QGuiApplication, QKeyEvent, QResizeEvent, QTextOption, QWheelEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.controller import Notice
from app.markdown_render import MarkdownRenderer, plain_html
from app.meters import describe_restore, stored_restore
from engine.store import StoredMessage

RENDER_EVERY_S = 0.05  # re-render a streaming reply's Markdown at most this often
STATUS_TEXT = {"stopped": "stopped", "error": "failed", "interrupted": "interrupted", "streaming": ""}


@dataclass(frozen=True)
class MessageView:
    """What a bubble shows; `key` identifies it across updates (the store id, or a placeholder)."""

    key: str
    position: int
    role: str
    text: str
    status: str  # a store status, or "pending" for the placeholder before the first token
    tooltip: str = ""
    can_edit: bool = False
    can_regenerate: bool = False


class MessageBody(QTextBrowser):
    """A message's text: rich text that wraps anywhere (long tokens included) and is as tall as
    its content, so the chat view does all the scrolling. It loads nothing: no images, no links.

    Signals: linkActivated(str) — an anchor was clicked ("copy:N" for code blocks).
    """

    linkActivated = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("messageBody")
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWordWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        self.viewport().setAutoFillBackground(False)
        self.setStyleSheet("QTextBrowser#messageBody { background: transparent; }")
        self.document().setDocumentMargin(0)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self.anchorClicked.connect(lambda url: self.linkActivated.emit(url.toString()))
        self._html = ""

    def setText(self, html: str) -> None:  # noqa: N802 - mirrors QLabel's API
        self._html = html
        self.setHtml(html)
        self._fit()

    def text(self) -> str:
        """The rich text last set (what was rendered, before Qt re-serialises it)."""
        return self._html

    def loadResource(self, kind: int, name: QUrl | str) -> Any:  # noqa: N802 - Qt override
        return None  # never fetch anything, local or remote

    def _fit(self, *_args: object) -> None:
        self.document().setTextWidth(self.viewport().width())
        height = math.ceil(self.document().size().height())
        if height != self.height():
            self.setFixedHeight(max(height, self.fontMetrics().height()))

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._fit()

    def wheelEvent(self, event: QWheelEvent) -> None:
        event.ignore()  # the chat view scrolls, not each message


class MessageWidget(QFrame):
    """One message. Signals: edit_submitted(int position, str text), regenerate_requested(),
    copied(str what)."""

    edit_submitted = Signal(int, str)
    regenerate_requested = Signal()
    copied = Signal(str)

    def __init__(self, view: MessageView, renderer: MarkdownRenderer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("message")
        self.setProperty("role", view.role)
        self.renderer = renderer
        self.view = view
        self._code: tuple[str, ...] = ()
        self._rendered_text: str | None = None
        self._last_render = 0.0

        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 8, 12, 10)
        layout.setSpacing(4)
        header = QHBoxLayout()
        header.setSpacing(6)
        self.role_label = QLabel("You" if view.role == "user" else "Assistant")
        self.role_label.setObjectName("messageRole")
        self.status_label = QLabel()
        self.status_label.setObjectName("messageStatus")
        header.addWidget(self.role_label)
        header.addWidget(self.status_label)
        header.addStretch(1)
        self.copy_button = self._action("Copy", "Copy this message as text")
        self.copy_button.clicked.connect(self._copy_message)
        self.edit_button = self._action("Edit", "Edit this message and answer it again; the cache is reused "
                                                "up to this point")
        self.edit_button.clicked.connect(self.start_edit)
        self.regen_button = self._action("Regenerate", "Replace this reply with a new one")
        self.regen_button.clicked.connect(self.regenerate_requested)
        for b in (self.copy_button, self.edit_button, self.regen_button):
            header.addWidget(b)
        layout.addLayout(header)

        self.body = MessageBody()
        self.body.linkActivated.connect(self._on_link)
        layout.addWidget(self.body)

        self.editor: QPlainTextEdit | None = None
        self.update_view(view, force=True)

    def _action(self, text: str, tip: str) -> QToolButton:
        b = QToolButton()
        b.setObjectName("messageAction")
        b.setText(text)
        b.setToolTip(tip)
        b.setAutoRaise(True)
        b.setCursor(Qt.CursorShape.PointingHandCursor)
        return b

    def update_view(self, view: MessageView, force: bool = False) -> None:
        self.view = view
        self.setToolTip(view.tooltip)
        self.body.setToolTip(view.tooltip)
        self.status_label.setText(STATUS_TEXT.get(view.status, ""))
        self.edit_button.setVisible(view.can_edit and self.editor is None)
        self.regen_button.setVisible(view.can_regenerate)
        self.copy_button.setVisible(view.status != "pending")
        streaming = view.status == "streaming"
        now = time.monotonic()
        if not force and streaming and now - self._last_render < RENDER_EVERY_S:
            return
        self.render_now()

    @property
    def behind(self) -> bool:
        """The text shown is older than the view's (a streaming reply waits for its next render)."""
        return self._rendered_text != self.view.text

    def render_now(self) -> None:
        view = self.view
        if not self.behind:
            return
        self._last_render = time.monotonic()
        self._rendered_text = view.text
        if view.status == "pending":
            self.body.setText(f'<span style="color:{self.renderer.theme.muted};">{plain_html(view.text)}</span>')
        elif view.role == "user":
            self.body.setText(plain_html(view.text))
        else:
            rendered = self.renderer.render(view.text)
            self._code = rendered.code_blocks
            self.body.setText(rendered.html)

    def set_renderer(self, renderer: MarkdownRenderer) -> None:
        self.renderer = renderer
        self._rendered_text = None
        self.render_now()

    def _on_link(self, href: str) -> None:
        if href.startswith("copy:"):
            index = int(href.split(":", 1)[1])
            if 0 <= index < len(self._code):
                QGuiApplication.clipboard().setText(self._code[index])
                self.copied.emit("code block")
        # every other link is ignored on purpose: the view opens nothing

    def _copy_message(self) -> None:
        QGuiApplication.clipboard().setText(self.view.text)
        self.copied.emit("message")

    # ----- editing a user message in place -------------------------------------------------------
    def start_edit(self) -> None:
        if self.editor is not None:
            return
        self.editor = QPlainTextEdit(self.view.text)
        self.editor.setObjectName("composerInput")
        self.editor.setMinimumHeight(70)
        self.editor.installEventFilter(self)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        cancel = QPushButton("Cancel")
        send = QPushButton("Send")
        send.setObjectName("sendButton")
        cancel.clicked.connect(self.cancel_edit)
        send.clicked.connect(self._submit_edit)
        buttons.addWidget(cancel)
        buttons.addWidget(send)
        self._edit_box = QWidget()
        box = QVBoxLayout(self._edit_box)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.editor)
        box.addLayout(buttons)
        self.body.hide()
        layout = self.layout()
        assert isinstance(layout, QVBoxLayout)
        layout.addWidget(self._edit_box)
        self.edit_button.hide()
        self.editor.setFocus()

    def cancel_edit(self) -> None:
        if self.editor is None:
            return
        self._edit_box.deleteLater()
        self.editor = None
        self.body.show()
        self.edit_button.setVisible(self.view.can_edit)

    def _submit_edit(self) -> None:
        if self.editor is None:
            return
        text = self.editor.toPlainText().strip()
        if text:
            self.cancel_edit()
            self.edit_submitted.emit(self.view.position, text)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.editor and isinstance(event, QKeyEvent) and event.type() == QEvent.Type.KeyPress:
            if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (
                    event.modifiers() & Qt.KeyboardModifier.ShiftModifier):
                self._submit_edit()
                return True
            if event.key() == Qt.Key.Key_Escape:
                self.cancel_edit()
                return True
        return super().eventFilter(watched, event)


class NoticeWidget(QFrame):
    """Signals: action(str key)."""

    action = Signal(str)

    def __init__(self, notice: Notice, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.notice = notice
        self.setObjectName("notice")
        self.setProperty("kind", notice.kind)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 6)
        label = QLabel(notice.text)
        label.setWordWrap(True)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        label.setTextFormat(Qt.TextFormat.PlainText)
        layout.addWidget(label)
        if notice.actions:
            row = QHBoxLayout()
            for act in notice.actions:
                b = QPushButton(act.label)
                b.setEnabled(act.disabled_reason is None)
                if act.disabled_reason:
                    b.setToolTip(act.disabled_reason)
                b.clicked.connect(lambda _=False, key=act.key: self.action.emit(key))
                row.addWidget(b)
            row.addStretch(1)
            layout.addLayout(row)


class ChatView(QScrollArea):
    """Shows one chat. Follows the end while content grows, unless the user scrolled up.

    Signals: edit_submitted(int, str), regenerate_requested(), notice_action(str), copied(str).
    """

    edit_submitted = Signal(int, str)
    regenerate_requested = Signal()
    notice_action = Signal(str)
    copied = Signal(str)

    def __init__(self, renderer: MarkdownRenderer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("chatArea")
        self.renderer = renderer
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QFrame.Shape.NoFrame)
        content = QWidget()
        content.setObjectName("chatContent")
        self._layout = QVBoxLayout(content)
        self._layout.setContentsMargins(24, 16, 24, 16)
        self._layout.setSpacing(10)
        self.empty_hint = QLabel()
        self.empty_hint.setObjectName("emptyHint")
        self.empty_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_hint.setWordWrap(True)
        self._layout.addWidget(self.empty_hint)
        self._layout.addStretch(1)
        self.setWidget(content)
        self.message_widgets: list[MessageWidget] = []
        self.notice_widgets: list[NoticeWidget] = []
        self.following = True
        bar = self.verticalScrollBar()
        bar.valueChanged.connect(self._on_scrolled)
        bar.rangeChanged.connect(self._on_range)
        self._stream_timer = QTimer(self)
        self._stream_timer.setSingleShot(True)
        self._stream_timer.timeout.connect(self._flush_stream)

    def set_empty_hint(self, text: str) -> None:
        self.empty_hint.setText(text)
        self.empty_hint.setVisible(bool(text) and not self.message_widgets)

    def set_renderer(self, renderer: MarkdownRenderer) -> None:
        self.renderer = renderer
        for w in self.message_widgets:
            w.set_renderer(renderer)

    def set_messages(self, views: list[MessageView], scroll_to_end: bool = False) -> None:
        """Show `views`, reusing the bubbles whose keys are unchanged (no flicker, scroll kept)."""
        keep = 0
        while (keep < len(views) and keep < len(self.message_widgets)
               and self.message_widgets[keep].view.key == views[keep].key):
            keep += 1
        for w in self.message_widgets[keep:]:
            self._layout.removeWidget(w)
            w.deleteLater()
        del self.message_widgets[keep:]
        for i in range(keep):
            if self.message_widgets[i].view != views[i]:
                self.message_widgets[i].update_view(views[i], force=True)
        for view in views[keep:]:
            w = MessageWidget(view, self.renderer)
            w.edit_submitted.connect(self.edit_submitted)
            w.regenerate_requested.connect(self.regenerate_requested)
            w.copied.connect(self.copied)
            self._layout.insertWidget(self._layout.count() - 1 - len(self.notice_widgets), w)
            self.message_widgets.append(w)
        self.empty_hint.setVisible(bool(self.empty_hint.text()) and not self.message_widgets)
        if scroll_to_end:
            self.following = True
            self._scroll_to_end()

    def update_streaming(self, view: MessageView) -> None:
        """The last bubble's text grew; it is re-rendered at most every RENDER_EVERY_S."""
        if not self.message_widgets or self.message_widgets[-1].view.key != view.key:
            return
        w = self.message_widgets[-1]
        w.update_view(view)
        if w.behind and not self._stream_timer.isActive():
            self._stream_timer.start(int(RENDER_EVERY_S * 1000))

    def _flush_stream(self) -> None:
        if self.message_widgets:
            self.message_widgets[-1].render_now()

    def set_notices(self, notices: list[Notice]) -> None:
        if [w.notice for w in self.notice_widgets] == notices:
            return
        for w in self.notice_widgets:
            self._layout.removeWidget(w)
            w.deleteLater()
        self.notice_widgets = []
        for n in notices:
            w = NoticeWidget(n)
            w.action.connect(self.notice_action)
            self._layout.insertWidget(self._layout.count() - 1, w)
            self.notice_widgets.append(w)

    def _on_scrolled(self, value: int) -> None:
        bar = self.verticalScrollBar()
        self.following = value >= bar.maximum() - 8

    def _on_range(self, _minimum: int, maximum: int) -> None:
        if self.following:
            self.verticalScrollBar().setValue(maximum)

    def _scroll_to_end(self) -> None:
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    def bubble_texts(self) -> list[tuple[str, str]]:
        """(role, text) of every bubble, for tests and screenshots."""
        return [(w.view.role, w.view.text) for w in self.message_widgets]

    def widget_for(self, position: int) -> MessageWidget | None:
        return next((w for w in self.message_widgets if w.view.position == position), None)


def message_views(messages: list[StoredMessage], streaming_text: str | None, reply_id: int | None, pending: str | None,
                  busy: bool) -> list[MessageView]:
    """Bubbles for a chat's stored messages plus its live state.

    Args:
        messages: the chat's StoredMessages.
        streaming_text: the reply streaming in (fresher than its stored row), for row `reply_id`.
        pending: placeholder text while waiting for the first token, or None.
        busy: a turn is queued or running (no editing or regenerating meanwhile).
    """
    views: list[MessageView] = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        text = streaming_text if (reply_id is not None and m.id == reply_id and streaming_text is not None) \
            else m.content
        views.append(MessageView(
            key=f"m{m.id}", position=m.position, role=m.role, text=text,
            status="streaming" if (busy and m.id == reply_id) else m.status,
            tooltip=_tooltip(m),
            can_edit=m.role == "user" and not busy,
            can_regenerate=m.role == "assistant" and i == last and not busy,
        ))
    if pending is not None:
        views.append(MessageView(key="pending", position=len(messages), role="assistant", text=pending,
                                 status="pending"))
    return views


def _tooltip(m: StoredMessage) -> str:
    parts = []
    if m.tokens is not None:
        parts.append(f"{m.tokens:,} tokens")
    s = m.stats
    if s:
        parts.append(f"prompt {s.get('prompt_tokens', 0):,} tokens: {s.get('reused_tokens', 0):,} reused from the "
                     f"cache, {s.get('prefilled_tokens', 0):,} prefilled")
        parts.append(f"first token after {s.get('ttft_ms', 0):,.0f} ms, {s.get('decode_tok_s', 0):.1f} tokens/s")
        if s.get("speculative") and s.get("tokens_per_step"):
            parts.append(f"speculative: {float(s['tokens_per_step']):.1f} tokens/step ({s['speculative']})")
        restore = stored_restore(s)
        if restore is not None and restore.source != "empty":
            parts.append(describe_restore(restore))
    if not m.complete:
        parts.append({"stopped": "stopped by you", "interrupted": "cut off when Cachet closed unexpectedly",
                      "error": "failed midway", "streaming": "still being written"}.get(m.status, m.status))
    return "\n".join(parts)
