"""Prefixes shared across chats: a chat whose prompt starts with what another chat's cache already holds
(the same long system prompt, the same pasted document) starts from a copy of it instead of prefilling
it again, and answers exactly as it would from scratch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.caches import CacheSpec
from engine.models import LoadedModel
from engine.session import ChatSession, Message, SessionSettings, common_prefix_length
from engine.specs import quantization_defaults
from tests.conftest import Front

MakeFront = Callable[..., Front]
# ~600 tokens with the tiny byte-level tokenizer: a long shared system prompt within its 1,024-token context
SYSTEM = ("You are the assistant of a law firm. Answer from the contract below, quote its clauses, and say so "
          "when it is silent. " + "Clause: the tenant keeps the premises in good repair and pays on time. " * 7)


def test_a_copied_prefix_gives_the_same_logits_as_prefilling_it(tiny_lm: LoadedModel) -> None:
    from engine.pool import CachePool

    settings = SessionSettings(system_prompt=SYSTEM, cache=CacheSpec("dynamic"))
    source = ChatSession(tiny_lm, settings, [Message("user", "What does the tenant pay?")])
    source.next_token_logits()
    other = ChatSession(tiny_lm, SessionSettings(system_prompt=SYSTEM, cache=CacheSpec("dynamic")),
                        [Message("user", "Who repairs the roof?")])
    prompt = other.render_ids()
    shared = common_prefix_length(prompt, source.cached_ids)  # the system prompt and the user turn's opening
    assert shared > len(SYSTEM)
    pool = CachePool(tiny_lm, device_budget=1 << 40, host_budget=1 << 40)
    try:
        pool.add(1, source)
        copy = pool.copy_prefix(1, shared, CacheSpec("dynamic"))
    finally:
        pool.close()
    assert copy is not None and copy.get_seq_length() == shared
    other.cache, other.cached_ids = copy, prompt[:shared]
    from_copy = other.forward_logits(prompt[shared:], all_positions=True)

    scratch = ChatSession(tiny_lm, SessionSettings(system_prompt=SYSTEM, cache=CacheSpec("dynamic")),
                          [Message("user", "Who repairs the roof?")])
    from_scratch = scratch.forward_logits(prompt, all_positions=True)[shared:]
    torch.testing.assert_close(from_copy, from_scratch, rtol=1e-5, atol=1e-5)
    # the source's own cache is untouched: it still holds its whole prompt
    assert source.cache is not None and source.cache.get_seq_length() == len(source.cached_ids)


def test_a_second_chat_with_the_same_system_prompt_prefills_only_its_own_tokens(make_front: MakeFront) -> None:
    front = make_front()
    first = front.new_chat(system_prompt=SYSTEM)
    front.say(first, "What does the tenant pay?")
    second = front.new_chat(system_prompt=SYSTEM)
    question = "Who keeps the premises in repair?"
    done = front.say(second, question)

    assert done.restore is not None and done.restore.source == "shared"
    stats = done.stats
    assert stats.reused_tokens == done.restore.tokens >= len(SYSTEM)  # the system prompt came from the first chat
    assert stats.prefilled_tokens <= len(question) + 20  # only its own message and the template around it

    alone = make_front()  # another service: nothing to share, the whole prompt is prefilled
    scratch = alone.new_chat(system_prompt=SYSTEM)
    alone.store.add_message(scratch, "user", question)
    reference = alone.service.run_turn(scratch, alone.store.messages(scratch), alone.store.chat(scratch).settings)
    assert reference.restore.source == "empty" and reference.stats.reused_tokens == 0
    assert done.token_ids == reference.token_ids and done.reply == reference.reply

    again = front.say(first, "And when?")  # the first chat kept its own cache
    assert again.restore.source == "device"
    assert again.stats.prefilled_tokens < 40


def test_lossy_caches_are_never_shared(make_front: MakeFront) -> None:
    """A quantized cache holds other values than a prefill computes: neither side of a copy may be one."""
    front = make_front()
    quantized = CacheSpec(strategy="quantized", **quantization_defaults(4))
    first = front.new_chat(system_prompt=SYSTEM, cache=quantized)
    front.say(first, "What does the tenant pay?")
    second = front.new_chat(system_prompt=SYSTEM)
    done = front.say(second, "Who keeps the premises in repair?")
    assert done.restore.source == "empty" and done.stats.reused_tokens == 0

    third = front.new_chat(system_prompt=SYSTEM, cache=quantized)
    done = front.say(third, "Who keeps the premises in repair?")
    assert done.restore.source == "empty" and done.stats.reused_tokens == 0


def test_a_short_common_start_is_not_worth_a_copy(make_front: MakeFront) -> None:
    front = make_front()
    first = front.new_chat()
    front.say(first, "Hello there, how are you?")
    second = front.new_chat()
    done = front.say(second, "Hello there, what is a cache?")
    assert done.restore.source == "empty" and done.stats.reused_tokens == 0
