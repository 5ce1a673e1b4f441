"""`python -m engine`: scripted turns as JSON lines, perplexity, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import cli
from engine.perplexity import perplexity
from tests.tiny import save_tiny_folder

TURN_KEYS = {"turn", "reply", "prompt_tokens", "reused_tokens", "prefilled_tokens", "generated_tokens",
             "ttft_ms", "decode_tok_s", "cache_tokens", "cache_bytes"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("models") / "tiny")


def run_turns(folder: Path, tmp_path: Path, capsys, *extra: str) -> list[dict]:
    turns = tmp_path / "turns.txt"
    turns.write_text("first message\nsecond one\n\nthird and last\n")
    code = cli.main(["chat", "--model", str(folder), "--temperature", "0", "--max-new-tokens", "8",
                     "--turns", str(turns), "--json", *extra])
    assert code == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_turns_json_reports_every_figure(tiny_folder, tmp_path, capsys) -> None:
    records = run_turns(tiny_folder, tmp_path, capsys)
    assert [r["turn"] for r in records] == [1, 2, 3]  # the blank line is skipped
    for r in records:
        assert set(r) >= TURN_KEYS
        assert r["reused_tokens"] + r["prefilled_tokens"] == r["prompt_tokens"]
        assert r["cache_bytes"] > 0
    assert records[1]["reused_tokens"] == records[0]["cache_tokens"]


def test_no_reuse_gives_the_same_replies(tiny_folder, tmp_path, capsys) -> None:
    reuse = run_turns(tiny_folder, tmp_path, capsys)
    baseline = run_turns(tiny_folder, tmp_path, capsys, "--no-reuse")
    assert [r["reply"] for r in reuse] == [r["reply"] for r in baseline]
    assert all(r["reused_tokens"] == 0 for r in baseline)


def test_wrong_model_path_is_a_message_not_a_traceback(tmp_path, capsys) -> None:
    (tmp_path / "t.txt").write_text("hello\n")  # a missing --turns file is refused first (test_cli_args.py)
    code = cli.main(["chat", "--model", str(tmp_path / "missing.gguf"), "--turns", str(tmp_path / "t.txt")])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


def test_invalid_sampling_is_rejected(tiny_folder, capsys) -> None:
    assert cli.main(["chat", "--model", str(tiny_folder), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_perplexity_command_prints_json(tiny_folder, tmp_path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    assert cli.main(["perplexity", "--model", str(tiny_folder), "--text", str(text), "--max-tokens", "300",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 300 and result["cache_tokens"] == 300
    assert result["ppl"] > 1.0 and result["cache_bytes"] > 0


def test_chunking_does_not_change_perplexity(tiny_lm) -> None:
    text = "Attention sinks keep the first tokens. " * 8
    a = perplexity(tiny_lm, text, chunk=7)
    b = perplexity(tiny_lm, text, chunk=1000)
    assert a.tokens == b.tokens
    assert abs(a.ppl - b.ppl) < 1e-3 * b.ppl


def test_invalid_cache_settings_are_explained(tiny_folder, tmp_path, capsys) -> None:
    turns = tmp_path / "t.txt"
    turns.write_text("hi\n")
    assert cli.main(["chat", "--model", str(tiny_folder), "--cache", "sink", "--sink-tokens", "8", "--window", "4",
                     "--turns", str(turns), "--json"]) == 2
    assert "window" in capsys.readouterr().err
    assert cli.main(["chat", "--model", str(tiny_folder), "--cache", "quantized", "--nbits", "3",
                     "--turns", str(turns), "--json"]) == 2
    assert "2 or 4 bits" in capsys.readouterr().err


def test_sink_chat_from_the_cli_runs_past_the_context(tiny_folder, tmp_path, capsys) -> None:
    turns = tmp_path / "t.txt"
    turns.write_text("\n".join("a fairly long line of chat " * 12 for _ in range(8)) + "\n")
    assert cli.main(["chat", "--model", str(tiny_folder), "--cache", "sink", "--window", "256", "--temperature", "0",
                     "--max-new-tokens", "8", "--turns", str(turns), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[-1]["prompt_tokens"] > 1024 >= records[-1]["cache_tokens"]


def test_a_terminal_chat_resumes_its_cache_from_the_data_folder(tiny_folder, tmp_path, capsys) -> None:
    """With --data-dir the chat is kept, and on quitting its cache is saved as a snapshot: going on
    with it later (--chat) reuses the whole history instead of reading it again."""
    data = tmp_path / "cachet"
    first = run_turns(tiny_folder, tmp_path, capsys, "--data-dir", str(data))
    assert (data / "data" / "chats.sqlite3").is_file() and list((data / "data" / "snapshots").glob("1.*"))
    turns = tmp_path / "more.txt"
    turns.write_text("and one more\n")
    assert cli.main(["chat", "--model", str(tiny_folder), "--temperature", "0", "--max-new-tokens", "8",
                     "--turns", str(turns), "--json", "--data-dir", str(data), "--chat", "1"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["reused_tokens"] == first[-1]["cache_tokens"]  # the whole chat so far, from the snapshot
    assert cli.main(["chat", "--model", str(tiny_folder), "--data-dir", str(data), "--chat", "7",
                     "--turns", str(turns)]) == 1
    assert "no chat 7" in capsys.readouterr().err


def test_chat_with_a_draft_model_from_the_command_line(tmp_path, capsys) -> None:  # noqa: ANN001
    """--draft-model guesses the replies' tokens: with the main model as its own draft every greedy guess is
    right, so the turns report the draft model's guesses and more than one token per pass, and the replies
    are those of plain decoding (before, the test passed whether the draft was used or not)."""
    main = save_tiny_folder(tmp_path / "main")
    turns = tmp_path / "turns.txt"
    turns.write_text("abc abc abc abc\nabc abc again\n", encoding="utf-8")
    common = ["chat", "--model", str(main), "--device", "cpu", "--dtype", "float32", "--temperature", "0",
              "--max-new-tokens", "24", "--turns", str(turns), "--json"]

    def records(*flags: str) -> list[dict]:
        assert cli.main([*common, *flags]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    drafted = records("--draft-model", str(main), "--speculative", "draft-model")
    plain = records("--speculative", "off")
    assert len(drafted) == 2 and all(r["finish_reason"] in ("stop", "length") for r in drafted)
    for r in drafted:
        assert r["speculative"].startswith("draft model: ") and r["tokens_per_step"] > 1.0, r
    assert all(r["speculative"] is None and r["tokens_per_step"] == 1.0 for r in plain)
    assert [r["reply"] for r in drafted] == [r["reply"] for r in plain]


def test_the_interactive_start_line_names_the_attention_kernel_and_why(tiny_folder, tmp_path, capsys,
                                                                      monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("builtins.input", lambda prompt="": "/quit")
    code = cli.main(["chat", "--model", str(tiny_folder), "--data-dir", str(tmp_path / "data")])
    assert code == 0
    start = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("Cachet — "))
    assert "; attention SDPA: " in start  # on this machine: no flash-attn, or no CUDA GPU


def test_ctrl_c_while_the_model_loads_ends_with_a_line_and_gives_the_folder_back(tmp_path, capsys) -> None:  # noqa: ANN001
    """Before: a KeyboardInterrupt traceback. Now one line, exit code 130, and the data folder is free again."""
    def interrupted_load() -> None:
        raise KeyboardInterrupt

    data = tmp_path / "cachet"
    assert cli.main(["chat", "--data-dir", str(data)], loader=interrupted_load) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    from engine.lock import DataFolderLock

    DataFolderLock(data / "data", owner="test").acquire().release()  # FolderInUseError if it were still held


def test_a_message_that_looks_like_a_command_is_not_sent(tiny_lm, tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    """/exit leaves like /quit, /help says the commands, and an unknown /word is not sent to the model."""
    typed = iter(["/help", "/bye", "/exit", "never sent"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    data = tmp_path / "cachet"
    assert cli.main(["chat", "--data-dir", str(data)], loader=lambda: tiny_lm) == 0
    err = capsys.readouterr().err
    assert "/bye: no such command. Ctrl+C stops a reply; /reset starts a new chat; /quit or Ctrl+D leaves." in err
    from engine.store import ChatStore

    store = ChatStore(data / "data" / "chats.sqlite3")
    try:
        assert store.messages(1) == []
    finally:
        store.close()
