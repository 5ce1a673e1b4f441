"""The bundled SmolLM2-135M-Instruct, loaded once per session: reuse is exact on a real model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine import caches, models
from engine.bench.workload import LONG_TEXT_PATH
from engine.sampling import SamplingSettings
from engine.session import ChatSession, Message, SessionSettings

pytestmark = pytest.mark.real_model
TURNS = (Path(__file__).resolve().parents[1] / "data" / "six_turns.txt").read_text().splitlines()
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=128)


def test_bundled_model_loads_as_llama(real_lm) -> None:
    assert real_lm.config.model_type == "llama"
    assert real_lm.config.num_hidden_layers == 30
    assert real_lm.identity.startswith("gguf-sha256:")
    assert models.converted_dir(real_lm.identity.split(":")[1].split("|")[0]).is_dir()


def test_second_load_uses_the_converted_copy(real_lm, monkeypatch) -> None:
    def no_conversion(*_a, **_k):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again = models.load("default", device="cpu", dtype="float32")  # real_lm's precision (auto may add bf16 copies)
    assert again.identity == real_lm.identity
    a, b = real_lm.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(900)
def test_six_turns_identical_with_and_without_reuse(real_lm) -> None:
    reuse = ChatSession(real_lm, SessionSettings(sampling=GREEDY))
    baseline = ChatSession(real_lm, SessionSettings(sampling=GREEDY, reuse=False))
    previous_cache = 0
    for i, text in enumerate(TURNS):
        a = reuse.send(text)
        b = baseline.send(text)
        assert a.reply == b.reply, f"turn {i + 1} differs"
        assert a.stats.finish_reason in ("stop", "length")
        assert b.stats.reused_tokens == 0
        if i > 0:
            assert a.stats.reused_tokens == previous_cache  # the whole history came from the cache
            assert a.stats.reused_tokens >= 0.9 * a.stats.prompt_tokens
        previous_cache = a.stats.cache_tokens
        assert caches.seq_length(reuse.cache) == len(reuse.cached_ids)


def test_follow_up_logits_match_recomputing(real_lm) -> None:
    session = ChatSession(real_lm, SessionSettings(sampling=SamplingSettings(temperature=0.0, max_new_tokens=48)))
    session.send(TURNS[0])
    session.send(TURNS[1])
    session.messages.append(Message("user", TURNS[2]))
    reused, logits = session.next_token_logits()
    assert reused > 0.9 * len(session.cached_ids) - 20

    fresh = ChatSession(real_lm, SessionSettings())
    fresh.messages = copy.deepcopy(session.messages)
    _, recomputed = fresh.next_token_logits()
    assert torch.max(torch.abs(logits - recomputed)).item() < 1e-3


def test_edit_on_real_model_matches_from_scratch(real_lm) -> None:
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=24)
    session = ChatSession(real_lm, SessionSettings(sampling=sampling))
    session.send("What is the capital of France?")
    session.send("And of Italy?")
    result = session.edit(2, "And of Spain?")
    assert result.stats.reused_tokens > 0
    fresh = ChatSession(real_lm, SessionSettings(sampling=sampling))
    fresh.messages = copy.deepcopy(session.messages[:-1])
    assert fresh.generate().reply == result.reply
    assert "Madrid" in result.reply


@pytest.mark.timeout(900)
def test_sink_keeps_streamingllm_quality_on_the_bundled_model(real_lm) -> None:
    from engine.caches import CacheSpec
    from engine.perplexity import perplexity, sliding_window_perplexity

    text = LONG_TEXT_PATH.read_text(encoding="utf-8")
    n, window = 300, 64
    sink = perplexity(real_lm, text, CacheSpec("sink", sink_tokens=4, window=window), max_tokens=n, chunk=32)
    no_sink = perplexity(real_lm, text, CacheSpec("sink", sink_tokens=0, window=window + 4), max_tokens=n, chunk=32)
    oracle = sliding_window_perplexity(real_lm, text, window + 4, max_tokens=n, batch=32)
    assert sink.ppl <= 1.05 * oracle.ppl  # the paper's result: sinks match re-encoding the window
    assert no_sink.ppl > 1.3 * sink.ppl  # without sinks the window alone falls apart
    assert sink.cache_tokens <= window + 4


def test_a_replys_generated_ids_go_where_the_reply_is_not_into_an_earlier_message(real_lm) -> None:
    """The user quoted the reply's text before it was written: the generated ids still belong to
    the reply (found after the user's message), or reuse breaks from the user's message on."""
    tok = real_lm.tokenizer
    session = ChatSession(real_lm, SessionSettings())
    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    # a word and a split of it that the tokenizer would not make (as sampling sometimes does)
    reply, generated = next((word, ids(word[:1]) + ids(word[1:])) for word in ("Hello", "Paris", "Ember", "Sure")
                            if ids(word[:1]) + ids(word[1:]) != ids(word))
    session.messages = [Message("user", f"Say {reply}"), Message("assistant", reply, token_ids=tuple(generated))]
    ids = session.render_ids()
    text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in session.messages],
                                   tokenize=False)
    before_reply = tok(text[: text.rfind(reply)], add_special_tokens=False)["input_ids"]
    assert ids[: len(before_reply)] == before_reply  # the user's message is tokenized as it reads
    assert ids[len(before_reply) : len(before_reply) + len(generated)] == generated


def test_a_second_chat_with_a_1k_token_system_prompt_prefills_only_its_own_tokens(real_lm, make_front) -> None:
    """The acceptance of prefix sharing on the bundled model: the same ~1,000-token system prompt in a
    second chat comes from the first chat's cache, and the greedy reply is the one from scratch."""
    tok = real_lm.tokenizer
    words = LONG_TEXT_PATH.read_text(encoding="utf-8").split()
    system = " ".join(words[:800])
    while len(tok(system, add_special_tokens=False)["input_ids"]) < 1000:
        words = words[800:] + words[:800]
        system += " " + " ".join(words[:100])
    system_tokens = len(tok(system, add_special_tokens=False)["input_ids"])

    front = make_front(lm=real_lm)
    first = front.new_chat(system_prompt=system)
    front.say(first, "What is this text about?")
    second = front.new_chat(system_prompt=system)
    question = "Name one thing the text describes."
    done = front.say(second, question)
    assert done.restore is not None and done.restore.source == "shared"
    assert done.stats.reused_tokens >= system_tokens  # the whole system prompt came from the first chat
    assert done.stats.prefilled_tokens <= len(tok(question, add_special_tokens=False)["input_ids"]) + 12

    alone = make_front(lm=real_lm)  # another service: nothing to share, every token is prefilled
    scratch = alone.new_chat(system_prompt=system)
    alone.store.add_message(scratch, "user", question)
    reference = alone.service.run_turn(scratch, alone.store.messages(scratch), alone.store.chat(scratch).settings)
    assert reference.stats.reused_tokens == 0
    assert done.token_ids == reference.token_ids and done.reply == reference.reply
