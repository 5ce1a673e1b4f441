"""The tests' ForwardGate (tests/tiny.py) holds a reply at a known token, whatever the machine's speed:
the model runs no forward pass the test has not let through."""

from __future__ import annotations

import threading
from typing import Any

from engine.sampling import SamplingSettings
from engine.session import ChatSession, Message, SessionSettings
from tests.tiny import ForwardGate, GateTimeout, tiny_loaded_model

LONG = SamplingSettings(temperature=0.0, max_new_tokens=400, repetition_penalty=1.0)


def _session(gate: ForwardGate, text: str) -> ChatSession:
    session = ChatSession(gate.attach(tiny_loaded_model()), SessionSettings(sampling=LONG, speculative="off"))
    session.messages.append(Message("user", text))
    return session


def test_a_held_reply_has_exactly_the_tokens_let_through_until_the_gate_opens(gate: ForwardGate) -> None:
    session = _session(gate, "Please go on for a long time")
    tokens: list[int] = []
    box: dict[str, Any] = {}
    gate.hold_after(5)
    worker = threading.Thread(target=lambda: box.setdefault("done", session.generate(on_token=tokens.append)))
    worker.start()
    try:
        assert gate.wait_held(30, after=5)
        assert len(tokens) == 5  # the prompt's pass chose the first token, each step one more
        gate.step(3)
        assert gate.wait_held(30, after=8)
        assert len(tokens) == 8
        session.cancel()
    finally:
        gate.open()
        worker.join(30)
    assert not worker.is_alive()
    done = box["done"]
    assert done.stats.finish_reason == "cancelled" and done.stats.generated_tokens == 9  # the held pass's token


def test_a_pass_held_past_its_timeout_fails_the_turn_instead_of_hanging() -> None:
    gate = ForwardGate(timeout=0.0)  # a held pass fails at once
    session = _session(gate, "Hello")
    gate.hold_after(2)
    done = session.generate()
    assert done.stats.finish_reason == "error" and GateTimeout.__name__ in (done.stats.error or "")
    assert done.stats.generated_tokens == 2 and gate.passes == 2
