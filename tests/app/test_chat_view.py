"""The chat view with big content: a chat of any length opens with one page of bubbles and shows older
ones on demand, and a pathological reply (a huge table, a 200k-character word, 50k nested brackets) is
shown as plain text with a line saying why, instead of freezing the window."""

from __future__ import annotations

from typing import Any

import pytest
from PySide6.QtGui import QGuiApplication

from app import theme as themes
from app.chat_view import PAGE, ChatView, MessageView
from app.markdown_render import (
    MAX_FORMATTED_CHARS,
    MAX_SHOWN_CHARS,
    MAX_TABLE_CELLS,
    MarkdownRenderer,
    too_costly,
)

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")


def table(rows: int, cols: int) -> str:
    head = "| " + " | ".join(f"h{c}" for c in range(cols)) + " |\n"
    rule = "|" + "---|" * cols + "\n"
    return head + rule + "".join("| " + " | ".join(f"r{r}c{c}" for c in range(cols)) + " |\n" for r in range(rows))


def chat(n: int) -> list[MessageView]:
    return [MessageView(key=f"m{i}", position=i, role="user" if i % 2 == 0 else "assistant",
                        text=f"message {i}", status="done", can_edit=i % 2 == 0) for i in range(n)]


@pytest.fixture
def renderer() -> MarkdownRenderer:
    return MarkdownRenderer(themes.resolve("light"))


@pytest.fixture
def view(qtbot: Any, renderer: MarkdownRenderer) -> ChatView:
    v = ChatView(renderer)
    qtbot.addWidget(v)
    v.resize(800, 600)
    v.show()
    return v


def test_a_ten_thousand_message_chat_opens_with_one_page_of_bubbles(view: ChatView) -> None:
    views = chat(10_000)
    view.set_messages(views, scroll_to_end=True)
    assert len(view.message_widgets) == PAGE
    assert [w.view.key for w in view.message_widgets] == [v.key for v in views[-PAGE:]]
    assert len(view.bubble_texts()) == 10_000  # every message is still the chat's, with a bubble or not
    assert view.earlier_button.isVisible() and f"{10_000 - PAGE:,} more" in view.earlier_button.text()
    assert view.following


def test_earlier_messages_come_a_page_at_a_time_and_the_bubbles_on_screen_stay(
        qtbot: Any, view: ChatView) -> None:
    view.set_messages(chat(3 * PAGE + 5), scroll_to_end=True)
    shown = list(view.message_widgets)
    view.earlier_button.click()
    assert len(view.message_widgets) == 2 * PAGE
    assert view.message_widgets[PAGE:] == shown  # the same widgets, not rebuilt
    assert view.message_widgets[0].view.position == PAGE + 5
    assert not view.following  # the reader stays where they were
    bar = view.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0)
    old_range = bar.maximum()
    bar.setValue(bar.minimum())  # scrolling to the top brings in the next page
    qtbot.waitUntil(lambda: len(view.message_widgets) == 3 * PAGE)
    # the messages that were on screen stay there: pinned at the same distance from the end
    qtbot.waitUntil(lambda: bar.maximum() > old_range and bar.value() == bar.maximum() - old_range)
    view.earlier_button.click()
    assert len(view.message_widgets) == 3 * PAGE + 5 and not view.earlier_button.isVisible()


def test_a_new_message_keeps_the_bubbles_and_one_page_follows_the_end(view: ChatView) -> None:
    views = chat(100)
    view.set_messages(views, scroll_to_end=True)
    before = {w.view.key: w for w in view.message_widgets}
    more = [*views, MessageView(key="m100", position=100, role="user", text="and one more", status="done")]
    view.set_messages(more)
    assert len(view.message_widgets) == PAGE
    assert view.message_widgets[-1].view.text == "and one more"
    assert all(before[w.view.key] is w for w in view.message_widgets[:-1])  # reused, not rebuilt
    # an edit replaces everything after a message: bubbles above it stay, the rest follow the new views
    edited = [*views[:80], MessageView(key="m200", position=80, role="user", text="edited", status="done")]
    kept = view.message_widgets[0]
    view.set_messages(edited)
    assert [w.view.key for w in view.message_widgets] == [v.key for v in edited[-PAGE:]]
    assert kept in view.message_widgets
    view.set_messages(chat(3))  # another chat
    assert [w.view.text for w in view.message_widgets] == ["message 0", "message 1", "message 2"]
    assert not view.earlier_button.isVisible()


def test_an_old_message_can_be_reached_for_editing(view: ChatView) -> None:
    view.set_messages(chat(3 * PAGE), scroll_to_end=True)
    bubble = view.widget_for(2)
    assert bubble is not None and bubble.view.text == "message 2" and bubble.view.can_edit
    assert len(view.message_widgets) == 3 * PAGE


@pytest.mark.parametrize("text, reason", [
    (table(200, 200), "characters long"),
    ("x" * 200_000, "200,000 characters long"),
    ("see " + "x" * 5_000, "5,000-character word"),
    ("[" * 50_000 + "x" + "]" * 50_000, "characters long"),
    ("[" * 1_000 + " x " + "]" * 1_000, "nests brackets"),
    ("> " * 60 + "deep quote", "nests brackets or quotes"),
])
def test_a_pathological_reply_is_shown_as_plain_text_and_says_so(
        qtbot: Any, view: ChatView, renderer: MarkdownRenderer, text: str, reason: str) -> None:
    rendered = renderer.render(text)
    assert reason in rendered.plain_reason
    assert "Shown as plain text" in rendered.html and "<table" not in rendered.html
    view.set_messages([MessageView(key="m0", position=0, role="assistant", text=text, status="done")])
    bubble = view.message_widgets[0]
    assert "Shown as plain text" in bubble.body.toPlainText()
    assert len(bubble.body.toPlainText()) <= MAX_SHOWN_CHARS + 1_000  # what is laid out is bounded
    bubble.copy_button.click()
    assert QGuiApplication.clipboard().text() == text  # Copy still copies the whole message


def test_an_ordinary_reply_is_formatted(renderer: MarkdownRenderer) -> None:
    text = "# Title\n\nSome **bold** text with [a link](https://example.org) (and brackets [1]).\n\n" \
           + table(10, 5) + "\n```python\nprint(1)\n```\n"
    assert too_costly(text) == ""
    rendered = renderer.render(text)
    assert rendered.plain_reason == "" and "<table" in rendered.html and "<b>bold</b>" in rendered.html.replace(
        "strong", "b")
    assert rendered.code_blocks == ("print(1)",)
    assert too_costly("x" * (MAX_FORMATTED_CHARS + 1))


def test_a_big_table_becomes_aligned_text_and_the_rest_stays_formatted(renderer: MarkdownRenderer) -> None:
    rows, cols = 40, 10
    assert rows * cols > MAX_TABLE_CELLS
    text = "Intro with **bold**.\n\n" + table(rows, cols) + "\n```python\nprint(2)\n```\n"
    rendered = renderer.render(text)
    assert rendered.plain_reason == ""
    assert f"table of {(rows + 1) * cols:,} cells, shown as text" in rendered.html
    assert "<strong>bold</strong>" in rendered.html and "<td>r0c0" not in rendered.html
    aligned, code = rendered.code_blocks
    lines = aligned.splitlines()
    assert lines[0].startswith("h0    | h1") and set(lines[1]) <= {"-", "+"}
    assert lines[2].startswith("r0c0  | r0c1")
    bars = {tuple(i for i, ch in enumerate(line) if ch == "|") for line in lines[:1] + lines[2:]}
    assert len(bars) == 1  # the columns line up
    assert code == "print(2)"  # copy:1 is still the code block


def test_a_huge_user_message_is_shown_cut_short_and_copied_whole(view: ChatView) -> None:
    text = "y" * (MAX_SHOWN_CHARS + 5_000)
    view.set_messages([MessageView(key="m0", position=0, role="user", text=text, status="done")])
    bubble = view.message_widgets[0]
    shown = bubble.body.toPlainText()
    assert "5,000 more characters not shown" in shown and "\u200b" in shown  # break opportunities for layout
    bubble.copy_button.click()
    assert QGuiApplication.clipboard().text() == text


STORY = "".join(f"Paragraph {i} with **bold** words and more words.\n\n" for i in range(30)) \
    + "```python\nprint('first')\n```\n\n- a list\n- of items\n\n```python\nprint('second')\n```\n\nThe end."


def stream_into(view: ChatView, text: str, step: int) -> None:
    """Stream `text` into the view's second bubble `step` characters at a time, each piece rendered."""
    for end in range(step, len(text) + step, step):
        view.update_streaming(MessageView(key="m1", position=1, role="assistant", text=text[:end],
                                          status="streaming"))
        view.message_widgets[-1].render_now()  # as the stream timer would


def test_a_streaming_reply_re_renders_only_its_last_block(view: ChatView, renderer: MarkdownRenderer,
                                                          monkeypatch: Any) -> None:
    rendered: list[str] = []
    real = renderer.render_blocks

    def spy(sources: list[str], *args: Any, **kwargs: Any) -> Any:
        rendered.append("".join(sources))
        return real(sources, *args, **kwargs)

    monkeypatch.setattr(renderer, "render_blocks", spy)
    view.set_messages([MessageView(key="m0", position=0, role="user", text="Tell me", status="done"),
                       MessageView(key="m1", position=1, role="assistant", text="", status="streaming")])
    stream_into(view, STORY, 7)
    assert max(map(len, rendered)) < 80  # a block at a time, never the whole reply again
    bubble = view.message_widgets[-1]
    assert bubble.tail is not None and bubble.tail.isVisibleTo(bubble) and "The end" in bubble.tail.toPlainText()
    assert "Paragraph 29" in bubble.body.toPlainText() and "The end" not in bubble.body.toPlainText()

    done = MessageView(key="m1", position=1, role="assistant", text=STORY, status="done")
    view.set_messages([view.views[0], done])
    assert not bubble.tail.isVisibleTo(bubble) and "The end" in bubble.body.toPlainText()  # one document again
    bubble.body.linkActivated.emit("copy:1")
    assert QGuiApplication.clipboard().text() == "print('second')"

    whole = ChatView(MarkdownRenderer(themes.resolve("light")))  # the same reply opened from the history
    whole.set_messages([view.views[0], done])
    assert whole.message_widgets[-1].body.toPlainText().split() == bubble.body.toPlainText().split()
    whole.deleteLater()


def test_an_earlier_block_that_changes_while_streaming_is_redrawn(view: ChatView) -> None:
    view.set_messages([MessageView(key="m0", position=0, role="user", text="List", status="done"),
                       MessageView(key="m1", position=1, role="assistant", text="", status="streaming")])
    # "2" alone is a paragraph after the list; "2." makes it the list's second item
    text = "Intro.\n\n1. one\n\n2. two\n\nAfter."
    stream_into(view, text[:text.index("2") + 1], 100)
    bubble = view.message_widgets[-1]
    assert bubble.body.toPlainText().split() == ["Intro.", "one"]  # the list looked finished
    stream_into(view, text, 1)
    assert bubble.body.toPlainText().split() == ["Intro.", "one", "two"]  # redrawn with its new item
    view.set_messages([view.views[0], MessageView(key="m1", position=1, role="assistant", text=text,
                                                  status="stopped")])
    assert bubble.body.toPlainText().split() == ["Intro.", "one", "two", "After."]
    assert "stopped" in bubble.status_label.text()


def test_a_pathological_reply_streams_as_plain_text(view: ChatView) -> None:
    view.set_messages([MessageView(key="m0", position=0, role="user", text="Table", status="done"),
                       MessageView(key="m1", position=1, role="assistant", text="", status="streaming")])
    text = table(200, 200)
    stream_into(view, text, len(text) // 20)
    bubble = view.message_widgets[-1]
    assert "Shown as plain text" in bubble.body.toPlainText()
    assert bubble.tail is None or not bubble.tail.isVisibleTo(bubble)
