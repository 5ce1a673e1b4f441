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


def test_a_decoding_step_split_along_the_cache_equals_sdpa() -> None:
    torch.manual_seed(0)
    for length in (1024, 1031, 4099):  # whole chunks, and a tail that does not fill one
        buffer_k = torch.randn(1, 3, length + 77, 16)  # a longer buffer, as a cache growing in place keeps
        buffer_v = torch.randn(1, 3, length + 77, 16)
        key, value = buffer_k[:, :, :length], buffer_v[:, :, :length]
        query = torch.randn(1, 9, 1, 16)
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True, scale=0.3)
        got = attention.split_decode(query, key, value, 0.3)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_decoding_over_a_long_cache_gives_the_same_logits_split(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(attention, "SPLIT_MIN_KEYS", 64)  # the tiny model's cache is short
    plain = tiny_loaded_model(seed=5)
    split = tiny_loaded_model(seed=5)
    assert attention.use_packed_attention(split.model)
    calls = []
    original = attention.split_decode
    monkeypatch.setattr(attention, "split_decode", lambda *a: calls.append(1) or original(*a))
    a, b = ChatSession(plain), ChatSession(split)
    ids = list(range(30, 230))
    torch.testing.assert_close(b.forward_logits(ids), a.forward_logits(ids), rtol=1e-5, atol=1e-5)
    for token in (5, 6, 7):
        torch.testing.assert_close(b.forward_logits([token]), a.forward_logits([token]), rtol=1e-5, atol=1e-5)
    assert calls  # the split path ran
