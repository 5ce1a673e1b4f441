"""Speculative decoding with a draft model: its own cache per conversation, cropped like the main one,
and greedy replies identical to decoding without it."""

from __future__ import annotations

import pytest

from engine.caches import CacheSpec
from engine.sampling import SamplingSettings
from engine.service import ChatService
from engine.session import (
    ChatSession,
    DraftModel,
    DraftModelError,
    SessionSettings,
    check_draft_compatible,
    common_prefix_length,
)
from engine.store import ChatSettings
from tests.tiny import tiny_loaded_model

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=40, repetition_penalty=1.0)
TURNS = ["abc abc abc abc", "tell me about abc", "and again abc abc"]


def _replies(lm, mode: str, draft=None, spec: CacheSpec | None = None):  # noqa: ANN001, ANN202
    session = ChatSession(lm, SessionSettings(sampling=GREEDY, cache=spec or CacheSpec(), speculative=mode))
    session.set_draft_model(draft)
    stats = []
    for text in TURNS:
        result = session.send(text)
        assert result.stats.finish_reason in ("stop", "length"), result.stats.error
        stats.append(result.stats)
    return [m.token_ids for m in session.messages if m.role == "assistant"], stats, session


@pytest.mark.parametrize("strategy", ["dynamic", "sink", "quantized"])
def test_greedy_replies_are_the_same_with_a_draft_model(strategy) -> None:
    main = tiny_loaded_model(seed=1)
    draft = tiny_loaded_model(seed=2, layers=1)  # another (smaller) model with the same tokenizer
    spec = {"dynamic": CacheSpec(), "sink": CacheSpec("sink", sink_tokens=4, window=96),
            "quantized": CacheSpec("quantized", nbits=4, residual=32, q_group_size=32, axis_key=-1)}[strategy]
    plain, _, _ = _replies(main, "off", spec=spec)
    drafted, stats, session = _replies(main, "draft-model", draft, spec=spec)
    assert drafted == plain
    assert all(s.speculative and s.speculative.startswith("draft model") for s in stats)
    assert session.draft is not None and session.draft_cache_bytes() > 0  # the draft keeps its own cache


def test_a_draft_that_is_the_model_itself_has_every_guess_kept() -> None:
    main = tiny_loaded_model(seed=3)
    _, stats, session = _replies(main, "draft-model", main)
    assert all(s.tokens_per_step is not None and s.tokens_per_step > 1.5 for s in stats if s.generated_tokens > 8)
    # its cache follows the conversation: it agrees with the main cache up to the last step's guesses at most
    assert session.draft is not None
    shared = common_prefix_length(session.draft.session.cached_ids, session.cached_ids)
    assert shared >= len(session.cached_ids) - 10


def test_the_draft_cache_is_cropped_to_what_still_agrees() -> None:
    main = tiny_loaded_model(seed=4)
    drafter = DraftModel(main)
    context = list(range(40, 90))
    first = drafter.propose(context, 4)
    assert len(first) == 4 and drafter.session.cached_ids == context + first[:3]
    edited = context[:30] + [7, 8, 9]  # an edit: the cache keeps 30 tokens and feeds the rest
    again = drafter.propose(edited, 3)
    assert drafter.session.cached_ids == edited + again[:2]
    assert again == DraftModel(main).propose(edited, 3)  # what a draft starting from nothing guesses


def test_a_draft_with_another_tokenizer_is_refused_with_a_clear_message() -> None:
    main = tiny_loaded_model(seed=5)
    other = tiny_loaded_model(seed=5)
    other.tokenizer.add_tokens(["<extra>"])
    with pytest.raises(DraftModelError, match="tokenizers differ"):
        check_draft_compatible(main, other)


def test_the_service_loads_a_draft_and_refuses_the_mode_without_one() -> None:
    service = ChatService(reuse=True)
    service.load_model(lambda progress=None: tiny_loaded_model(seed=6))
    settings = ChatSettings(sampling=GREEDY, speculative="draft-model")
    refused = service.run_turn(1, [_user("abc abc")], settings)  # said, never raised: the chat stays usable
    assert refused.finish_reason == "error" and "needs one" in (refused.error or "")
    assert service.load_draft_model(lambda progress=None: tiny_loaded_model(seed=7, layers=1)) is not None
    done = service.run_turn(1, [_user("abc abc")], settings)
    assert done.finish_reason in ("stop", "length") and done.stats is not None
    assert done.stats.speculative and done.stats.speculative.startswith("draft model")
    service.close(save=False)


def _user(text: str):  # noqa: ANN202
    from engine.session import Message

    return Message("user", text)
