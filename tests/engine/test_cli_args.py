"""The terminal checks its arguments before loading anything (issue 12 item 12): one clear line on
stderr and a non-zero exit for each mistake, never a traceback or a model load first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import cli, models


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(models, "load_config", refuse)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    return {"empty": empty, "binary": binary, "missing": tmp_path / "missing.txt", "folder": tmp_path}


CASES = [
    (["chat", "--turns", "{empty}"], "holds no message"),
    (["chat", "--turns", "{missing}"], "no such file"),
    (["chat", "--turns", "{binary}"], "not UTF-8"),
    (["chat", "--turns", "{folder}"], "a folder"),
    (["chat", "--device", "potato"], "--device 'potato'"),
    (["chat", "--dtype", "float8"], "--dtype 'float8'"),
    (["chat", "--speculative", "draft-model"], "needs --draft-model PATH"),
    (["chat", "--draft-model", "{folder}"], "used by --speculative draft-model"),
    (["chat", "--temperature", "-1"], "temperature"),
    (["chat", "--max-new-tokens", "0"], "max new tokens"),
    (["chat", "--cache", "sink", "--window", "2", "--sink-tokens", "4"], "window"),
    (["chat", "--cache", "offloaded", "--device", "cpu", "--json", "--turns", "{empty}"], ""),
    (["chat", "--chat", "3"], "--chat needs --data-dir"),
    (["chat", "--data-dir", "/proc/x"], "--data-dir"),
    (["perplexity", "--text", "{empty}"], "empty"),
    (["perplexity", "--text", "{missing}"], "no such file"),
    (["perplexity", "--text", "{binary}"], "not UTF-8"),
    (["advise", "--context", "-1"], "--context -1"),
    (["advise", "--context", "0"], "--context 0"),
    (["advise", "--vram-gib", "-1"], "--vram-gib -1"),
    (["advise", "--ram-gib", "nan"], "--ram-gib nan"),
    (["models", "--context", "0"], "--context 0"),
]


@pytest.mark.parametrize("argv, says", CASES)
def test_a_bad_argument_is_one_line_and_a_non_zero_exit(argv: list[str], says: str, files: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert says in err


def test_perplexity_numbers_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("Some text to measure.")
    for argv, says in ((["--max-tokens", "0"], "--max-tokens 0"), (["--chunk", "0"], "--chunk 0")):
        assert cli.main(["perplexity", "--text", str(text), *argv]) == 2
        assert says in capsys.readouterr().err


def test_the_offloaded_cache_on_the_cpu_is_refused_before_loading(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    turns = tmp_path / "turns.txt"
    turns.write_text("hello\n")
    assert cli.main(["chat", "--cache", "offloaded", "--device", "cpu", "--json", "--turns", str(turns)]) == 2
    assert "offloaded" in capsys.readouterr().err


def test_the_chat_help_says_how_to_chat_stop_leave_and_go_on(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["chat", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for says in ("Ctrl+C stops a reply", "/reset starts a new chat", "/quit or Ctrl+D leaves",
                 "--chat N goes on with chat N", "flags you leave out keep the chat's own settings",
                 "--temperature T 0 = greedy, always the most likely token (default 0.7)",
                 "--max-new-tokens N the longest reply, in tokens (default 512)", "KV cache strategy (default dynamic)",
                 "python -m engine chat --data-dir ~/cachet --chat 1"):
        assert says in text, says
