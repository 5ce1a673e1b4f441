"""Speculative decoding's building blocks: prompt lookup and the acceptance rules."""

from __future__ import annotations

import pytest
import torch

from engine import caches
from engine.caches import CacheConfigError, CacheSpec
from engine.sampling import Sampler, SamplingSettings
from engine.session import ChatSession, SessionSettings
from engine.speculative import CostAwareLength, DraftLength, PromptLookup


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3], ngram_sizes=(2,), max_draft=3)
    # "2 3" last occurred before the tail at positions 6-7, followed by 7 8 6.
    assert lookup.propose() == [7, 8, 6]
    lookup.extend([7])
    # "3 7" occurred once, followed by 8 6 2.
    assert lookup.propose(2) == [8, 6]


def test_prompt_lookup_prefers_longer_ngrams_and_never_matches_the_tail_itself() -> None:
    lookup = PromptLookup([5, 1, 2, 3, 40, 9, 2, 3, 50, 1, 2, 3], ngram_sizes=(3, 2), max_draft=2)
    assert lookup.propose() == [40, 9]  # "1 2 3" (longest) beats "2 3" (more recent)
    fresh = PromptLookup([1, 2, 3], ngram_sizes=(2,))
    assert fresh.propose() == []  # the only "2 3" is the tail: nothing followed it yet
    assert PromptLookup([], ngram_sizes=(2,)).propose() == []


def test_draft_length_grows_while_guesses_hold_and_shrinks_after_a_miss() -> None:
    length = DraftLength(start=4, most=8)
    length.update(4, 4)
    assert length.next() == 8
    length.update(8, 8)
    assert length.next() == 8
    length.update(8, 2)
    assert length.next() == 3
    length.update(3, 0)
    assert length.next() == 1


def test_greedy_verification_keeps_a_guess_exactly_when_it_is_the_models_choice() -> None:
    sampler = Sampler(SamplingSettings(temperature=0.0, repetition_penalty=1.0), torch.device("cpu"))
    row = torch.tensor([0.0, 3.0, 1.0])
    context = torch.tensor([0])
    assert sampler.verify(row, context, 1) == (1, True)
    assert sampler.verify(row, context, 2) == (1, False)
    assert sampler.verify(row, context, 1, banned=[1]) == (2, False)  # min_new_tokens holds a token back


def test_sampled_verification_leaves_the_distribution_unchanged() -> None:
    """With a deterministic guess, the emitted token must still follow the sampler's p exactly."""
    settings = SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=1234)
    sampler = Sampler(settings, torch.device("cpu"))
    p = torch.tensor([0.1, 0.6, 0.3])
    logits = p.log()
    context = torch.tensor([0])
    n = 20000
    for guess in (2, 1):
        counts = torch.zeros(3)
        kept = 0
        for _ in range(n):
            token, agreed = sampler.verify(logits, context, guess)
            counts[token] += 1
            kept += agreed
        assert torch.allclose(counts / n, p, atol=0.015), (guess, counts / n)
        assert abs(kept / n - float(p[guess])) < 0.015  # a guess stands with probability p(guess)


# ----- through the session, every strategy ------------------------------------------------------------
SPECS = {
    "dynamic": CacheSpec(),
    "sink": CacheSpec("sink", sink_tokens=4, window=96),
    "quantized": CacheSpec("quantized", nbits=4, residual=32, q_group_size=32, axis_key=-1),
    "sink-quantized": CacheSpec("sink-quantized", sink_tokens=4, window=96, nbits=4, residual=32,
                                q_group_size=32, axis_key=-1),
    "static": CacheSpec("static", max_cache_len=1024),
}
USABLE = [name for name, spec in SPECS.items() if caches.availability(torch.device("cpu"))[spec.strategy] is None]
# Text that repeats, so that prompt lookup finds guesses; the tiny random model repeats itself too.
TURNS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n",
         "again: def add(a, b):\n    return a + b\n",
         "the cat sat on the mat, the cat sat on the mat, the cat",
         "and once more: def add(a, b):"]


def _chat(lm, spec: CacheSpec, speculative: str, sampling: SamplingSettings) -> tuple[list[list[int]], list]:
    session = ChatSession(lm, SessionSettings(sampling=sampling, cache=spec, speculative=speculative))
    replies, stats = [], []
    for text in TURNS:
        result = session.send(text)
        assert result.stats.finish_reason in ("stop", "length"), result.stats.error
        replies.append(list(session.messages[-1].token_ids or []))
        stats.append(result.stats)
    return replies, stats


@pytest.mark.parametrize("strategy", USABLE)
def test_greedy_replies_are_identical_with_speculation_on_and_off(tiny_lm, strategy) -> None:
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=48, repetition_penalty=1.0)
    plain, plain_stats = _chat(tiny_lm, SPECS[strategy], "off", greedy)
    fast, fast_stats = _chat(tiny_lm, SPECS[strategy], "prompt-lookup", greedy)
    assert fast == plain
    assert all(s.speculative is None for s in plain_stats)
    assert [s.cache_tokens for s in fast_stats] == [s.cache_tokens for s in plain_stats]  # nothing extra kept
    checks = sum(s.tokens_per_step > 1.0 for s in fast_stats if s.tokens_per_step is not None)
    assert checks > 0, [s.speculative for s in fast_stats]  # guesses were checked and some were kept


def test_a_repetition_penalty_is_applied_at_every_checked_position(tiny_lm) -> None:
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=48, repetition_penalty=1.3)
    plain, _ = _chat(tiny_lm, SPECS["dynamic"], "off", sampling)
    fast, _ = _chat(tiny_lm, SPECS["dynamic"], "prompt-lookup", sampling)
    assert fast == plain


def test_a_sink_cache_about_to_evict_steps_without_guesses_and_says_so(tiny_lm) -> None:
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=48, repetition_penalty=1.0)
    _, stats = _chat(tiny_lm, CacheSpec("sink", sink_tokens=4, window=40), "prompt-lookup", greedy)
    described = " ".join(s.speculative or "" for s in stats)
    assert "could not take them back" in described


def test_min_new_tokens_and_the_budget_hold_with_speculation(tiny_lm) -> None:
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=30, min_new_tokens=30, repetition_penalty=1.0)
    plain, _ = _chat(tiny_lm, SPECS["dynamic"], "off", sampling)
    fast, stats = _chat(tiny_lm, SPECS["dynamic"], "prompt-lookup", sampling)
    assert fast == plain
    assert all(s.generated_tokens == 30 for s in stats)


def test_speculation_off_is_validated_like_every_setting(tiny_lm) -> None:
    with pytest.raises(CacheConfigError, match="speculative mode"):
        ChatSession(tiny_lm, SessionSettings(speculative="psychic")).settings.validate()


def test_auto_stops_checking_soon_after_guesses_stop_holding() -> None:
    policy = CostAwareLength({1: 1.0, 2: 1.2, 4: 1.5, 8: 2.0})
    for _ in range(40):  # editing code: every guess holds
        policy.update(4, 4)
    assert policy.next() >= 4
    misses = 0
    while policy.next() > 0:  # free conversation: none holds
        policy.update(1, 0)
        misses += 1
    assert misses <= 12  # a fading memory: not the hundreds of misses a lifetime average would need


def test_auto_weighs_guesses_with_the_step_costs_it_times() -> None:
    policy = CostAwareLength({1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5})  # the probe: checks look cheap
    for _ in range(20):
        policy.update(2, 1)  # half the guesses hold
    assert policy.next() > 0
    for _ in range(5):  # but this session's passes say a check costs as much as two plain steps
        policy.observe(1, 0.030)
        for n in (2, 3, 4, 5, 9):
            policy.observe(n, 0.030 * n)
    assert policy.cost(4) == pytest.approx(4.0)
    assert policy.next() == 0


@pytest.fixture(scope="module")
def tiny_with_copies():
    """The tiny model with bf16 copies of its weights for decoding passes (what `--dtype auto` may pick on a CPU)."""
    from engine import attention, half_weights
    from tests.tiny import tiny_loaded_model

    lm = tiny_loaded_model(seed=0)
    attention.use_packed_attention(lm.model)
    half_weights.convert(lm.model, kernel_max_tokens=half_weights.DECODE_ROWS)
    return lm


def test_a_pass_checking_guesses_gives_each_position_a_one_token_steps_logits_with_bf16_copies(
        tiny_with_copies) -> None:
    ids = list(range(40, 100))
    a, b = ChatSession(tiny_with_copies), ChatSession(tiny_with_copies)
    a.forward_logits(ids)
    b.forward_logits(ids)
    checked = a.forward_logits([7, 8, 9, 10, 11], all_positions=True)
    one_by_one = torch.stack([b.forward_logits([t]) for t in (7, 8, 9, 10, 11)])
    assert torch.equal(checked, one_by_one)  # bitwise: layer inputs are rounded to bf16, so nothing less holds


@pytest.mark.parametrize("strategy", ["dynamic", "sink", "quantized"])
def test_greedy_replies_are_identical_with_speculation_on_and_off_with_bf16_copies(tiny_with_copies,
                                                                                   strategy) -> None:
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=48, repetition_penalty=1.0)
    plain, _ = _chat(tiny_with_copies, SPECS[strategy], "off", greedy)
    fast, stats = _chat(tiny_with_copies, SPECS[strategy], "prompt-lookup", greedy)
    assert fast == plain
    assert any(s.tokens_per_step and s.tokens_per_step > 1.0 for s in stats)
