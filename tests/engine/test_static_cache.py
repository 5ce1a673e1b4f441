"""The static (pre-allocated) cache: the same answers as the dynamic cache, croppable, never overflowing silently."""

from __future__ import annotations

import pytest
import torch

from engine import caches
from engine.bench.workload import LONG_TEXT_PATH
from engine.caches import CacheSpec
from engine.caches.static import StaticCacheFull
from engine.sampling import SamplingSettings
from engine.session import ChatSession, ContextOverflowError, SessionSettings

ALICE = LONG_TEXT_PATH
STATIC = CacheSpec(strategy="static", max_cache_len=256)
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)


def feed(session: ChatSession, ids: list[int], chunks: list[int]) -> torch.Tensor:
    out = []
    pos = 0
    for n in chunks:
        out.append(session.forward_logits(ids[pos : pos + n], all_positions=True))
        pos += n
    return torch.cat(out)


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_static_gives_the_dynamic_caches_logits(tiny_lm) -> None:
    ids = random_ids(200)
    chunks = [100, 1, 1, 50, 48]
    dynamic = feed(ChatSession(tiny_lm), ids, chunks)
    static = feed(ChatSession(tiny_lm, SessionSettings(cache=STATIC)), ids, chunks)
    torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-5)


def test_cropped_static_cache_continues_like_a_fresh_one(tiny_lm) -> None:
    ids = random_ids(220, seed=1)
    session = ChatSession(tiny_lm, SessionSettings(cache=STATIC))
    feed(session, ids[:200], [200])
    assert session.cache.crop_to(120)
    del session.cached_ids[120:]
    continued = session.forward_logits(ids[120:220], all_positions=True)
    dynamic = feed(ChatSession(tiny_lm), ids[:220], [220])[120:]
    torch.testing.assert_close(continued, dynamic, rtol=0, atol=1e-5)
    layer = session.cache.layers[0]
    assert int(layer.cumulative_length) == 220
    assert torch.count_nonzero(layer.keys[:, :, 220:]) == 0, "nothing stale beyond the cached tokens"


def test_overflow_is_refused_before_anything_is_written(tiny_lm) -> None:
    session = ChatSession(tiny_lm, SessionSettings(cache=STATIC))
    feed(session, random_ids(200), [200])
    with pytest.raises(StaticCacheFull, match="holds at most 256 tokens; it has 200 and 100 more would not fit"):
        session.cache.ensure_room(100)
    session.cache.ensure_room(56)
    with pytest.raises(StaticCacheFull):
        session.forward_logits(random_ids(100))
    # Every layer still holds the 200 tokens it had: the session can go on from there.
    assert all(int(layer.cumulative_length) == 200 for layer in session.cache.layers)
    # Converting such a chat into a static cache too short for it is refused the same way (it recomputes).
    from engine.caches.convert import convert

    assert convert(session.cache, 200, CacheSpec(strategy="static", max_cache_len=128), tiny_lm.config) is None


def test_a_chat_never_writes_past_the_static_cache(tiny_lm) -> None:
    """The reply stops at the cache's end; the next turn that cannot fit is refused, with the reason."""
    spec = CacheSpec(strategy="static", max_cache_len=64)
    session = ChatSession(tiny_lm, SessionSettings(sampling=GREEDY, cache=spec))
    result = session.send("A question of some forty bytes or so?")
    assert result.stats.error is None
    assert caches.seq_length(session.cache) == len(session.cached_ids) <= 64
    with pytest.raises(ContextOverflowError, match="64 tokens"):
        session.send("And a follow-up that cannot fit any more.")
    assert caches.seq_length(session.cache) <= 64


def test_bytes_for_is_the_whole_pre_allocation(tiny_lm) -> None:
    session = ChatSession(tiny_lm, SessionSettings(cache=STATIC))
    full = caches.bytes_for(STATIC, 256, tiny_lm.config)
    assert caches.bytes_for(STATIC, 10, tiny_lm.config) == full
    assert full == caches.bytes_for(CacheSpec(), 256, tiny_lm.config)
    feed(session, random_ids(10), [10])
    assert caches.cache_bytes(session.cache) == full


@pytest.mark.real_model
def test_static_matches_dynamic_on_the_real_model(real_lm) -> None:
    ids = list(real_lm.tokenizer(ALICE.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])[:96]
    dynamic = feed(ChatSession(real_lm), ids, [64, 1, 31])
    static = feed(ChatSession(real_lm, SessionSettings(cache=CacheSpec(strategy="static", max_cache_len=128))),
                  ids, [64, 1, 31])
    torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-4)
    assert torch.equal(static.argmax(-1), dynamic.argmax(-1))
