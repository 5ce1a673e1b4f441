"""Turning a growing list of token ids into text deltas that are safe to show.

A token can end in the middle of a UTF-8 character, and some tokenizers change how a
token reads once the next one is known. Following text-generation-inference's
`decode_token`, each delta is the difference between decoding a short window of recent ids
with and without the newest ones, and nothing is emitted while the text ends in an
incomplete character.
"""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        text = self._decode(self.ids[self._prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            delta = text[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            self.emitted += delta
            return delta
        return ""

    def text(self) -> str:
        """The whole decoded text so far."""
        return self._decode(self.ids)

    def flush(self) -> str:
        """Whatever the final text has beyond what was already emitted."""
        full = self.text()
        delta = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += delta
        return delta
