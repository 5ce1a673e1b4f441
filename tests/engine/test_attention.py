"""Packed grouped-query attention gives what transformers' copying path gives, without copying the cache."""

from __future__ import annotations

import torch

from engine import attention
from engine.sampling import SamplingSettings
from engine.session import ChatSession, SessionSettings
from tests.tiny import tiny_loaded_model


def test_a_few_queries_over_a_cache_give_the_same_logits_packed_and_copied() -> None:
    plain = tiny_loaded_model(seed=3)
    packed = tiny_loaded_model(seed=3)
    assert attention.use_packed_attention(packed.model)
    assert packed.model.config._attn_implementation == attention.NAME
    ids = list(range(40, 140))  # within the tiny vocabulary (259)
    a, b = ChatSession(plain), ChatSession(packed)
    a.forward_logits(ids)
    b.forward_logits(ids)
    for step in ([7, 8, 9, 10, 11], [12, 13]):  # a verifying step and a short prefill
        expected = a.forward_logits(step, all_positions=True)
        got = b.forward_logits(step, all_positions=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_greedy_replies_are_the_same_with_packed_attention() -> None:
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=40, repetition_penalty=1.0)
    replies = []
    for packed in (False, True):
        lm = tiny_loaded_model(seed=4)
        if packed:
            attention.use_packed_attention(lm.model)
        session = ChatSession(lm, SessionSettings(sampling=greedy, speculative="prompt-lookup"))
        for text in ("abc abc abc abc", "abc abc again"):
            session.send(text)
        replies.append([m.token_ids for m in session.messages if m.role == "assistant"])
    assert replies[0] == replies[1]
