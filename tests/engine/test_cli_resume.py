"""Going on with a kept chat from the terminal (`engine chat --data-dir D --chat N`, issue 23 §2 item 2):
the chat flags the user types win and stay with the chat, those left out keep the chat's own, and a
mistake is said before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine import cli
from engine.models import LoadedModel
from engine.specs import CacheSpec
from engine.store import ChatSettings, ChatStore
from tests.tiny import tiny_loaded_model

QUIET = ["--device", "cpu", "--dtype", "float32", "--speculative", "off"]


def tiny(**_kwargs: Any) -> LoadedModel:
    return tiny_loaded_model()


def never(**_kwargs: Any) -> LoadedModel:
    raise AssertionError("the model was loaded before the arguments were checked")


def run(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str,
        message: str = "tell me more") -> tuple[int, list[dict[str, Any]], str]:
    """One scripted turn in the chat folder `data` with `flags`: (exit code, the turn records, stderr)."""
    turns = tmp_path / "turn.txt"
    turns.write_text(message + "\n", encoding="utf-8")
    code = cli.main(["chat", *QUIET, "--data-dir", str(data), "--turns", str(turns), "--json", *flags], loader=tiny)
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def stored(data: Path, chat_id: int = 1) -> ChatSettings:
    store = ChatStore(data / "data" / "chats.sqlite3")
    try:
        return store.chat(chat_id).settings
    finally:
        store.close()


def test_a_flag_typed_when_going_on_wins_and_stays_with_the_chat(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Before: `--chat 1 --max-new-tokens 3` answered with the chat's stored 8 tokens (every flag ignored)."""
    data = tmp_path / "cachet"
    code, [first], _err = run(data, tmp_path, capsys, "--temperature", "0", "--max-new-tokens", "8",
                              "--repetition-penalty", "1.0")
    assert code == 0 and first["generated_tokens"] == 8 and first["finish_reason"] == "length"
    code, [second], err = run(data, tmp_path, capsys, "--chat", "1", "--max-new-tokens", "3")
    assert code == 0 and second["generated_tokens"] == 3
    assert "chat 1 now answers with --max-new-tokens 3 (was 8)" in err
    settings = stored(data)
    assert settings.sampling.max_new_tokens == 3
    assert settings.sampling.temperature == 0.0 and settings.sampling.repetition_penalty == 1.0  # not typed: kept
    code, [third], err = run(data, tmp_path, capsys, "--chat", "1")
    assert code == 0 and third["generated_tokens"] == 3  # the chat kept what the flag set
    assert "now answers with" not in err  # nothing typed, nothing changed


def test_flags_left_out_keep_the_chats_own_settings(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = tmp_path / "cachet"
    code, _records, _err = run(data, tmp_path, capsys, "--system", "You are terse.", "--cache", "sink",
                               "--window", "256", "--overflow", "truncate-middle", "--top-k", "7")
    assert code == 0
    before = stored(data)
    code, _records, err = run(data, tmp_path, capsys, "--chat", "1", "--temperature", "0", "--window", "300")
    assert code == 0
    after = stored(data)
    assert after.system_prompt == "You are terse." and after.overflow == "truncate-middle"
    assert after.cache.strategy == "sink" and after.cache.window == 300 and after.sampling.top_k == 7
    assert after.cache.sink_tokens == before.cache.sink_tokens
    assert "--window 300 (was 256), --temperature 0.0 (was 0.7) and keeps that" in err


def test_a_typed_cache_strategy_moves_the_chat_to_it(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = tmp_path / "cachet"
    code, [first], _err = run(data, tmp_path, capsys, "--temperature", "0", "--max-new-tokens", "4")
    assert code == 0 and first["cache_tokens"] == first["prompt_tokens"] + 3  # the full cache
    code, [second], err = run(data, tmp_path, capsys, "--chat", "1", "--cache", "sink", "--sink-tokens", "2",
                              "--window", "48", message="a message long enough to pass the window " * 2)
    assert code == 0, err
    assert "--cache sink (was dynamic)" in err and "--window 48 (was 1024)" in err
    assert second["prompt_tokens"] > 2 + 48 >= second["cache_tokens"]  # the sink cache answered: sinks + window
    spec = stored(data).cache
    assert (spec.strategy, spec.sink_tokens, spec.window) == ("sink", 2, 48)


def test_nbits_brings_its_measured_defaults_and_other_flags_win_over_them() -> None:
    base = ChatSettings(cache=CacheSpec("quantized", nbits=4, residual=16))
    args = cli.build_parser().parse_args(["chat", "--nbits", "2", "--axis-value", "-1"])
    spec = cli.settings_from_args(args, base).cache
    assert (spec.nbits, spec.q_group_size, spec.residual, spec.axis_value) == (2, 32, 128, -1)
    untouched = cli.settings_from_args(cli.build_parser().parse_args(["chat"]), base)
    assert untouched == base


def test_a_typed_flag_that_cannot_work_with_the_chat_is_said_before_loading(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = tmp_path / "cachet"
    assert run(data, tmp_path, capsys, "--cache", "sink", "--window", "256")[0] == 0
    turns = tmp_path / "turn.txt"
    code = cli.main(["chat", *QUIET, "--data-dir", str(data), "--turns", str(turns), "--chat", "1",
                     "--sink-tokens", "300"], loader=never)
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: the window (256) must be larger than the sink tokens (300)."
    assert stored(data).cache.sink_tokens == 4  # nothing was changed
    code = cli.main(["chat", *QUIET, "--data-dir", str(data), "--turns", str(turns), "--chat", "1"], loader=tiny)
    assert code == 0  # and the folder was given back


def test_a_chat_that_is_not_there_is_told_with_those_that_are(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = tmp_path / "cachet"
    turns = tmp_path / "turn.txt"
    turns.write_text("hi\n", encoding="utf-8")
    assert cli.main(["chat", "--data-dir", str(data), "--turns", str(turns), "--chat", "4"], loader=never) == 1
    err = capsys.readouterr().err
    assert "There is no chat 4 in" in err and "holds no chats yet" in err
    assert run(data, tmp_path, capsys, message="What is the capital of France?")[0] == 0
    assert cli.main(["chat", "--data-dir", str(data), "--turns", str(turns), "--chat", "4"], loader=never) == 1
    assert 'Its chats, newest first: 1 "What is the capital of France?".' in capsys.readouterr().err


def test_the_speculative_mode_typed_stays_with_the_chat(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The store keeps a chat's speculative mode (schema 3): a typed --speculative is the chat's from then on,
    and a chat that guesses with a draft model cannot go on without one (said before loading)."""
    data = tmp_path / "cachet"
    turns = tmp_path / "turn.txt"
    turns.write_text("hello\n", encoding="utf-8")
    base = ["chat", "--device", "cpu", "--dtype", "float32", "--data-dir", str(data), "--turns", str(turns), "--json"]
    assert cli.main([*base, "--speculative", "prompt-lookup"], loader=tiny) == 0
    capsys.readouterr()
    assert stored(data).speculative == "prompt-lookup"
    assert cli.main([*base, "--chat", "1"], loader=tiny) == 0
    assert stored(data).speculative == "prompt-lookup"  # not typed: the chat's own
    capsys.readouterr()
    store = ChatStore(data / "data" / "chats.sqlite3")
    try:
        store.set_settings(1, ChatSettings(speculative="draft-model", cache=CacheSpec("dynamic")))
    finally:
        store.close()
    assert cli.main([*base, "--chat", "1"], loader=never) == 2
    assert "chat 1 guesses with a draft model: give --draft-model PATH" in capsys.readouterr().err
