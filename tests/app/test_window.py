"""The desktop window, driven like a user would: replies stream into the right chat, Stop,
Regenerate and Edit work, chats survive a restart, and the GUI never waits on the model.

The tiny random model answers (tests/tiny.py); one test uses the bundled model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QCoreApplication, Qt
from PySide6.QtGui import QGuiApplication

from app.main_window import MainWindow
from engine.specs import CacheSpec, SamplingSettings
from engine.store import ChatSettings
from tests.conftest import SHORT, TURN_TIMEOUT_MS, speculation_off, stream_until
from tests.tiny import ForwardGate, tiny_loaded_model

# The offscreen platform warns about a window-manager feature it lacks; nothing of ours.
pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")

LONG = {"temperature": 0.0, "max_new_tokens": 900, "repetition_penalty": 1.0}
TURN_TIMEOUT = TURN_TIMEOUT_MS
HELD = 8  # a held reply's tokens (tests/tiny.py ForwardGate): well short of LONG's, and of a stop token

MakeWindow = Callable[..., MainWindow]
SendAndWait = Callable[[MainWindow, str], int]


def messages(win: MainWindow, chat_id: int | None = None) -> list[tuple[str, str]]:
    cid = win.current_chat if chat_id is None else chat_id
    assert cid is not None
    return [(m.role, m.status) for m in win.store.messages(cid)]


def test_a_reply_streams_token_by_token_and_every_message_is_committed_as_it_exists(
        qtbot: Any, make_window: MakeWindow) -> None:
    win = make_window(sampling={**SHORT, "max_new_tokens": 24})
    qtbot.keyClick(win, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    chat_id = win.current_chat
    assert chat_id is not None and win.store.messages(chat_id) == []

    seen: dict[str, Any] = {"deltas": 0}

    def on_started(_event: object) -> None:
        # the user's message is on disk before anything is generated
        seen["at_start"] = messages(win, chat_id)

    def on_stream(cid: int) -> None:
        seen["deltas"] += 1
        seen.setdefault("at_first_token", messages(win, cid))
        seen.setdefault("bubbles_while_streaming", win.chat_view.bubble_texts())

    win.engine.turn_started.connect(on_started)
    win.controller.stream_changed.connect(on_stream)
    qtbot.keyClicks(win.composer.input, "Hello")
    qtbot.keyClick(win.composer.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(win.composer.input, "there")
    assert win.composer.input.toPlainText() == "Hello\nthere"  # Shift+Enter is a new line
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT):
        qtbot.keyClick(win.composer.input, Qt.Key.Key_Return)  # Enter sends
    assert win.composer.input.toPlainText() == ""

    assert seen["at_start"] == [("user", "done")]
    assert seen["at_first_token"] == [("user", "done"), ("assistant", "streaming")]
    assert seen["deltas"] > 3
    assert seen["bubbles_while_streaming"][0] == ("user", "Hello\nthere")
    stored = win.store.messages(chat_id)
    assert [(m.role, m.status) for m in stored] == [("user", "done"), ("assistant", "done")]
    reply = stored[1]
    assert reply.token_ids and reply.tokens == len(reply.token_ids) and reply.stats
    assert stored[0].tokens and stored[0].tokens > 0
    assert win.chat_view.bubble_texts() == [("user", "Hello\nthere"), ("assistant", reply.content)]
    # per-message token counts on hover, the sidebar names the chat, the meters show the turn
    assert f"{reply.tokens} tokens" in win.chat_view.message_widgets[1].toolTip()
    assert "prefilled" in win.chat_view.message_widgets[1].toolTip()
    assert win.sidebar.entries()[0].title == "Hello"
    assert win.sidebar.entries()[0].cache_place == "ram"
    assert "prefilled" in win.meters.turn_label.text()
    win.refresh_memory()
    assert "KV" in win.meters.memory_label.text()


def test_stop_ends_the_reply_within_a_token_and_keeps_what_was_written(qtbot: Any, make_window: MakeWindow,
                                                                       gate: ForwardGate) -> None:
    """The reply is held at a known token (its HELD-th: the model waits at the pass after it); Stop is
    pressed there, the pass is let go, and the reply ends with at most that one more token, everything
    shown so far kept in the chat."""
    win = make_window(loader=lambda: gate.attach(tiny_loaded_model()), sampling=LONG)
    chat_id = win.new_chat()
    assert chat_id is not None
    speculation_off(win.store, chat_id)
    gate.hold_after(HELD)  # the prompt's pass (the first token), then HELD - 1 one-token steps
    win.send("Write a lot")
    qtbot.waitUntil(lambda: gate.held, timeout=TURN_TIMEOUT)
    QCoreApplication.sendPostedEvents()  # every token the worker sent before it was held, shown
    shown = win.controller.runtime(chat_id).text
    assert shown and win.composer.button.text() == "Stop"
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT):
        qtbot.keyClick(win.composer.input, Qt.Key.Key_Escape)
        gate.open()
    assert gate.passes == HELD + 1  # the held pass, and no other
    user, reply = win.store.messages(chat_id)
    assert reply.status == "stopped" and not reply.complete
    assert reply.stats is not None and reply.stats["finish_reason"] == "cancelled"
    assert HELD <= reply.stats["generated_tokens"] <= HELD + 1  # within a token of Stop
    assert reply.content.startswith(shown)  # what was written is kept
    assert win.chat_view.bubble_texts()[-1] == ("assistant", reply.content)
    assert win.composer.button.text() == "Send"
    assert "stopped" in win.chat_view.message_widgets[-1].status_label.text()


def test_regenerate_replaces_the_last_reply_and_reuses_the_cached_prompt(qtbot: Any,
                                                                           make_window: MakeWindow,
        send_and_wait: SendAndWait) -> None:
    win = make_window()
    chat_id = send_and_wait(win, "Tell me something")
    first = win.store.messages(chat_id)[1]
    button = win.chat_view.message_widgets[-1].regen_button
    assert button.isVisible()
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT):
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    msgs = win.store.messages(chat_id)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].created_at > first.created_at  # a new row (SQLite may reuse the id)
    assert msgs[1].stats is not None
    assert msgs[1].stats["reused_tokens"] == msgs[1].stats["prompt_tokens"] - 1  # all but the token that is fed


def test_editing_an_earlier_message_continues_from_there_reusing_the_cache_up_to_it(
        qtbot: Any, make_window: MakeWindow, send_and_wait: SendAndWait) -> None:
    win = make_window()
    chat_id = win.new_chat()
    win.store.set_settings(chat_id, ChatSettings(system_prompt="You are a careful assistant for tests.",
                                                 sampling=SamplingSettings(**SHORT)))
    send_and_wait(win, "First question")
    send_and_wait(win, "Second question")
    assert len(win.store.messages(chat_id)) == 4

    bubble = win.chat_view.widget_for(0)
    assert bubble is not None and bubble.edit_button.isVisible()
    qtbot.mouseClick(bubble.edit_button, Qt.MouseButton.LeftButton)
    assert bubble.editor is not None
    bubble.editor.setPlainText("First question, edited")
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT):
        qtbot.keyClick(bubble.editor, Qt.Key.Key_Return)
    msgs = win.store.messages(chat_id)
    assert [(m.role, m.content) for m in msgs][:1] == [("user", "First question, edited")]
    assert len(msgs) == 2
    stats = msgs[1].stats
    assert stats is not None
    # the system prompt and the start of the first user turn come from the cache
    assert stats["reused_tokens"] > len("You are a careful assistant for tests.")
    assert stats["prefilled_tokens"] < stats["prompt_tokens"]


def test_switching_the_cache_strategy_mid_chat_rebuilds_the_cache_with_visible_progress(
        qtbot: Any, make_window: MakeWindow, send_and_wait: SendAndWait) -> None:
    win = make_window()
    chat_id = send_and_wait(win, "Hello cache")
    win.settings_button.click()
    panel = win.settings_panel
    assert win.dock.isVisible() and panel.chat_id == chat_id
    target = "sink"  # a dynamic cache converts into a sink cache in place (and the chat becomes lossy)
    panel.select_strategy(target)
    panel.param_widget("window").setValue(2048)  # type: ignore[attr-defined]
    assert panel.apply_button.isEnabled()
    seen: list[str] = []
    win.controller.state_changed.connect(lambda cid: seen.append(win.controller.runtime(cid).state))
    with qtbot.waitSignal(win.controller.rebuild_finished, timeout=TURN_TIMEOUT):
        qtbot.mouseClick(panel.apply_button, Qt.MouseButton.LeftButton)
        assert panel.progress.isVisible()  # visible progress while the worker rebuilds
    assert "rebuilding" in seen
    notice = win.controller.runtime(chat_id).notices[0]
    assert notice.kind == "info" and notice.text.startswith("Cache converted to “sink”")
    assert win.store.chat(chat_id).settings.cache.strategy == target
    assert win.store.chat(chat_id).settings.cache.window == 2048
    cache = win.controller.runtime(chat_id).cache
    assert cache is not None and cache.tokens > 0 and cache.strategy == target
    assert win.lossy_badge.isVisible()
    send_and_wait(win, "And after the switch?")
    assert win.store.messages(chat_id)[-1].status == "done"


def test_switching_to_an_hqq_quantized_cache_says_while_it_loads_the_library(
        qtbot: Any, make_window: MakeWindow, monkeypatch: pytest.MonkeyPatch, send_and_wait: SendAndWait) -> None:
    from PySide6.QtWidgets import QComboBox

    from engine.caches import quantized

    monkeypatch.setattr(quantized, "_warmed", set())  # as in a fresh run: the library is not loaded yet
    win = make_window()
    chat_id = send_and_wait(win, "Hello cache")
    model = win.engine.model
    assert model is not None
    if model.backend_availability.get("hqq") is not None:
        pytest.skip(str(model.backend_availability["hqq"]))
    win.settings_button.click()
    panel = win.settings_panel
    panel.select_strategy("quantized")
    backend = panel.param_widget("backend")
    assert isinstance(backend, QComboBox)
    backend.setCurrentIndex(backend.findText("hqq"))
    messages: list[str] = []
    win.engine.status.connect(messages.append)
    with qtbot.waitSignal(win.controller.rebuild_finished, timeout=TURN_TIMEOUT):
        qtbot.mouseClick(panel.apply_button, Qt.MouseButton.LeftButton)
    assert messages and "Loading the quantization library (HQQ)" in messages[0]
    assert win.store.chat(chat_id).settings.cache.backend == "hqq"
    cache = win.controller.runtime(chat_id).cache
    assert cache is not None and cache.strategy == "quantized" and cache.tokens > 0
    send_and_wait(win, "And now in HQQ?")
    assert int(win.controller.runtime(chat_id).last_stats["reused_tokens"]) > 0
    assert win.store.messages(chat_id)[-1].status == "done"


def test_a_strategy_that_cannot_be_built_is_reported_in_the_chat_and_rolled_back(
        qtbot: Any, make_window: MakeWindow, send_and_wait: SendAndWait) -> None:
    win = make_window()
    chat_id = send_and_wait(win, "Hello")
    before = win.store.chat(chat_id).settings
    bad = ChatSettings(before.system_prompt, before.sampling, CacheSpec("sink", sink_tokens=8, window=4))
    with qtbot.waitSignal(win.controller.rebuild_finished, timeout=TURN_TIMEOUT):
        win.controller.set_settings(chat_id, bad)
    notice = win.controller.runtime(chat_id).notices[0]
    assert notice.kind == "error" and "window" in notice.text
    assert win.store.chat(chat_id).settings.cache == before.cache
    assert [w.notice.kind for w in win.chat_view.notice_widgets] == ["error"]
    send_and_wait(win, "Still works?")
    assert win.store.messages(chat_id)[-1].status == "done"


def test_a_reply_keeps_streaming_into_its_own_chat_while_another_chat_is_shown(
        qtbot: Any, make_window: MakeWindow, gate: ForwardGate) -> None:
    win = make_window(loader=lambda: gate.attach(tiny_loaded_model()), sampling=LONG)
    chat_a = win.new_chat()
    assert chat_a is not None
    speculation_off(win.store, chat_a)
    gate.hold_after(HELD)
    win.send("A long story please")
    qtbot.waitUntil(lambda: gate.held, timeout=TURN_TIMEOUT)
    chat_b = win.new_chat()
    assert chat_b is not None
    win.store.set_settings(chat_b, ChatSettings(sampling=SamplingSettings(**SHORT)))
    assert win.chat_view.bubble_texts() == []
    QCoreApplication.sendPostedEvents()
    grown_from = len(win.controller.runtime(chat_a).text)
    gate.step(HELD)  # chat A's reply goes on while chat B is shown
    qtbot.waitUntil(lambda: gate.held_after(2 * HELD), timeout=TURN_TIMEOUT)
    QCoreApplication.sendPostedEvents()
    assert len(win.controller.runtime(chat_a).text) > grown_from + 5
    win.send("Meanwhile, in chat B")  # queued behind chat A's reply
    assert win.controller.runtime(chat_b).state == "queued"
    assert [role for role, _text in win.chat_view.bubble_texts()] == ["user", "assistant"]
    assert win.chat_view.bubble_texts()[0] == ("user", "Meanwhile, in chat B")
    assert "Queued" in win.chat_view.bubble_texts()[1][1]
    # typing stays possible while a reply streams
    qtbot.keyClicks(win.composer.input, "typing works")
    assert win.composer.input.toPlainText() == "typing works"
    win.composer.clear()

    with qtbot.waitSignals([win.controller.turn_finished, win.controller.turn_finished], timeout=TURN_TIMEOUT):
        win.controller.stop(chat_a)
        gate.open()
    assert messages(win, chat_a) == [("user", "done"), ("assistant", "stopped")]
    assert messages(win, chat_b) == [("user", "done"), ("assistant", "done")]
    win.select_chat(chat_a)
    texts = win.chat_view.bubble_texts()
    assert texts[0] == ("user", "A long story please")
    assert texts[1] == ("assistant", win.store.messages(chat_a)[1].content) and len(texts[1][1]) > 5


def test_the_view_follows_a_streaming_reply_unless_the_user_scrolled_up(qtbot: Any, make_window: MakeWindow,
                                                                       gate: ForwardGate) -> None:
    win = make_window(loader=lambda: gate.attach(tiny_loaded_model()), sampling=LONG)
    win.resize(700, 320)  # a short view, so the reply outgrows it quickly
    bar = win.chat_view.verticalScrollBar()
    chat_id = win.new_chat()
    assert chat_id is not None
    speculation_off(win.store, chat_id)
    gate.hold_after(1)
    win.send("Fill the screen")
    qtbot.waitUntil(lambda: gate.held, timeout=TURN_TIMEOUT)

    def rendered() -> bool:
        return not win.chat_view.message_widgets[-1].behind

    # a few tokens whenever the last ones are on screen: the test takes a fraction of LONG's tokens
    stream_until(qtbot, gate, lambda: bar.maximum() > 40 and bar.value() == bar.maximum(), per_step=8,
                 caught_up=rendered, timeout=TURN_TIMEOUT)
    bar.setValue(0)  # the user scrolls up to read
    grown = bar.maximum()
    stream_until(qtbot, gate, lambda: bar.maximum() > grown + 20, per_step=8, caught_up=rendered,
                 timeout=TURN_TIMEOUT)
    assert bar.value() == 0 and not win.chat_view.following
    bar.setValue(bar.maximum())  # back at the end: following again
    grown = bar.maximum()
    stream_until(qtbot, gate, lambda: bar.maximum() > grown + 20, per_step=8, caught_up=rendered,
                 timeout=TURN_TIMEOUT)
    assert bar.value() == bar.maximum()
    assert win.store.messages(chat_id)[-1].status == "streaming"  # all of it while the reply streamed
    assert gate.passes < LONG["max_new_tokens"] // 2
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT):
        win.stop()
        gate.open()


def test_messages_typed_while_the_model_loads_are_answered_once_it_is_ready(
        qtbot: Any, make_window: MakeWindow) -> None:
    release = threading.Event()

    def slow_loader() -> Any:
        assert release.wait(30)
        return tiny_loaded_model()

    win = make_window(loader=slow_loader, wait_ready=False)
    win.start_engine()
    win.send("Are you there?")
    chat_id = win.current_chat
    assert chat_id is not None
    assert messages(win, chat_id) == [("user", "done")]
    assert "Waiting for the model" in win.chat_view.bubble_texts()[-1][1]
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT):
        release.set()
    assert messages(win, chat_id) == [("user", "done"), ("assistant", "done")]


def test_chats_are_all_there_after_a_restart(qtbot: Any, make_window: MakeWindow, send_and_wait: SendAndWait) -> None:
    win = make_window()
    first = send_and_wait(win, "Remember me")
    win.controller.rename(first, "Kept chat")
    second = win.new_chat()
    send_and_wait(win, "Another one")
    expected = {cid: win.store.messages(cid) for cid in (first, second)}
    win.close()

    again = make_window()
    assert [e.title for e in again.sidebar.entries()] == ["Another one", "Kept chat"]
    assert again.current_chat == second
    for cid, msgs in expected.items():
        assert again.store.messages(cid) == msgs
    again.select_chat(first)
    assert again.chat_view.bubble_texts() == [(m.role, m.content) for m in expected[first]]
    # how full the context is, and the last reply's figures, come back with the chat
    assert again.context_label.text().endswith(" / 1,024 tokens") and again.context_label.text() != ""
    assert again.meters.turn_label.text().startswith("Last reply:")
    send_and_wait(again, "And a follow-up")
    assert messages(again, first)[-1] == ("assistant", "done")


def test_search_rename_delete_and_undo_from_the_sidebar(qtbot: Any, make_window: MakeWindow,
        send_and_wait: SendAndWait) -> None:
    win = make_window()
    send_and_wait(win, "Penguins of the south")
    win.new_chat()
    send_and_wait(win, "Volcanoes of the north")
    qtbot.keyClick(win, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    assert win.sidebar.search.hasFocus()
    qtbot.keyClicks(win.sidebar.search, "penguin")
    assert [e.title for e in win.sidebar.entries()] == ["Penguins of the south"]
    win.sidebar.search.clear()

    item = win.sidebar.list.item(0)
    item.setText("Lava")  # what an inline rename in the list does
    assert win.store.chats()[0].title == "Lava"
    victim = win.sidebar.entries()[0].chat_id
    win.delete_chat(victim)
    assert [e.title for e in win.sidebar.entries()] == ["Penguins of the south"]
    assert win.sidebar.undo_bar.isVisible()
    qtbot.mouseClick(win.sidebar.undo_button, Qt.MouseButton.LeftButton)
    assert [e.title for e in win.sidebar.entries()] == ["Lava", "Penguins of the south"]
    assert win.current_chat == victim


def test_export_and_import(qtbot: Any, make_window: MakeWindow, tmp_path: Path, send_and_wait: SendAndWait) -> None:
    win = make_window()
    chat_id = send_and_wait(win, "Export me")
    win.controller.export_markdown(chat_id, tmp_path / "chat.md")
    win.controller.export_json(chat_id, tmp_path / "chat.json")
    assert (tmp_path / "chat.md").read_text().startswith("# Export me")
    imported = win.controller.import_json(tmp_path / "chat.json")
    assert imported != chat_id
    assert [(m.role, m.content) for m in win.store.messages(imported)] == \
        [(m.role, m.content) for m in win.store.messages(chat_id)]
    assert win.store.chat(imported).settings == win.store.chat(chat_id).settings


def test_a_chat_beyond_the_context_says_so_and_offers_the_overflow_policies(
        qtbot: Any, make_window: MakeWindow, send_and_wait: SendAndWait) -> None:
    win = make_window()
    send_and_wait(win, "x" * 1100)  # the tiny model reads 1,024 tokens, one per byte
    chat_id = win.current_chat
    assert chat_id is not None
    assert messages(win, chat_id) == [("user", "done")]
    [widget] = win.chat_view.notice_widgets
    assert widget.notice.kind == "warning" and "context" in widget.notice.text
    labels = {a.label: a.disabled_reason for a in widget.notice.actions}
    assert labels["Stop here"] is None
    assert {"Truncate the middle", "Continue with attention sinks"} <= set(labels)
    assert all(reason is None for reason in labels.values())
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT):
        win.controller.act(chat_id, "overflow:sink")
    assert win.store.chat(chat_id).settings.overflow == "sink"  # remembered for the next turns
    assert messages(win, chat_id)[-1][0] == "assistant"
    assert any("context" in n.text for n in win.controller.runtime(chat_id).notices)
    # The chat now is a sink chat: stored as such (lossy badge), and the next turn reuses its cache
    # instead of switching back and recomputing everything.
    assert win.store.chat(chat_id).settings.cache.strategy == "sink"
    assert win.lossy_badge.isVisible()
    send_and_wait(win, "and one more")
    stats = win.controller.runtime(chat_id).last_stats
    assert int(stats["reused_tokens"]) > 900, stats


def test_lossy_strategy_shows_a_badge_and_code_blocks_can_be_copied(qtbot: Any, make_window: MakeWindow) -> None:
    win = make_window()
    chat_id = win.new_chat()
    win.store.add_message(chat_id, "user", "Code please")
    win.store.add_message(chat_id, "assistant", "Here:\n\n```python\nprint('hi')\n```\n<script>alert(1)</script>")
    win.store.set_settings(chat_id, ChatSettings(cache=CacheSpec("quantized")))
    win.current_chat = None
    win.select_chat(chat_id)
    assert win.lossy_badge.isVisible()
    bubble = win.chat_view.message_widgets[1]
    html = bubble.body.text()
    assert "&lt;script&gt;" in html and "<script>" not in html
    bubble.body.linkActivated.emit("copy:0")
    assert QGuiApplication.clipboard().text() == "print('hi')"


def test_theme_follows_the_choice(make_window: MakeWindow) -> None:
    win = make_window()
    win.set_theme("dark")
    assert win.palette().window().color().lightness() < 80
    assert win.renderer.theme.dark
    win.set_theme("light")
    assert win.palette().window().color().lightness() > 200


@pytest.mark.real_model
def test_the_bundled_model_answers_in_the_window(qtbot: Any, make_window: MakeWindow, real_lm: Any,
        send_and_wait: SendAndWait) -> None:
    win = make_window(loader=lambda: real_lm, sampling={"temperature": 0.0, "max_new_tokens": 24})
    chat_id = send_and_wait(win, "What is the capital of France?")
    reply = win.store.messages(chat_id)[1]
    assert "Paris" in reply.content and reply.status == "done"
    assert "Paris" in win.chat_view.message_widgets[1].body.text()


def test_the_settings_panel_shows_the_measured_cost_and_warns_above_ten_percent(
        qtbot: Any, make_window: MakeWindow, tmp_path: Path, monkeypatch: Any, send_and_wait: SendAndWait) -> None:
    import json

    from engine.caches import CacheSpec, fidelity, quantization_defaults

    two_bit = CacheSpec("quantized", **quantization_defaults(2))
    four_bit = CacheSpec("quantized", **quantization_defaults(4))
    table = tmp_path / "fidelity.json"
    table.write_text(json.dumps({"model": "m", "tokens": 8000, "rows": [
        {"spec": two_bit.to_dict(), "ppl_ratio": 1.161}, {"spec": four_bit.to_dict(), "ppl_ratio": 1.004}]}))
    monkeypatch.setattr(fidelity, "TABLE", table)
    from PySide6.QtWidgets import QComboBox

    def set_param(name: str, value: int) -> None:
        widget = panel.param_widget(name)
        if isinstance(widget, QComboBox):
            widget.setCurrentIndex(widget.findData(value))
        else:
            widget.setValue(value)  # type: ignore[attr-defined]

    win = make_window()
    send_and_wait(win, "Hello")
    win.settings_button.click()
    panel = win.settings_panel
    panel.select_strategy("quantized")
    for name, value in quantization_defaults(4).items():
        set_param(name, value)
    assert "+0.4% perplexity" in panel.strategy_note.text() and "⚠ Measured" not in panel.strategy_note.text()
    for name, value in quantization_defaults(2).items():
        set_param(name, value)
    assert "⚠ Measured on the bundled model: +16.1% perplexity" in panel.strategy_note.text()
    set_param("residual", 32)
    assert "not measured" in panel.strategy_note.text()


def test_auto_shows_the_strategy_the_advisor_chose_and_its_lossy_badge(qtbot: Any, make_window: MakeWindow) -> None:
    from dataclasses import replace

    win = make_window()
    chat_id = win.new_chat()
    assert win.store.chat(chat_id).settings.cache.strategy == "auto"
    entry = next(e for e in win.sidebar.entries() if e.chat_id == chat_id)
    assert entry.strategy == "auto: dynamic" and not win.lossy_badge.isVisible()
    model = win.engine.model
    assert model is not None
    win.engine.model = replace(model, auto_cache=CacheSpec("quantized", nbits=4))  # a smaller machine
    win.refresh_sidebar()
    entry = next(e for e in win.sidebar.entries() if e.chat_id == chat_id)
    assert entry.strategy == "auto: quantized" and entry.lossy
    assert win.lossy_badge.isVisible()


def test_a_chat_deleted_mid_reply_comes_back_with_its_reply_stopped(qtbot: Any, make_window: MakeWindow,
                                                                    gate: ForwardGate) -> None:
    win = make_window(loader=lambda: gate.attach(tiny_loaded_model()), sampling=LONG)
    chat_id = win.new_chat()
    assert chat_id is not None
    gate.hold_after(HELD)  # mid-reply however fast the machine (the prompt's pass and a few more)
    win.send("Write a lot")
    qtbot.waitUntil(lambda: gate.held, timeout=TURN_TIMEOUT)
    with qtbot.waitSignal(win.engine.turn_done, timeout=TURN_TIMEOUT):  # stopped; its end finds no chat
        win.delete_chat(chat_id)
        gate.open()
    qtbot.mouseClick(win.sidebar.undo_button, Qt.MouseButton.LeftButton)
    assert win.current_chat == chat_id
    user, reply = win.store.messages(chat_id)
    assert reply.status == "stopped", reply.status
    assert not win.controller.runtime(chat_id).busy
    win.store.set_settings(chat_id, ChatSettings(sampling=SamplingSettings(**SHORT)))  # a short reply this time
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT):
        win.send("And now?")  # the chat goes on
    assert [m.role for m in win.store.messages(chat_id)] == ["user", "assistant", "user", "assistant"]
    assert win.store.messages(chat_id)[-1].status == "done"


def test_the_last_reply_meter_follows_the_chat_on_screen(qtbot: Any, make_window: MakeWindow,
        send_and_wait: SendAndWait) -> None:
    win = make_window()
    first = send_and_wait(win, "A short question")
    first_text = win.meters.turn_label.text()
    assert first_text.startswith("Last reply:")
    second = win.new_chat()
    assert win.meters.turn_label.text() == ""  # a new chat has no last reply
    send_and_wait(win, "Another question, somewhat longer than the first one was")
    second_text = win.meters.turn_label.text()
    assert second_text.startswith("Last reply:") and second_text != first_text
    win.select_chat(first)
    assert win.meters.turn_label.text() == first_text
    win.select_chat(second)
    assert win.meters.turn_label.text() == second_text


def test_near_the_context_the_chat_offers_the_policies_ahead_of_time(qtbot: Any, make_window: MakeWindow,
        send_and_wait: SendAndWait) -> None:
    win = make_window()
    chat_id = send_and_wait(win, "y" * 880)  # the tiny model reads 1,024 tokens, one per byte
    widgets = [w for w in win.chat_view.notice_widgets if "When it is full" in w.notice.text]
    [widget] = widgets
    assert widget.notice.kind == "warning" and "When it is full, Cachet will stop and ask" in widget.notice.text
    keys = {a.key for a in widget.notice.actions}
    assert {"when-full:truncate-middle", "when-full:sink"} <= keys and "when-full:stop" not in keys
    win.controller.act(chat_id, "when-full:sink")
    assert win.store.chat(chat_id).settings.overflow == "sink"
    assert "continue with attention sinks" in win.controller.runtime(chat_id).notices[0].text
    win.close()
    win = make_window()  # after a restart the chat still says how full it is, and what will happen
    assert win.current_chat == chat_id
    [widget] = [w for w in win.chat_view.notice_widgets if "When it is full" in w.notice.text]
    assert "continue with attention sinks" in widget.notice.text
    send_and_wait(win, "z" * 200)  # overflows now: applied without asking
    assert win.store.messages(chat_id)[-1].role == "assistant"
    assert win.store.chat(chat_id).settings.cache.strategy == "sink"
    assert not any(n.actions and n.actions[0].key.startswith("overflow:")
                   for n in win.controller.runtime(chat_id).notices)


def test_closing_while_the_model_loads_does_not_wait_for_the_load(qtbot: Any, make_window: MakeWindow) -> None:
    steps: list[str] = []
    never = threading.Event()

    def slow_loader(progress: Callable[[str], None]) -> Any:
        for i in range(10_000):  # a long load in steps (about 100 s), as converting a GGUF file is
            progress(f"step {i}")
            steps.append(f"step {i}")
            never.wait(0.01)  # a step's work
        return tiny_loaded_model()

    win = make_window(loader=slow_loader, wait_ready=False)
    with qtbot.waitSignal(win.engine.load_progress, timeout=TURN_TIMEOUT):
        win.start_engine()
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=TURN_TIMEOUT)
    win.close()
    assert not win.isVisible() and not win.engine.running
    assert len(steps) < 10_000  # the load stopped at its next step instead of running to its end


def test_with_a_gpu_the_meter_also_counts_idle_caches_moved_to_ram(qtbot: Any, make_window: MakeWindow,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: the window is told it has one, and where each chat's cache is."""
    from dataclasses import replace

    from app import meters
    from app.protocol import CacheState

    win = make_window()
    model = win.engine.model
    assert model is not None
    win.engine.model = replace(model, device="cuda:0")
    win.meters.model = win.engine.model
    monkeypatch.setattr(meters, "free_bytes", lambda device: 8 * 2**30 if device.startswith("cuda") else 2**30)
    a, b, c = win.new_chat(), win.new_chat(), win.new_chat()
    for chat_id, where, size in ((a, "gpu", 3 * 2**20), (b, "ram", 5 * 2**20), (c, "ram", 7 * 2**20)):
        win.controller.runtime(chat_id).cache = CacheState(chat_id, where, 100, size, "dynamic")
    win.refresh_memory()
    text = win.meters.memory_label.text()
    assert text.startswith("VRAM:") and "KV 3.0 MiB (1 chat)" in text and "free 8.0 GiB" in text
    assert "RAM: KV 12.0 MiB (2 idle chats) · free 1.0 GiB" in text


def test_a_model_split_between_gpu_and_cpu_meters_the_kv_on_both(qtbot: Any, make_window: MakeWindow,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: the window is told its model runs 20 of 30 layers on a GPU, and where each chat's cache is
    (a ready chat's GPU layers' KV in VRAM, its other layers' in RAM; an idle chat's, moved, all in RAM)."""
    from dataclasses import replace

    from app import meters
    from app.protocol import CacheState

    win = make_window()
    model = win.engine.model
    assert model is not None
    win.engine.model = replace(model, device="cpu", gpu_layers=20, layers=30, gpu_device="cuda:0",
                               split="20 of 30 layers on cuda:0, 10 in RAM", weights_bytes=12 * 2**30,
                               gpu_weights_bytes=8 * 2**30)
    win.meters.model = win.engine.model
    monkeypatch.setattr(meters, "free_bytes", lambda device: 2 * 2**30 if device.startswith("cuda") else 5 * 2**30)
    a, b = win.new_chat(), win.new_chat()
    win.controller.runtime(a).cache = CacheState(a, "gpu", 100, 30 * 2**20, "dynamic", gpu_bytes=20 * 2**20)
    win.controller.runtime(b).cache = CacheState(b, "ram", 100, 6 * 2**20, "dynamic")
    win.refresh_memory()
    text = win.meters.memory_label.text()
    assert text == ("VRAM: weights 8.0 GiB · KV 20.0 MiB (1 chat) · free 2.0 GiB  |  "
                    "RAM: weights 4.0 GiB · KV 16.0 MiB, 1 idle chat · free 5.0 GiB")
    assert "20 of 30 layers on cuda:0" in win.meters.memory_label.toolTip()


def test_the_window_redraws_a_streaming_chat_from_memory(
        qtbot: Any, make_window: MakeWindow, monkeypatch: pytest.MonkeyPatch, send_and_wait: SendAndWait) -> None:
    """While a reply streams (a cache report every half second, a token every step), nothing re-reads
    the chat's messages from the database, and the end of the turn redraws its sidebar entry only."""
    win = make_window(sampling={**SHORT, "max_new_tokens": 60})
    chat_id = send_and_wait(win, "A first question")
    other = win.new_chat()
    send_and_wait(win, "Another chat, to have two entries")
    win.select_chat(chat_id)
    reads: list[int] = []
    rebuilt: list[int] = []
    real_messages, real_set_entries = win.store.messages, win.sidebar.set_entries
    monkeypatch.setattr(win.store, "messages", lambda cid: reads.append(cid) or real_messages(cid))
    monkeypatch.setattr(win.sidebar, "set_entries", lambda *a: rebuilt.append(1) or real_set_entries(*a))
    states: list[object] = []
    win.engine.cache_state.connect(states.append)
    send_and_wait(win, "A follow-up, with a longer reply")
    assert states and reads == [] and rebuilt == []
    assert win.chat_view.bubble_texts()[-1] == ("assistant", win.store.messages(chat_id)[-1].content)
    assert [e.chat_id for e in win.sidebar.entries()] == [chat_id, other]  # moved to the top, in place
