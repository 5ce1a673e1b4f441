"""Many conversations under one memory budget: idle caches move to RAM, disk or nowhere, and
come back so that the next turn answers exactly as a from-scratch run (tiny random model)."""

from __future__ import annotations

import copy

import pytest

from engine import caches
from engine.pool import CachePool
from engine.sampling import SamplingSettings
from engine.session import ChatSession, SessionSettings
from engine.snapshots import SnapshotStore

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=8, repetition_penalty=1.0)


def new_chat(lm, i: int) -> ChatSession:
    session = ChatSession(lm, SessionSettings(sampling=GREEDY))
    session.send(f"conversation {i}: " + "history " * 30)
    return session


def test_budget_holds_and_every_chat_resumes_correctly(tiny_lm, tmp_path) -> None:
    one = caches.cache_bytes(new_chat(tiny_lm, 0).cache)
    pool = CachePool(tiny_lm, device_budget=3 * one + one // 2, host_budget=2 * one + one // 2,
                     snapshots=SnapshotStore(tmp_path))
    try:
        sessions = {}
        for i in range(10):
            key = f"c{i}"
            sessions[key] = new_chat(tiny_lm, i)
            pool.add(key, sessions[key])
            pool.activate(key)
            pool.rebalance(wait=True)
            assert pool.bytes_in("device") <= pool.device_budget + one  # the active chat may grow past it
            assert pool.bytes_in("ram") <= pool.host_budget
        tiers = {pool.tier(k) for k in sessions}
        assert {"device", "ram", "disk"} <= tiers
        sources = set()
        for key, session in reversed(sessions.items()):  # most recent first: device, then ram, then disk
            restore = pool.activate(key)
            sources.add(restore.source)
            reused_before = len(session.cached_ids)
            result = session.send("and a follow-up")
            assert result.stats.reused_tokens == reused_before > 0
            fresh = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY))
            fresh.messages = copy.deepcopy(session.messages[:-1])
            assert fresh.generate().reply == result.reply
            pool.rebalance(wait=True)
        assert {"device", "ram", "disk"} <= sources
    finally:
        pool.close()


def test_tiers_follow_recency_ram_holds_the_most_recent_idle_chats(tiny_lm, tmp_path) -> None:
    """Least recently used first: the newest idle chats are in RAM, the older ones on disk (not
    the first chats to have gone idle, which would stay in RAM forever)."""
    one = caches.cache_bytes(new_chat(tiny_lm, 0).cache)
    pool = CachePool(tiny_lm, device_budget=2 * one + one // 2, host_budget=2 * one + one // 2,
                     snapshots=SnapshotStore(tmp_path))
    try:
        keys = [f"c{i}" for i in range(8)]
        for i, key in enumerate(keys):
            pool.add(key, new_chat(tiny_lm, i))
            pool.activate(key)
            pool.rebalance(wait=True)
        tiers = [pool.tier(k) for k in keys]
        assert tiers == ["disk"] * 4 + ["ram"] * 2 + ["device"] * 2, tiers  # device: the active chat + one
    finally:
        pool.close()


def test_without_snapshots_idle_caches_are_dropped_and_recomputed(tiny_lm) -> None:
    one = caches.cache_bytes(new_chat(tiny_lm, 0).cache)
    pool = CachePool(tiny_lm, device_budget=one + one // 2, host_budget=0)
    try:
        a, b = new_chat(tiny_lm, 1), new_chat(tiny_lm, 2)
        pool.add("a", a)
        pool.activate("a")
        pool.add("b", b)
        pool.activate("b")
        pool.rebalance(wait=True)
        assert pool.tier("a") == "none"
        restore = pool.activate("a")
        assert restore.source == "recomputed" and restore.tokens > 0
        assert a.send("again").stats.reused_tokens == restore.tokens
    finally:
        pool.close()


def test_moving_a_cache_moves_every_tensor_it_holds_quantized_blocks_included(tiny_lm) -> None:
    """Idle caches leave the GPU for RAM: nothing of them may stay behind, whatever the strategy
    (a "meta" device stands in for the other device on a CPU-only machine)."""
    import torch

    from engine.caches import CacheSpec
    from engine.caches.hqq_blocks import HQQBlock

    specs = [CacheSpec(), CacheSpec("quantized", residual=32, q_group_size=32),
             CacheSpec("sink-quantized", sink_tokens=4, window=96, residual=32, q_group_size=32)]
    if caches.backend_availability()["hqq"] is None:
        specs += [spec.with_changes(backend="hqq") for spec in specs[1:]]
    def tensors(value: object) -> list[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, HQQBlock):
            return [value.packed, value.scale, value.zero]
        if isinstance(value, (list, tuple)):
            return [t for item in value for t in tensors(item)]
        return []

    for spec in specs:
        session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
        session.send("Tell me about moving caches around. " * 8)
        session.cache.to(torch.device("meta"))
        left = [f"{spec.strategy}/{spec.backend} layer {i}.{name}"
                for i, layer in enumerate(session.cache.layers) for name, value in vars(layer).items()
                if any(t.device.type != "meta" and t.numel() for t in tensors(value))]
        assert not left, left


def test_a_move_that_fails_costs_a_recompute_never_the_chat(tiny_lm, tmp_path, monkeypatch) -> None:
    one = caches.cache_bytes(new_chat(tiny_lm, 0).cache)
    store = SnapshotStore(tmp_path)

    def disk_full(key, session):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "save", disk_full)
    pool = CachePool(tiny_lm, device_budget=one + one // 2, host_budget=0, snapshots=store)
    try:
        a, b = new_chat(tiny_lm, 1), new_chat(tiny_lm, 2)
        pool.add("a", a)
        pool.activate("a")
        pool.add("b", b)
        pool.activate("b")
        pool.rebalance(wait=True)
        assert pool.tier("a") == "none" and a.cache is None  # could not be saved: dropped, not stuck
        restore = pool.activate("a")
        assert restore.source == "recomputed"
        result = a.send("and a follow-up")
        assert result.stats.error is None and result.stats.reused_tokens > 0
        pool.remove("a")
    finally:
        pool.close()


def test_warming_that_fails_still_counts_the_cache_on_the_device(tiny_lm) -> None:
    pool = CachePool(tiny_lm, device_budget=10**9, host_budget=0)
    try:
        a = new_chat(tiny_lm, 1)
        pool.add("a", a, tier="disk")  # nothing on disk: activating recomputes

        def fail() -> None:
            a.cache = caches.build_cache(a.settings.cache, tiny_lm.config)
            raise RuntimeError("cancelled while warming")

        a.warm = fail
        with pytest.raises(RuntimeError):
            pool.activate("a")
        assert pool.entries["a"].tier == "device"
    finally:
        pool.close()


def test_a_split_model_counts_each_layer_where_it_runs(tiny_lm, tmp_path) -> None:
    """Layers split between GPU and CPU (engine/layer_split.py) keep their KV where they run: an active cache's
    GPU layers count against the device (GPU) budget, its other layers against the host budget, and only
    the GPU part leaves when an idle chat moves to RAM. (Simulated here: which layers 'run on the GPU' is
    the pool's `gpu_layers`, the accounting does not depend on where the tensors are.)"""
    from engine.layer_split import bytes_on_gpu

    layers = len(new_chat(tiny_lm, 0).cache.layers)
    assert layers >= 2
    gpu = frozenset(range(layers // 2, layers))  # the last layers on the GPU, as a split places them
    pool = CachePool(tiny_lm, device_budget=1 << 40, host_budget=1 << 40, snapshots=SnapshotStore(tmp_path))
    pool.gpu_layers, pool.gpu_device = gpu, "cpu"  # the "GPU" layers' tensors stay on the CPU here
    try:
        chats = {}
        for i in range(3):
            chats[i] = new_chat(tiny_lm, i)
            pool.add(i, chats[i])
            pool.activate(i)
        pool.rebalance(wait=True)
        totals = {i: caches.cache_bytes(s.cache) for i, s in chats.items()}
        on_gpu = {i: bytes_on_gpu(s.cache, gpu) for i, s in chats.items()}
        assert all(0 < on_gpu[i] < totals[i] for i in chats)
        device, host = pool.held_bytes()
        assert device == sum(on_gpu.values()) and host == sum(totals.values()) - device

        # The GPU holds two chats' GPU layers: the least recently used idle chat leaves for RAM, whole.
        pool.device_budget = on_gpu[1] + on_gpu[2]
        pool.rebalance(wait=True)
        assert [pool.tier(i) for i in chats] == ["ram", "device", "device"]
        device, host = pool.held_bytes()
        assert device == on_gpu[1] + on_gpu[2]
        assert host == totals[0] + (totals[1] - on_gpu[1]) + (totals[2] - on_gpu[2])

        # Back from RAM, each layer goes to the device it runs on (state-space layers too, which read their state
        # before writing it): recorded, not moved, with the "GPU" named meta.
        moved: dict[int, str] = {}
        for i, layer in enumerate(chats[0].cache.layers):
            layer.to = lambda device, pin_memory=False, i=i: moved.__setitem__(i, str(device))
        pool.gpu_device = "meta"
        pool.activate(0)
        pool.gpu_device = "cpu"
        assert moved == {i: "meta" if i in gpu else "cpu" for i in range(layers)}
        for layer in chats[0].cache.layers:
            del layer.to
        for key in (0, 1, 2):  # as it was: least recently used first, chat 2 active
            pool.activate(key)
        pool.device_budget = on_gpu[1] + on_gpu[2]
        pool.rebalance(wait=True)
        assert [pool.tier(i) for i in chats] == ["ram", "device", "device"]

        # RAM holds only the active chat's CPU layers: the chat in RAM, and the idle chat still holding CPU
        # layers, go to disk; the active one stays.
        pool.host_budget = totals[2] - on_gpu[2]
        pool.rebalance(wait=True)
        assert [pool.tier(i) for i in chats] == ["disk", "disk", "device"]
        assert pool.held_bytes() == (on_gpu[2], totals[2] - on_gpu[2])

        # and each comes back to answer as a fresh run would
        for key in (0, 1):
            pool.activate(key)
            reused = len(chats[key].cached_ids)
            result = chats[key].send("and a follow-up")
            assert result.stats.reused_tokens == reused > 0
            fresh = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY))
            fresh.messages = copy.deepcopy(chats[key].messages[:-1])
            assert fresh.generate().reply == result.reply
    finally:
        pool.close()


def test_a_model_that_is_not_split_counts_a_cache_on_the_device_whole(tiny_lm) -> None:
    pool = CachePool(tiny_lm, device_budget=1 << 40, host_budget=1 << 40)
    try:
        session = new_chat(tiny_lm, 0)
        pool.add(0, session)
        pool.activate(0)
        assert pool.gpu_layers == frozenset()
        assert pool.held_bytes() == (caches.cache_bytes(session.cache), 0)
    finally:
        pool.close()
