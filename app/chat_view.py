"""The conversation: message bubbles (Markdown replies, plain user text), notices, and a view
that follows a streaming reply unless the user scrolled up."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import (
    QGuiApplication,
    QKeyEvent,
    QResizeEvent,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextOption,
    QWheelEvent,
)
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
from app.markdown_render import MAX_BLOCK_CHARS, MarkdownRenderer, bounded_plain_html, plain_html, too_costly
from app.meters import describe_restore, stored_restore
from engine.store import StoredMessage

PAGE = 40  # bubbles made at a time: the newest messages on opening, then one page per "Show earlier"
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

    def append_html(self, html: str) -> int:
        """Add `html` (whole blocks) after what is shown, in a block of its own; Qt lays out only the new
        blocks, where setText would parse and lay out everything again. Returns where the document now
        ends, for `truncate`."""
        cursor = QTextCursor(self.document())
        cursor.beginEditBlock()  # one layout pass for the whole insertion
        cursor.movePosition(QTextCursor.MoveOperation.End)
        if cursor.block().length() > 1:  # the last block has text: the new one must not merge into it
            cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
        cursor.insertHtml(html)
        cursor.endEditBlock()
        self._html += html
        cursor.movePosition(QTextCursor.MoveOperation.End)
        return cursor.position()

    def truncate(self, position: int, html: str) -> None:
        """Remove everything after `position` (an `append_html` result); `html` is what stays."""
        cursor = QTextCursor(self.document())
        cursor.setPosition(position)
        cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        cursor.removeSelectedText()
        self._html = html

    def text(self) -> str:
        """The rich text last set (what was rendered, before Qt re-serialises it)."""
        return self._html

    def loadResource(self, kind: int, name: QUrl | str) -> Any:  # noqa: N802 - Qt override
        return None  # never fetch anything, local or remote

    def _fit(self, *_args: object) -> None:
        width = self.viewport().width()
        if self.document().textWidth() != width:  # setting it, even unchanged, lays the whole text out again
            self.document().setTextWidth(width)
        height = math.ceil(self.document().size().height())
        if height != self.height():
            self.setFixedHeight(max(height, self.fontMetrics().height()))

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._fit()

    def wheelEvent(self, event: QWheelEvent) -> None:
        event.ignore()  # the chat view scrolls, not each message


@dataclass(frozen=True)
class _Block:
    """A top-level Markdown block of a streaming reply, as appended to its bubble."""

    source: str
    html: str
    code: tuple[str, ...]
    end: int  # where the bubble's document ends after it


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
        self._rendered: tuple[str, bool] | None = None  # (text, streaming) last rendered
        self._last_render = 0.0
        self._last_cost = 0.0

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
        # While a reply streams, its finished blocks are appended to `body` once and only its last block,
        # the one still growing, is re-rendered, into `tail` (made on first use): a re-render costs one
        # block, not the whole reply.
        self.tail: MessageBody | None = None
        self._settled: list[_Block] = []  # the reply's blocks appended to body, while streaming
        self._growing = ""  # the streaming reply's last block, shown in `tail`

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
        if not force and streaming and self.next_render_in() > 0:
            return
        self.render_now()

    def next_render_in(self) -> float:
        """Seconds until a streaming reply may render again: RENDER_EVERY_S, or three times what the last
        render took if that is longer, so the window spends at least three quarters of its time answering."""
        return self._last_render + max(RENDER_EVERY_S, 3 * self._last_cost) - time.monotonic()

    @property
    def behind(self) -> bool:
        """What is shown is older than the view (a streaming reply waits for its next render, or has just
        finished and its last block is still shown as it was while streaming)."""
        return self._rendered != (self.view.text, self.view.status == "streaming")

    def render_now(self) -> None:
        view = self.view
        if not self.behind:
            return
        start = time.monotonic()
        self._render(view)
        self._last_render = time.monotonic()
        self._last_cost = self._last_render - start

    def _render(self, view: MessageView) -> None:
        self._rendered = (view.text, view.status == "streaming")
        if view.status == "pending":
            self._show_whole(f'<span style="color:{self.renderer.theme.muted};">{plain_html(view.text)}</span>')
        elif view.role == "user":
            self._show_whole(bounded_plain_html(view.text))
        else:
            reason = too_costly(view.text)
            if reason:
                rendered = self.renderer.plain(view.text, reason)
                self._show_whole(rendered.html)
            elif view.status == "streaming" or self._settled:
                self._render_blocks(view.text, streaming=view.status == "streaming")
            else:
                rendered = self.renderer.render(view.text)
                self._show_whole(rendered.html, rendered.code_blocks)

    def _show_whole(self, html: str, code: tuple[str, ...] = ()) -> None:
        self._settled = []
        self._growing = ""
        self._drop_tail()
        self._code = code
        self.body.setText(html)

    def _drop_tail(self) -> None:
        if self.tail is not None:
            self.tail.hide()
            self.tail.setText("")

    def _render_blocks(self, text: str, streaming: bool) -> None:
        """Show a reply block by block: the blocks already in `body` stay, new finished blocks are appended,
        and the last block goes to `tail` while it may still grow (into `body` once the reply is done).
        A block that changed after it was appended (a numbered list went on) is removed with the ones
        after it and appended again."""
        blocks = self._blocks(text, streaming)
        settled, growing = (blocks[:-1], blocks[-1:]) if streaming else (blocks, [])
        self._growing = growing[0] if growing else ""
        same = 0
        while same < min(len(settled), len(self._settled)) and settled[same] == self._settled[same].source:
            same += 1
        if same < len(self._settled):
            del self._settled[same:]
            if self._settled:
                self.body.truncate(self._settled[-1].end, "".join(b.html for b in self._settled))
            else:
                self.body.setText("")
        for source in settled[same:]:
            rendered = self.renderer.render_blocks([source], sum(len(b.code) for b in self._settled))
            end = self.body.append_html(rendered.html)
            self._settled.append(_Block(source, rendered.html, rendered.code_blocks, end))
        code = [c for b in self._settled for c in b.code]
        if growing:
            rendered = self.renderer.render_blocks(growing, len(code), highlight_code=False)
            if self.tail is None:
                self.tail = MessageBody()
                self.tail.linkActivated.connect(self._on_link)
                layout = self.layout()
                assert isinstance(layout, QVBoxLayout)
                layout.insertWidget(layout.indexOf(self.body) + 1, self.tail)
            self.tail.setText(rendered.html)
            self.tail.show()
            code += rendered.code_blocks
        else:
            self._drop_tail()
            self._settled = []  # done: the next change (a regenerate) renders the reply whole
        self._code = tuple(code)

    def _blocks(self, text: str, streaming: bool) -> list[str]:
        """`renderer.blocks(text)`, parsing only from the last appended block on (the ones before it are
        finished); while streaming, not at all when a long last block just grew by lines without a blank
        one (a big table or code block coming in row by row: parsing it is what would cost)."""
        settled = [b.source for b in self._settled]
        known = "".join(settled)
        growing = self._growing
        if streaming and len(growing) > MAX_BLOCK_CHARS and text.startswith(known + growing) \
                and "\n\n" not in text[len(known) + len(growing) - 1:]:
            return [*settled, text[len(known):]]
        done = settled[:-1]
        head = "".join(done)
        if not text.startswith(head):
            done, head = [], ""
        return done + self.renderer.blocks(text[len(head):])

    def set_renderer(self, renderer: MarkdownRenderer) -> None:
        self.renderer = renderer
        self._rendered = None
        self._show_whole("")  # blocks appended in the old theme's colours go too
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
        self.earlier_button = QPushButton()
        self.earlier_button.setObjectName("earlierButton")
        self.earlier_button.setToolTip("Older messages are shown on demand, so a long chat opens at once")
        self.earlier_button.clicked.connect(self.show_earlier)
        self.earlier_button.hide()
        self._layout.insertWidget(0, self.earlier_button, 0, Qt.AlignmentFlag.AlignHCenter)
        self.setWidget(content)
        self.views: list[MessageView] = []  # every message of the chat; widgets exist for the last few only
        self.message_widgets: list[MessageWidget] = []  # the bubbles of views[-len(message_widgets):]
        self._shown = PAGE  # how many of the last views get a bubble
        self._anchor_bottom: int | None = None  # keep this distance to the end while earlier bubbles lay out
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
        """Show `views`: a bubble for each of the last `PAGE` (more once the user asked for earlier ones),
        reusing the bubbles whose keys are unchanged (no flicker, scroll kept). A chat of any length opens
        at the cost of one page; the older messages wait behind "Show earlier messages".

        Args:
            views: every message of the chat, oldest first.
            scroll_to_end: follow the end again (opening a chat, sending): back to one page of bubbles.
        """
        if scroll_to_end or not views or not self.views or views[0].key != self.views[0].key:
            self._shown = PAGE  # another chat, or back to the end: one page again
        self.views = list(views)
        self._sync_widgets()
        if scroll_to_end:
            self.following = True
            self._anchor_bottom = None
            self._scroll_to_end()

    def show_earlier(self) -> None:
        """Give bubbles to one more page of older messages, keeping what is on screen where it is."""
        if len(self.message_widgets) >= len(self.views):
            return
        bar = self.verticalScrollBar()
        self._anchor_bottom = bar.maximum() - bar.value()
        self.following = False
        self._shown = len(self.message_widgets) + PAGE
        self._sync_widgets()

    @property
    def hidden_count(self) -> int:
        """How many older messages have no bubble (yet)."""
        return len(self.views) - len(self.message_widgets)

    def _sync_widgets(self) -> None:
        """Make `message_widgets` the bubbles of the last `_shown` views, reusing bubbles by key."""
        window = self.views[max(0, len(self.views) - self._shown):]
        widgets = self.message_widgets
        keys = [w.view.key for w in widgets]
        # Drop bubbles above the window (the window moved down), then add the ones it gained on top.
        top = next((i for i, k in enumerate(keys) if window and k == window[0].key), None)
        if top is None and widgets and window:
            above = next((j for j, v in enumerate(window) if v.key == keys[0]), None)
            if above is None:
                self._remove(0)
            else:
                for j, view in enumerate(window[:above]):
                    self._insert(j, view)
        elif top:
            self._remove(0, top)
        keep = 0
        while keep < len(window) and keep < len(self.message_widgets) \
                and self.message_widgets[keep].view.key == window[keep].key:
            keep += 1
        self._remove(keep)
        for i in range(keep):
            if self.message_widgets[i].view != window[i]:
                self.message_widgets[i].update_view(window[i], force=True)
        for view in window[keep:]:
            self._insert(len(self.message_widgets), view)
        hidden = self.hidden_count
        self.earlier_button.setText(f"Show earlier messages ({hidden:,} more)")
        self.earlier_button.setVisible(hidden > 0)
        self.empty_hint.setVisible(bool(self.empty_hint.text()) and not self.message_widgets)

    def _insert(self, index: int, view: MessageView) -> None:
        w = MessageWidget(view, self.renderer)
        w.edit_submitted.connect(self.edit_submitted)
        w.regenerate_requested.connect(self.regenerate_requested)
        w.copied.connect(self.copied)
        # layout: earlier button, empty hint, bubbles, notices, stretch
        self._layout.insertWidget(2 + index, w)
        self.message_widgets.insert(index, w)

    def _remove(self, start: int, stop: int | None = None) -> None:
        doomed = self.message_widgets[start:stop]
        del self.message_widgets[start:stop]
        for w in doomed:
            self._layout.removeWidget(w)
            w.deleteLater()

    def update_streaming(self, view: MessageView) -> None:
        """The last bubble's text grew; it is re-rendered at most every RENDER_EVERY_S (less often when
        rendering it is slow, see MessageWidget.next_render_in), the text in between shown on the next one."""
        if not self.message_widgets or self.message_widgets[-1].view.key != view.key:
            return
        w = self.message_widgets[-1]
        w.update_view(view)
        if w.behind and not self._stream_timer.isActive():
            self._stream_timer.start(max(1, math.ceil(w.next_render_in() * 1000)))

    def _flush_stream(self) -> None:
        if not self.message_widgets:
            return
        w = self.message_widgets[-1]
        wait = w.next_render_in()
        if wait > 0:  # the last render was slow: give the window its time first
            self._stream_timer.start(math.ceil(wait * 1000))
        else:
            w.render_now()

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
        if self._anchor_bottom is not None and value != bar.maximum() - self._anchor_bottom:
            self._anchor_bottom = None  # the user scrolled: stop pinning
        self.following = value >= bar.maximum() - 8
        if value == bar.minimum() and bar.maximum() > 0 and self.hidden_count and self._anchor_bottom is None:
            QTimer.singleShot(0, self.show_earlier)  # reached the top: the next page comes in

    def _on_range(self, _minimum: int, maximum: int) -> None:
        if self.following:
            self.verticalScrollBar().setValue(maximum)
        elif self._anchor_bottom is not None:
            self.verticalScrollBar().setValue(max(0, maximum - self._anchor_bottom))

    def _scroll_to_end(self) -> None:
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    def bubble_texts(self) -> list[tuple[str, str]]:
        """(role, text) of every message of the chat, with a bubble or not yet, for tests and screenshots."""
        return [(v.role, v.text) for v in self.views]

    def widget_for(self, position: int) -> MessageWidget | None:
        """The bubble of the message at `position`, showing earlier pages until it has one."""
        while True:
            w = next((w for w in self.message_widgets if w.view.position == position), None)
            if w is not None or not self.hidden_count:
                return w
            self.show_earlier()


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
        if s.get("cache_fallback"):
            parts.append(f"cache: {s['cache_fallback']}")
        if s.get("speculative") and s.get("tokens_per_step"):
            parts.append(f"speculative: {float(s['tokens_per_step']):.1f} tokens/step ({s['speculative']})")
        restore = stored_restore(s)
        if restore is not None and restore.source != "empty":
            parts.append(describe_restore(restore))
    if not m.complete:
        parts.append({"stopped": "stopped by you", "interrupted": "cut off when Cachet closed unexpectedly",
                      "error": "failed midway", "streaming": "still being written"}.get(m.status, m.status))
    return "\n".join(parts)
