"""One engine service for every front end: the memory pool and its budgets, snapshots on close,
what `auto` means and the out-of-memory fallback behave the same whatever drives them (the tiny
random model, driven the way the window's worker and the terminal chat drive it)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from engine import paths
from engine.reports import GIB, MIB, OUT_OF_MEMORY, Budgets
from engine.service import ChatService, LoadInterrupted, resolve_budgets
from engine.specs import AUTO, CacheSpec, quantization_defaults
from tests.conftest import Front

PROMPT = "Tell me how a key-value cache speeds up a chat with a language model, please. "
MakeFront = Callable[..., Front]


def test_switching_back_restores_each_chat_from_ram_or_disk_and_the_reply_reuses_it(make_front: MakeFront) -> None:
    front = make_front()
    chats = [front.new_chat()]
    front.say(chats[0], PROMPT)
    one = front.service.cache_state(chats[0]).bytes
    assert one > 0
    room = one * 3 // 2  # about one chat on the device and one in RAM; the rest go to disk
    front.service.set_budgets(Budgets(device=room, host=room, disk=64 * MIB))
    for i in range(2):
        chats.append(front.new_chat())
        # each its own words: identical chats would start from a copy of one another (engine prefix sharing)
        front.say(chats[-1], f"{i}. {PROMPT}")
    front.service.pool.rebalance(wait=True)  # type: ignore[union-attr]
    # least recently used first: the oldest chat went on to disk, the newer idle one is in RAM;
    # on a CPU-only machine the active chat's "device" is RAM too
    assert [front.where(c) for c in chats] == ["disk", "ram", "ram"]
    assert {s.chat_id: s.where for s in front.states}[chats[0]] == "disk"  # and it said so

    sources = {}
    for chat_id in (chats[1], chats[2], chats[0]):  # back to the recent ones first, then the old one
        restore = front.open(chat_id)
        sources[chat_id] = restore.source
        assert restore.tokens > 0
        done = front.say(chat_id, "And a follow-up?")
        assert done.stats.reused_tokens > len(PROMPT)  # the whole first exchange came from the cache
        assert done.restore.source == restore.source  # told with the reply it served
    assert sources == {chats[1]: "ram", chats[2]: "ram", chats[0]: "disk"}


def test_a_chat_resumes_from_its_snapshot_after_a_restart(make_front: MakeFront) -> None:
    front = make_front()
    old, other = front.new_chat(), front.new_chat()
    front.say(old, PROMPT)
    front.say(other, "Another chat.")
    front.service.close(save=True)  # quitting saves every chat's cache
    snapshots = paths.data_dir() / "snapshots"
    assert (snapshots / f"{old}.safetensors").is_file() and (snapshots / f"{other}.safetensors").is_file()

    again = make_front()  # same data folder, same model
    announced = {s.chat_id: (s.where, s.tokens) for s in again.states}
    assert announced[old][0] == "disk" and announced[old][1] > len(PROMPT)  # known before it is opened
    restore = again.open(old)
    assert restore.source == "disk" and restore.tokens > len(PROMPT)
    done = again.say(old, "Do you still remember?")
    assert done.restore.source == "disk" and done.stats.reused_tokens > len(PROMPT)

    again.service.forget(other)  # a deleted chat's snapshot goes with it
    assert not (snapshots / f"{other}.safetensors").exists()


def test_a_damaged_snapshot_is_removed_and_the_chat_recomputes(make_front: MakeFront) -> None:
    front = make_front()
    chat_id = front.new_chat()
    front.say(chat_id, PROMPT)
    front.service.close(save=True)
    snapshot = paths.data_dir() / "snapshots" / f"{chat_id}.safetensors"
    snapshot.write_bytes(b"\x00garbage, not a safetensors file" * 50)

    again = make_front()
    restore = again.open(chat_id)
    assert restore.source == "recomputed" and restore.tokens > len(PROMPT)
    assert not snapshot.exists()
    assert again.say(chat_id, "Still there?").stats.reused_tokens > len(PROMPT)


@pytest.mark.parametrize("before, after", [("dynamic", "quantized"), ("quantized", "sink")])
def test_running_out_of_memory_mid_reply_switches_to_a_leaner_cache_and_answers(
        make_front: MakeFront, monkeypatch: pytest.MonkeyPatch, before: str, after: str) -> None:
    front = make_front()
    spec = CacheSpec(before, **quantization_defaults(4)) if before == "quantized" else CacheSpec(before)
    chat_id = front.new_chat(cache=spec)
    front.say(chat_id, PROMPT)
    session = front.service.pool.session(chat_id)  # type: ignore[union-attr]
    forward = session.forward_logits
    failures: list[int] = []

    def out_of_memory_once(ids: list[int], all_positions: bool = False) -> torch.Tensor:
        if not failures:
            failures.append(len(ids))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(ids, all_positions)

    monkeypatch.setattr(session, "forward_logits", out_of_memory_once)
    retries: list[str] = []
    done = front.say(chat_id, "Now a question that runs out of memory.", on_retry=retries.append)
    assert failures and done.finish_reason in ("stop", "length") and done.error is None
    assert done.cache is not None and done.cache.strategy == after  # to keep with the chat
    assert retries == [done.notice] and "Memory ran out" in done.notice
    assert front.say(chat_id, "And the next one?").stats.error is None  # the chat goes on with its new cache


def test_running_out_of_memory_moves_the_other_chats_caches_off_the_device_and_each_resumes_as_before(
        make_front: MakeFront, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chats, one of which runs out of memory mid-reply: every other chat's cache leaves the device
    (for RAM, and on to disk beyond the RAM budget, least recently used first), the chat that ran out keeps
    its place, and each other chat then answers its next message as it would have without the move (the
    same turns in a plain session that never ran out give the replies)."""
    from engine.session import ChatSession, SessionSettings

    front = make_front()
    others = [front.new_chat() for _ in range(3)]
    for i, chat_id in enumerate(others):
        front.say(chat_id, f"{i}. {PROMPT}")  # each its own words: no chat starts from a copy of another
    one = max(front.service.cache_state(c).bytes for c in others)
    # the device holds them all; RAM only one idle chat; the rest of them go to disk when they leave the device
    front.service.set_budgets(Budgets(device=64 * MIB, host=one * 3 // 2, disk=64 * MIB))
    pool = front.service.pool
    assert pool is not None
    starving = front.new_chat()
    front.say(starving, PROMPT)
    assert [pool.tier(c) for c in (*others, starving)] == ["device"] * 4

    session = pool.session(starving)
    assert session is not None
    forward = session.forward_logits
    failures: list[int] = []

    def out_of_memory_once(ids: list[int], all_positions: bool = False) -> torch.Tensor:
        if not failures:
            failures.append(len(ids))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(ids, all_positions)

    monkeypatch.setattr(session, "forward_logits", out_of_memory_once)
    done = front.say(starving, "Now a question that runs out of memory.")
    assert failures and done.error is None and "moved the other chats' caches" in (done.notice or "")
    assert pool.tier(starving) == "device"
    assert [pool.tier(c) for c in others] == ["disk", "disk", "ram"]  # least recently used first
    told = {s.chat_id: s.where for s in front.states}
    assert [told[c] for c in others[:2]] == ["disk", "disk"]

    for i, chat_id in enumerate(others):
        plain = ChatSession(front.lm, SessionSettings(sampling=front.store.chat(chat_id).settings.sampling))
        assert plain.send(f"{i}. {PROMPT}").reply == front.store.messages(chat_id)[1].content
        expected = plain.send("And a follow-up?").reply
        where = pool.tier(chat_id)
        resumed = front.say(chat_id, "And a follow-up?")
        assert resumed.restore.source == where and resumed.stats.reused_tokens > len(PROMPT)
        assert resumed.reply == expected, chat_id


def test_the_engine_classifies_a_failure_and_counts_the_users_message(make_front: MakeFront, tiny_lm) -> None:
    front = make_front()
    chat_id = front.new_chat(cache=CacheSpec("sink", window=256))  # nothing leaner to fall back to
    front.say(chat_id, PROMPT)
    session = front.service.pool.session(chat_id)  # type: ignore[union-attr]

    def out_of_memory(ids: list[int], all_positions: bool = False) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GiB")

    session.forward_logits = out_of_memory  # type: ignore[method-assign]
    done = front.say(chat_id, "A question of nine words for the token count.")
    assert done.finish_reason == "error" and done.error_kind == OUT_OF_MEMORY
    assert done.stats.user_tokens == len(tiny_lm.tokenizer("A question of nine words for the token count.",
                                                           add_special_tokens=False)["input_ids"])


def test_a_turn_stopped_before_it_starts_builds_nothing(make_front: MakeFront) -> None:
    front = make_front()
    chat_id = front.new_chat()
    stop = threading.Event()
    stop.set()
    done = front.say(chat_id, PROMPT, stop=stop)
    assert done.finish_reason == "cancelled" and not done.has_reply
    assert front.service.pool.session(chat_id) is None  # type: ignore[union-attr]


def test_auto_builds_the_strategy_the_advisor_chose_here(make_front: MakeFront) -> None:
    front = make_front()
    assert front.service.model is not None
    chosen = front.service.model.auto_cache
    assert chosen.strategy != AUTO and front.service.model.auto_reason.startswith("auto means")
    chat_id = front.new_chat(cache=CacheSpec(AUTO))
    front.say(chat_id, PROMPT)
    assert front.service.pool.session(chat_id).settings.cache == chosen  # type: ignore[union-attr]


def test_switching_a_chats_strategy_converts_its_cache_or_says_why_not(make_front: MakeFront) -> None:
    front = make_front()
    chat_id = front.new_chat()
    front.say(chat_id, PROMPT)
    settings = front.store.chat(chat_id).settings
    sink = front.service.change_cache(chat_id, front.store.messages(chat_id),
                                      settings.__class__(settings.system_prompt, settings.sampling,
                                                         CacheSpec("sink", window=512)))
    assert sink.ok and sink.how == "converted" and sink.tokens > len(PROMPT)
    bad = front.service.change_cache(chat_id, front.store.messages(chat_id),
                                     settings.__class__(cache=CacheSpec("sink", sink_tokens=8, window=4)))
    assert not bad.ok and "window" in (bad.error or "")


def test_a_load_interrupted_by_closing_stops_at_its_next_step() -> None:
    service = ChatService()
    steps: list[str] = []

    def loader(progress: Callable[[str], None]) -> object:
        for i in range(1000):
            progress(f"step {i}")
            steps.append(f"step {i}")
            if i == 2:
                service.interrupt()  # the window closes meanwhile
        raise AssertionError("the load went on to its end")

    with pytest.raises(LoadInterrupted):
        service.load_model(loader)  # type: ignore[arg-type]
    assert len(steps) == 3 and service.model is None


def test_automatic_budgets_follow_the_machine_and_settings_override_them() -> None:
    from engine.memory import simulated_hardware

    gpu = simulated_hardware(vram_gib=24, ram_gib=64)
    cpu = simulated_hardware(vram_gib=None, ram_gib=16)
    # automatic: the advisor's free figure on the device; a quarter of the RAM next to a GPU
    assert resolve_budgets(Budgets(), gpu, advised_kv=20 * GIB) == (20 * GIB, 16 * GIB)
    # without a GPU the device budget already is RAM: only a small share more for idle chats
    assert resolve_budgets(Budgets(), cpu, advised_kv=12 * GIB) == (12 * GIB, 512 * MIB)
    assert resolve_budgets(Budgets(), cpu, advised_kv=None)[0] == 8 * GIB  # no advice: half of what is free
    assert resolve_budgets(Budgets(device=3 * GIB, host=0), gpu, advised_kv=20 * GIB) == (3 * GIB, 0)


def test_a_new_chats_first_reply_prefills_its_whole_prompt_and_restores_nothing(make_front: MakeFront) -> None:
    """The first turn's time to first token includes reading the prompt; nothing was "recomputed"."""
    front = make_front()
    chat_id = front.new_chat()
    done = front.say(chat_id, PROMPT)
    assert done.restore.source == "empty"
    assert done.stats.reused_tokens == 0 and done.stats.prefilled_tokens == done.stats.prompt_tokens


def test_a_split_models_ready_chat_reports_the_kv_it_holds_on_the_gpu(make_front: MakeFront) -> None:
    """A model split between GPU and CPU (simulated: the pool is told which layers run on the GPU) reports a
    ready chat as on the GPU with the bytes of its GPU layers, and a chat moved to RAM with none there."""
    front = make_front()
    pool = front.service.pool
    assert pool is not None
    first = front.new_chat()
    front.say(first, PROMPT)
    layers = len(pool.session(first).cache.layers)  # type: ignore[union-attr]
    pool.gpu_layers, pool.gpu_device = frozenset(range(layers // 2, layers)), "cpu"  # tensors stay on the CPU
    state = front.service.cache_state(first)
    assert state.where == "gpu" and 0 < state.gpu_bytes < state.bytes
    front.service.set_budgets(Budgets(device=state.gpu_bytes * 3 // 2, host=64 * MIB, disk=64 * MIB))
    second = front.new_chat()
    front.say(second, f"Another. {PROMPT}")
    pool.rebalance(wait=True)
    moved = front.service.cache_state(first)
    assert moved.where == "ram" and moved.gpu_bytes == 0 and moved.bytes == state.bytes
    assert front.service.cache_state(second).where == "gpu"


def test_a_split_models_advice_and_budgets_come_from_the_gpu_not_the_cpu(
        tiny_lm, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split model takes its inputs on the CPU (`lm.device`), but its KV budget is the GPU's memory: the advisor
    and the budgets read the GPU's (simulated here: 8 GiB of VRAM, 32 GiB of RAM) and the status bar gets what the
    GPU holds of the weights."""
    import dataclasses

    from engine import layer_split, memory
    from engine.memory import simulated_hardware

    asked: list[str] = []

    def read_hardware(device=None):  # noqa: ANN001, ANN202
        asked.append(str(device))
        return simulated_hardware(vram_gib=8, ram_gib=32) if str(device).startswith("cuda") else \
            simulated_hardware(vram_gib=None, ram_gib=32)

    monkeypatch.setattr(memory, "read_hardware", read_hardware)
    monkeypatch.setattr(layer_split, "gpu_placement", lambda model, layers: ("cuda:0", frozenset({layers - 1})))
    split = dataclasses.replace(tiny_lm, gpu_layers=1, layers=2)
    service = ChatService(budgets=Budgets(disk=0))
    try:
        info = service.load_model(lambda: split)
        assert asked and all(d == "cuda:0" for d in asked)
        assert info.gpu_device == "cuda:0" and info.gpu_weights_bytes == 0  # no tensor is really on a GPU here
        pool = service.pool
        assert pool is not None and pool.gpu_layers == frozenset({1})
        assert 0 < pool.device_budget <= 8 * GIB  # the advisor's KV room on the GPU
        assert pool.host_budget == 8 * GIB  # a quarter of the RAM next to a GPU, not a CPU machine's small share
    finally:
        service.close(save=False)
