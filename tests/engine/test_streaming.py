"""Streamed text never shows half a character, and adds up to the final reply."""

from __future__ import annotations

from engine.streaming import IncrementalDecoder
from tests.tiny import tiny_tokenizer


def test_multibyte_characters_are_never_split() -> None:
    tok = tiny_tokenizer()
    text = "naïve café — 東京 😀 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte tokens: some characters span several tokens
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_special_tokens_are_not_shown() -> None:
    tok = tiny_tokenizer()
    decoder = IncrementalDecoder(tok)
    ids = tok("hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    out = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert out == "hi"
