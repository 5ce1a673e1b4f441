"""Every chat keeps its cache under one memory budget: switching back to a chat brings its cache
back (from RAM or disk) and the next reply reuses it; after a restart a chat resumes from its
snapshot; a damaged snapshot only costs a recompute; running out of memory mid-reply switches
the chat to a leaner cache and answers anyway (tiny random model, driven through the window).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PySide6.QtCore import QCoreApplication, QEvent

from app.config import AppConfig
from app.main_window import MainWindow
from app.protocol import Budgets, CacheRestored
from engine import paths
from engine.store import ChatStore
from tests.tiny import tiny_loaded_model

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")

SHORT = {"temperature": 0.0, "max_new_tokens": 12, "repetition_penalty": 1.0}
TIMEOUT = 60_000
PROMPT = "Tell me how a key-value cache speeds up a chat with a language model, please. "

MakeWindow = Callable[..., MainWindow]


@pytest.fixture
def make_window(qtbot: Any) -> Iterator[MakeWindow]:
    """Windows on this test's data folder (a second one is a restart); closing joins the worker."""
    made: list[tuple[MainWindow, ChatStore]] = []

    def make() -> MainWindow:
        store = ChatStore()
        win = MainWindow(store, AppConfig(default_sampling=dict(SHORT)), lambda: tiny_loaded_model(seed=0),
                         save_settings=False)
        win.show()
        made.append((win, store))
        with qtbot.waitSignal(win.engine.model_ready, timeout=TIMEOUT):
            win.start_engine()
        return win

    yield make
    for win, store in made:
        win.close()
        assert not win.engine._thread.isRunning()
        win.deleteLater()
        store.close()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def send_and_wait(qtbot: Any, win: MainWindow, text: str) -> dict[str, Any]:
    """Send in the current chat; returns the reply's stats (TurnStats plus where the cache came from)."""
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TIMEOUT):
        win.send(text)
    assert win.current_chat is not None
    reply = win.store.messages(win.current_chat)[-1]
    assert reply.role == "assistant" and reply.status == "done" and reply.stats is not None
    return reply.stats


def open_and_wait(qtbot: Any, win: MainWindow, chat_id: int) -> CacheRestored:
    """Open a chat the way a click in the sidebar does; returns where its cache came back from."""
    seen: list[CacheRestored] = []
    with qtbot.waitSignal(win.engine.cache_restored, timeout=TIMEOUT,
                          check_params_cb=lambda e: e.chat_id == chat_id) as blocker:
        win.select_chat(chat_id)
    seen.append(blocker.args[0])
    return seen[0]


def place(win: MainWindow, chat_id: int) -> str:
    return next(e.cache_place for e in win.sidebar.entries() if e.chat_id == chat_id)


def snapshot(chat_id: int) -> Path:
    return paths.data_dir() / "snapshots" / f"{chat_id}.safetensors"


def test_switching_back_restores_each_chat_from_ram_or_disk_and_the_reply_reuses_it(
        qtbot: Any, make_window: MakeWindow) -> None:
    win = make_window()
    chats = [win.new_chat()]
    send_and_wait(qtbot, win, PROMPT)
    state = win.controller.runtime(chats[0]).cache
    assert state is not None and state.bytes > 0
    room = state.bytes * 3 // 2  # about one chat on the device and one in RAM; the rest go to disk
    win.engine.set_budgets(Budgets(device=room, host=room, disk=64 * 1024**2))
    for _ in range(2):
        chats.append(win.new_chat())
        send_and_wait(qtbot, win, PROMPT)
    # least recently used first: the oldest chat went on to disk, the newer idle one is in RAM
    qtbot.waitUntil(lambda: [place(win, c) for c in chats] == ["disk", "ram", "ram"], timeout=TIMEOUT)
    # a CPU-only machine: the active chat's "device" is RAM, and the badge says so
    assert win.controller.runtime(chats[2]).cache.where == "ram"  # type: ignore[union-attr]

    sources = {}
    for chat_id in (chats[1], chats[2], chats[0]):  # back to the recent ones first, then the old one
        restore = open_and_wait(qtbot, win, chat_id)
        sources[chat_id] = restore.source
        assert restore.tokens > 0
        stats = send_and_wait(qtbot, win, "And a follow-up?")
        assert stats["reused_tokens"] > len(PROMPT)  # the whole first exchange came from the cache
        assert stats["restore"]["source"] == restore.source  # told with the reply it served
        if chat_id == chats[1]:
            assert "cache restored from RAM in" in win.chat_view.message_widgets[-1].toolTip()
            assert "cache restored from RAM in" in win.meters.turn_label.toolTip()
    assert sources == {chats[1]: "ram", chats[2]: "ram", chats[0]: "disk"}
    assert "cache restored from disk in" in win.chat_view.message_widgets[-1].toolTip()


def test_a_chat_resumes_from_its_snapshot_after_a_restart(qtbot: Any, make_window: MakeWindow) -> None:
    win = make_window()
    old = win.new_chat()
    send_and_wait(qtbot, win, PROMPT)
    other = win.new_chat()
    send_and_wait(qtbot, win, "Another chat.")
    expected = win.store.messages(old)
    win.close()  # quitting saves every chat's cache
    assert snapshot(old).is_file() and snapshot(other).is_file()

    again = make_window()  # same data folder, same model
    assert again.current_chat == other
    qtbot.waitUntil(lambda: place(again, old) == "disk", timeout=TIMEOUT)  # known before it is opened
    restore = open_and_wait(qtbot, again, old)
    assert restore.source == "disk" and restore.tokens > len(PROMPT)
    assert "Cache restored from disk in" in again.statusBar().currentMessage()
    stats = send_and_wait(qtbot, again, "Do you still remember?")
    assert stats["restore"]["source"] == "disk"
    assert stats["reused_tokens"] > len(PROMPT)
    assert again.store.messages(old)[:2] == expected
    assert "cache restored from disk" in again.chat_view.message_widgets[-1].toolTip()

    again.delete_chat(other)  # a deleted chat's snapshot goes with it
    qtbot.waitUntil(lambda: not snapshot(other).exists(), timeout=TIMEOUT)


def test_a_damaged_snapshot_is_removed_and_the_chat_recomputes(qtbot: Any, make_window: MakeWindow) -> None:
    win = make_window()
    chat_id = win.new_chat()
    send_and_wait(qtbot, win, PROMPT)
    win.new_chat()  # so that the damaged chat is not the one opened at start
    win.close()
    snapshot(chat_id).write_bytes(b"\x00garbage, not a safetensors file" * 50)

    again = make_window()
    restore = open_and_wait(qtbot, again, chat_id)
    assert restore.source == "recomputed" and restore.tokens > len(PROMPT)
    assert not snapshot(chat_id).exists()
    stats = send_and_wait(qtbot, again, "Still there?")
    assert stats["reused_tokens"] > len(PROMPT)
    assert [m.role for m in again.store.messages(chat_id)] == ["user", "assistant", "user", "assistant"]


def test_running_out_of_memory_mid_reply_switches_to_a_quantized_cache_and_answers(
        qtbot: Any, make_window: MakeWindow, monkeypatch: pytest.MonkeyPatch) -> None:
    win = make_window()
    chat_id = win.new_chat()
    send_and_wait(qtbot, win, PROMPT)
    before = win.store.messages(chat_id)
    session = win.engine._worker.service.pool.session(chat_id)  # the worker is idle between turns
    forward = session.forward_logits
    failures: list[int] = []

    def out_of_memory_once(ids: list[int], all_positions: bool = False) -> torch.Tensor:
        if not failures:
            failures.append(len(ids))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(ids, all_positions)

    monkeypatch.setattr(session, "forward_logits", out_of_memory_once)
    stats = send_and_wait(qtbot, win, "Now a question that runs out of memory.")
    assert failures and stats["finish_reason"] in ("stop", "length")
    assert win.store.chat(chat_id).settings.cache.strategy == "quantized"  # kept for the next turns
    notice = win.controller.runtime(chat_id).notices[0]
    assert notice.kind == "info" and "Memory ran out" in notice.text and "quantized" in notice.text
    msgs = win.store.messages(chat_id)
    assert msgs[:2] == before
    assert [(m.role, m.status) for m in msgs[2:]] == [("user", "done"), ("assistant", "done")]
    assert msgs[2].content == "Now a question that runs out of memory."
    assert win.lossy_badge.isVisible()
    send_and_wait(qtbot, win, "And the next one?")  # the chat goes on with its new cache


def test_automatic_budgets_follow_the_machine_and_settings_override_them() -> None:
    from engine.memory import simulated_hardware
    from engine.reports import GIB, MIB
    from engine.service import resolve_budgets

    gpu = simulated_hardware(vram_gib=24, ram_gib=64)
    cpu = simulated_hardware(vram_gib=None, ram_gib=16)
    # automatic: the advisor's free figure on the device; a quarter of the RAM next to a GPU
    assert resolve_budgets(Budgets(), gpu, advised_kv=20 * GIB) == (20 * GIB, 16 * GIB)
    # without a GPU the device budget already is RAM: only a small share more for idle chats
    assert resolve_budgets(Budgets(), cpu, advised_kv=12 * GIB) == (12 * GIB, 512 * MIB)
    assert resolve_budgets(Budgets(), cpu, advised_kv=None)[0] == 8 * GIB  # no advice: half of what is free
    assert resolve_budgets(Budgets(device=3 * GIB, host=0), gpu, advised_kv=20 * GIB) == (3 * GIB, 0)
