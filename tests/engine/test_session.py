"""A conversation's cache is reused, checked and kept consistent (tiny random model)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from engine import caches
from engine.sampling import SamplingSettings
from engine.session import ChatSession, ContextOverflowError, Message, SessionSettings, common_prefix_length

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)


def make_session(lm, **kw) -> ChatSession:
    settings = SessionSettings(sampling=kw.pop("sampling", GREEDY), **kw)
    return ChatSession(lm, settings)


def assert_consistent(session: ChatSession) -> None:
    """The cache holds exactly as many tokens as the ids the session says it holds."""
    assert caches.seq_length(session.cache) == len(session.cached_ids)
    for layer in session.cache.layers:
        assert layer.get_seq_length() == len(session.cached_ids)


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2]) == 2


def test_follow_up_turn_prefills_only_new_tokens(tiny_lm) -> None:
    session = make_session(tiny_lm)
    first = session.send("Hello there, model.")
    assert first.stats.reused_tokens == 0
    assert first.stats.prefilled_tokens == first.stats.prompt_tokens
    history = len(session.cached_ids)
    second = session.send("Tell me more.")
    # Everything the cache held that the re-rendered prompt still starts with is reused.
    prompt = session.render_ids(session.messages[:-1])
    expected = min(common_prefix_length(prompt, session.cached_ids), history)
    assert second.stats.reused_tokens >= expected > 0
    assert second.stats.prefilled_tokens == second.stats.prompt_tokens - second.stats.reused_tokens
    assert_consistent(session)


def test_reused_cache_gives_same_logits_as_recomputing(tiny_lm) -> None:
    session = make_session(tiny_lm)
    session.send("First question about caches?")
    session.send("A second, longer question about how caches are reused?")
    session.messages.append(Message("user", "And a third one."))
    reused, logits = session.next_token_logits()
    assert reused > 0

    fresh = make_session(tiny_lm)
    fresh.messages = copy.deepcopy(session.messages)
    reused_fresh, logits_fresh = fresh.next_token_logits()
    assert reused_fresh == 0
    assert torch.max(torch.abs(logits - logits_fresh)).item() < 1e-4


def test_turns_with_and_without_reuse_give_identical_replies(tiny_lm) -> None:
    turns = ["one", "two two", "three three three", "four"]
    reuse = make_session(tiny_lm)
    baseline = make_session(tiny_lm, reuse=False)
    for text in turns:
        a = reuse.send(text)
        b = baseline.send(text)
        assert a.reply == b.reply
        assert b.stats.reused_tokens == 0
    assert reuse.messages == baseline.messages


def test_replies_keep_their_generated_ids_so_the_next_turn_reuses_all_history(tiny_lm) -> None:
    # Random byte-level replies often re-tokenise differently (invalid UTF-8 decodes to U+FFFD);
    # the session must still reuse everything it cached.
    session = make_session(tiny_lm, sampling=SamplingSettings(temperature=0.0, max_new_tokens=30))
    previous_cache = 0
    for text in ["first", "second", "third"]:
        result = session.send(text)
        assert result.stats.reused_tokens == previous_cache
        previous_cache = result.stats.cache_tokens


def test_messages_without_ids_fall_back_to_the_common_prefix(tiny_lm) -> None:
    session = make_session(tiny_lm)
    session.send("hello")
    session.messages[-1].token_ids = None  # e.g. a chat restored from disk
    result = session.send("again")
    prompt = session.render_ids(session.messages[:-1])
    assert result.stats.reused_tokens <= common_prefix_length(prompt, session.cached_ids)
    fresh = make_session(tiny_lm)
    fresh.messages = copy.deepcopy(session.messages[:-1])
    assert fresh.generate().reply == result.reply


def test_edit_crops_to_the_true_common_prefix_and_matches_a_fresh_run(tiny_lm) -> None:
    session = make_session(tiny_lm)
    for text in ["alpha", "beta beta", "gamma gamma gamma"]:
        session.send(text)
    old_ids = list(session.cached_ids)
    result = session.edit(2, "BETA edited")  # message 2 is the second user message
    new_prompt = session.render_ids(session.messages[:-1])
    assert result.stats.reused_tokens == min(common_prefix_length(old_ids, new_prompt), len(new_prompt) - 1)
    assert result.stats.reused_tokens < len(old_ids)
    assert_consistent(session)

    fresh = make_session(tiny_lm)
    fresh.messages = copy.deepcopy(session.messages[:-1])
    assert fresh.generate().reply == result.reply


def test_regenerate_replaces_the_last_reply(tiny_lm) -> None:
    session = make_session(tiny_lm, sampling=SamplingSettings(temperature=1.0, max_new_tokens=10, seed=1))
    session.send("hi")
    session.settings.sampling = SamplingSettings(temperature=1.0, max_new_tokens=10, seed=2)
    result = session.regenerate()
    assert [m.role for m in session.messages] == ["user", "assistant"]
    assert session.messages[-1].content == result.reply
    assert result.stats.reused_tokens == result.stats.prompt_tokens - 1
    assert_consistent(session)


def test_seeded_sampling_is_reproducible(tiny_lm) -> None:
    sampling = SamplingSettings(temperature=0.9, top_p=0.9, top_k=20, max_new_tokens=15, seed=42)
    a = make_session(tiny_lm, sampling=sampling).send("same")
    b = make_session(tiny_lm, sampling=sampling).send("same")
    assert a.reply == b.reply


def test_cancel_from_another_thread_stops_within_one_step(tiny_lm) -> None:
    session = make_session(tiny_lm, sampling=SamplingSettings(temperature=0.0, max_new_tokens=400))
    started = threading.Event()
    cancelled = threading.Event()
    seen_at_cancel: list[int] = []
    box = {}

    def on_delta(_text: str) -> None:
        started.set()
        cancelled.wait(60)  # hold the worker until the other thread has cancelled (a busy machine may take seconds)

    def worker() -> None:
        box["result"] = session.send("please go on for a long time", on_delta=on_delta)

    thread = threading.Thread(target=worker)
    thread.start()
    assert started.wait(10)
    seen_at_cancel.append(len(session.cached_ids))
    session.cancel()
    cancelled.set()
    thread.join(10)
    assert not thread.is_alive()
    result = box["result"]
    assert result.stats.finish_reason == "cancelled"
    # At most one more forward pass ran after cancel() returned.
    assert len(session.cached_ids) - seen_at_cancel[0] <= 1
    assert session.messages[-1].role == "assistant" and not session.messages[-1].complete
    assert_consistent(session)
    follow = session.send("still there?")
    assert follow.stats.finish_reason in ("stop", "length")
    assert follow.stats.reused_tokens > 0


@pytest.mark.parametrize("exc", [RuntimeError("boom"), torch.OutOfMemoryError("CUDA out of memory")])
def test_failure_mid_reply_leaves_cache_consistent(tiny_lm, monkeypatch, exc) -> None:
    session = make_session(tiny_lm)
    session.settings.speculative = "off"  # one forward pass per token: the 7th call falls mid-decode
    session.send("warm up the cache")
    real_forward = type(tiny_lm.model.model.layers[1]).forward
    calls = {"n": 0}

    def failing_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # mid-decode, in the second layer: the first layer already grew
            raise exc
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_lm.model.model.layers[1]), "forward", failing_forward)
    result = session.send("this reply will fail")
    assert result.stats.finish_reason == "error"
    assert type(exc).__name__ in (result.stats.error or "")
    assert_consistent(session)
    monkeypatch.undo()

    # The conversation goes on, and gives what a from-scratch run gives.
    result = session.send("and now?")
    fresh = make_session(tiny_lm)
    fresh.messages = copy.deepcopy(session.messages[:-1])
    assert fresh.generate().reply == result.reply


def test_context_overflow_is_reported_before_generating(tiny_lm) -> None:
    session = make_session(tiny_lm)
    with pytest.raises(ContextOverflowError, match="1024 tokens"):
        session.send("x" * 1100)
    assert session.cache is None or session.cached_ids == []


def test_reply_never_exceeds_the_context(tiny_lm) -> None:
    session = make_session(tiny_lm, sampling=SamplingSettings(temperature=0.0, max_new_tokens=500))
    result = session.send("y" * 850)
    assert result.stats.prompt_tokens + result.stats.generated_tokens <= 1024


def test_no_reuse_recomputes_every_turn(tiny_lm) -> None:
    session = make_session(tiny_lm, reuse=False)
    session.send("a")
    result = session.send("b")
    assert result.stats.reused_tokens == 0
    assert result.stats.cache_tokens == len(session.cached_ids)


def test_overflow_stop_refuses_before_generating_and_keeps_the_message(tiny_lm) -> None:
    session = make_session(tiny_lm, overflow="stop")
    with pytest.raises(ContextOverflowError, match="overflow policy"):
        session.send("z" * 1000)
    assert [m.role for m in session.messages] == ["user"]  # kept, so the user can choose a policy and retry


def fill_until_overflow(session: ChatSession) -> None:
    for i in range(12):
        session.messages.append(Message("user", f"question {i} " + "q" * 60))
        session.messages.append(Message("assistant", f"answer {i} " + "a" * 60))


def test_overflow_truncate_middle_keeps_first_exchange_and_hides_old_turns(tiny_lm) -> None:
    session = make_session(tiny_lm, overflow="truncate-middle")
    fill_until_overflow(session)
    result = session.send("the newest question")
    assert result.stats.finish_reason in ("stop", "length")
    assert result.stats.overflow_action and result.stats.hidden_messages > 0
    seen = session.model_messages()
    assert seen[:2] == session.messages[:2]  # first exchange kept
    assert seen[-2].content == "the newest question"
    assert len(session.messages) == 12 * 2 + 2  # nothing deleted from the chat
    # The next turn no longer fits either: two more messages leave the view, and the cache is kept up
    # to where the old and the new view part (the first exchange and the start of the next turn).
    cached = list(session.cached_ids)
    follow = session.send("and another")
    assert follow.stats.overflow_action == "left 2 older messages out of the model's view"
    assert follow.stats.hidden_messages == result.stats.hidden_messages + 2
    prompt = session.render_ids(session.model_messages()[:-1])
    assert follow.stats.reused_tokens == common_prefix_length(cached, prompt) > len(session.render_ids(
        session.messages[:2], generation_prompt=False))


def test_overflow_sink_switches_strategy_and_keeps_the_cache(tiny_lm) -> None:
    session = make_session(tiny_lm, overflow="sink")
    fill_until_overflow(session)
    session.messages = session.messages[:10]
    session.send("short")  # fits: builds a dynamic cache
    assert session.settings.cache.strategy == "dynamic"
    fill_until_overflow(session)
    result = session.send("now it overflows")
    assert session.settings.cache.strategy == "sink"
    assert "sink" in (result.stats.overflow_action or "")
    assert result.stats.reused_tokens > 0  # the dynamic cache was converted, not thrown away
    assert result.stats.prompt_tokens > tiny_lm.context_length - session.reply_reserve()


def test_switching_strategy_keeps_the_conversation(tiny_lm) -> None:
    from engine.caches import CacheSpec

    session = make_session(tiny_lm)
    session.send("first")
    session.send("second")
    assert session.set_cache_spec(CacheSpec("sink", sink_tokens=4, window=600)) == "converted"
    result = session.send("third")
    assert result.stats.reused_tokens > 0
    fresh = make_session(tiny_lm)
    fresh.messages = copy.deepcopy(session.messages[:-1])
    assert fresh.generate().reply == result.reply  # window holds everything: same as dynamic
    assert session.set_cache_spec(CacheSpec()) == "converted"  # nothing evicted yet: back to dynamic
    assert session.send("fourth").stats.reused_tokens > 0


def test_cancel_during_a_long_prefill_stops_between_chunks(tiny_lm, monkeypatch) -> None:
    import engine.session as session_module

    monkeypatch.setattr(session_module, "PREFILL_CHUNK", 64)
    session = make_session(tiny_lm)
    real = session.forward_logits
    calls = {"n": 0}

    def counting(ids, all_positions=False):
        calls["n"] += 1
        if calls["n"] == 2:
            session.cancel()  # as if the user pressed Stop during the prefill
        return real(ids, all_positions)

    session.forward_logits = counting
    result = session.send("p" * 600)  # ~10 chunks of 64
    assert result.stats.finish_reason == "cancelled"
    assert calls["n"] == 2 and result.stats.generated_tokens == 0
    assert session.messages[-1].role == "user"  # nothing half-made was stored as a reply
    assert_consistent(session)
    session.forward_logits = real
    assert session.generate().stats.reused_tokens == 128  # the chunks already done are kept
