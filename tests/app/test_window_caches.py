"""What the window shows of every chat's cache: where it is (the sidebar's badges), where it came
back from (the status bar and a reply's hover), what the engine did when memory ran out (a notice,
the new strategy kept with the chat), and that no turn it sent is left behind. The engine's
side of all this (the pool, budgets, snapshots, the fallback) is tested on the service
(tests/engine/test_service.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from PySide6.QtCore import Qt

from app.main_window import MainWindow
from app.meters import describe_restore
from app.protocol import CacheRestored
from tests.conftest import TURN_TIMEOUT_MS
from tests.tiny import ForwardGate, tiny_loaded_model

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")

PROMPT = "Tell me how a key-value cache speeds up a chat with a language model, please. "
LONG = {"temperature": 0.0, "max_new_tokens": 900, "repetition_penalty": 1.0}
MakeWindow = Callable[..., MainWindow]
SendAndWait = Callable[[MainWindow, str], int]


def place(win: MainWindow, chat_id: int) -> str:
    return next(e.cache_place for e in win.sidebar.entries() if e.chat_id == chat_id)


def test_a_chat_reopened_after_a_restart_shows_where_its_cache_came_from(
        qtbot: Any, make_window: MakeWindow, send_and_wait: SendAndWait) -> None:
    win = make_window()
    old = win.new_chat()
    send_and_wait(win, PROMPT)
    win.new_chat()
    send_and_wait(win, "Another chat.")
    win.close()  # quitting saves every chat's cache

    again = make_window()
    qtbot.waitUntil(lambda: place(again, old) == "disk", timeout=TURN_TIMEOUT_MS)  # known before it is opened
    with qtbot.waitSignal(again.engine.cache_restored, timeout=TURN_TIMEOUT_MS,
                          check_params_cb=lambda e: e.chat_id == old):
        again.select_chat(old)
    assert "Cache restored from disk in" in again.statusBar().currentMessage()
    send_and_wait(again, "Do you still remember?")
    assert "cache restored from disk in" in again.chat_view.message_widgets[-1].toolTip()
    assert "cache restored from disk in" in again.meters.turn_label.toolTip()
    assert place(again, old) == "ram"  # a CPU-only machine: the active chat's "device" is RAM


def test_where_a_cache_came_from_reads_as_a_sentence() -> None:
    assert describe_restore(CacheRestored(1, "ram", 0.0123, 1234)) == "cache restored from RAM in 12 ms (1,234 tokens)"
    assert describe_restore(CacheRestored(1, "disk", 2.5, 0)) == "cache restored from disk in 2.5 s"
    assert describe_restore(CacheRestored(1, "recomputed", 0.5, 10)).startswith("cache recomputed from the messages")
    assert describe_restore(CacheRestored(1, "device", 0, 10, on_gpu=True)) == "cache was already on the GPU"
    assert describe_restore(CacheRestored(1, "empty", 0, 0)) == "no cache yet"


def test_running_out_of_memory_is_told_in_the_chat_and_the_new_strategy_kept(
        qtbot: Any, make_window: MakeWindow, monkeypatch: pytest.MonkeyPatch, send_and_wait: SendAndWait) -> None:
    win = make_window()
    chat_id = win.new_chat()
    send_and_wait(win, PROMPT)
    before = win.store.messages(chat_id)
    service = win.engine._worker.service  # the worker is idle between turns
    assert service is not None and service.pool is not None
    session = service.pool.session(chat_id)
    assert session is not None
    forward = session.forward_logits
    failures: list[int] = []

    def out_of_memory_once(ids: list[int], all_positions: bool = False) -> torch.Tensor:
        if not failures:
            failures.append(len(ids))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(ids, all_positions)

    monkeypatch.setattr(session, "forward_logits", out_of_memory_once)
    send_and_wait(win, "Now a question that runs out of memory.")
    assert failures
    assert win.store.chat(chat_id).settings.cache.strategy == "quantized"  # kept for the next turns
    [notice, *_rest] = win.controller.runtime(chat_id).notices
    assert notice.kind == "info" and "Memory ran out" in notice.text and "quantized" in notice.text
    msgs = win.store.messages(chat_id)
    assert msgs[:2] == before
    assert [(m.role, m.status) for m in msgs[2:]] == [("user", "done"), ("assistant", "done")]
    assert win.lossy_badge.isVisible()
    send_and_wait(win, "And the next one?")  # the chat goes on with its new cache
    assert win.store.messages(chat_id)[-1].status == "done"


def test_a_turn_stopped_before_it_starts_is_answered_and_forgotten(qtbot: Any, make_window: MakeWindow,
                                                                   gate: ForwardGate) -> None:
    """Stop on a message still queued behind another chat's reply: it is never generated, and the
    window keeps nothing of that turn once it is answered (nothing piles up over a long session).
    The other chat's reply is held mid-way (tests/tiny.py ForwardGate), so the message is queued
    however fast the machine is."""
    win = make_window(loader=lambda: gate.attach(tiny_loaded_model()), sampling=LONG)
    busy = win.new_chat()
    gate.hold_after(4)  # the prompt's pass and a few tokens
    win.send("A long story please")
    qtbot.waitUntil(lambda: gate.held, timeout=TURN_TIMEOUT_MS)
    assert busy is not None
    queued = win.new_chat()
    win.send("Meanwhile, in another chat")
    assert win.controller.runtime(queued).state == "queued" and win.engine.pending_turns() == 2
    qtbot.mouseClick(win.composer.button, Qt.MouseButton.LeftButton)  # Stop, on the queued chat
    with qtbot.waitSignals([win.controller.turn_finished, win.controller.turn_finished], timeout=TURN_TIMEOUT_MS):
        win.controller.stop(busy)
        gate.open()
    assert [m.role for m in win.store.messages(queued)] == ["user"]  # never answered
    assert win.controller.runtime(queued).notices[0].text == "Stopped before the first token."
    assert win.engine.pending_turns() == 0
    assert win.store.messages(busy)[-1].status == "stopped"
