"""The terminal chat as a user types into it (issue 23 §2): `python -m engine chat` in a real process,
fed through its stdin (a pipe) or a pseudo-terminal where the terminal matters (Ctrl+C typed, line
editing). Every message and reply must end up in the chat's data folder, a stopped reply as far as
it got."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.store import ChatStore, StoredMessage
from tests.launch_cli import HELD
from tests.tiny import save_tiny_folder

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 120.0  # a process that answers nothing fails the test in this time, never hangs it
# fp32 on the CPU: no precision probe at start; speculation off where it is not the subject
CHAT = ["chat", "--device", "cpu", "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "12",
        "--speculative", "off"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("models") / "tiny")


def chat_process(args: list[str], stdin: str, module: str = "tests.launch_cli") -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` with `stdin` piped in, as `printf '…' | python -m engine chat` runs it; by
    default through tests/launch_cli.py, which injects the tiny model (no model folder to load, nor a
    precision probe in each new data folder's cache)."""
    done = subprocess.run([sys.executable, "-m", module, *args], input=stdin.encode(), cwd=ROOT, capture_output=True,
                          timeout=LIMIT_S, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    # decoded here, not with text=True: a random model's reply may hold a "\r", which must stay one
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "replace"),
                                       done.stderr.decode("utf-8", "replace"))


def messages(data: Path, chat_id: int = 1) -> list[StoredMessage]:
    store = ChatStore(data / "data" / "chats.sqlite3")
    try:
        return store.messages(chat_id)
    finally:
        store.close()


def exchange(found: list[StoredMessage]) -> list[tuple[str, str]]:
    return [(m.role, m.status) for m in found]


def test_a_message_piped_in_is_answered(tiny_folder: Path) -> None:
    """The issue's first line, `printf 'What is…?\\n/quit\\n' | python -m engine chat` (a model folder here,
    nothing kept): it crashed with SQLite's "objects created in a thread can only be used in that same
    thread" at the first message."""
    out = chat_process([*CHAT, "--model", str(tiny_folder)], "What is the capital of France?\n/quit\nnever sent\n",
                       module="engine")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    # the transcript reads as a chat: the piped message is shown after the prompt, the reply after "bot> "
    start, end = "you> What is the capital of France?\nbot> ", "\nyou> /quit\n"
    assert out.stdout.startswith(start) and out.stdout.endswith(end)
    assert len(out.stdout) > len(start + end)  # a reply
    assert "never sent" not in out.stdout
    assert "prompt tokens reused" in out.stderr  # what the turn cost, on stderr


def test_reset_starts_a_new_chat_and_the_old_one_stays(tmp_path: Path) -> None:
    data = tmp_path / "cachet"
    out = chat_process([*CHAT, "--data-dir", str(data)],
                       "first question\n/reset\nsecond question\n/quit\nnever sent\n")
    assert out.returncode == 0, out.stderr
    assert "New chat 2 (chat 1 stays in" in out.stderr
    first = messages(data, 1)
    assert exchange(first) == [("user", "done"), ("assistant", "done")] and first[0].content == "first question"
    assert f"you> first question\nbot> {first[1].content}\nyou> /reset\n" in out.stdout
    assert [m.content for m in messages(data, 2) if m.role == "user"] == ["second question"]
    assert exchange(messages(data, 2)) == [("user", "done"), ("assistant", "done")]
    assert "never sent" not in out.stdout  # /quit left before it


def test_end_of_input_leaves_and_the_chat_resumes_from_its_snapshot(tmp_path: Path) -> None:
    """Ctrl+D (the end of stdin) leaves like /quit: the chat and its cache are kept, and `--chat 1` goes on
    with the whole history reused from the snapshot."""
    data = tmp_path / "cachet"
    first = chat_process([*CHAT, "--data-dir", str(data)], "hello there\n")
    assert first.returncode == 0, first.stderr
    assert "Chat 1 in" in first.stderr and "--chat 1 goes on with it" in first.stderr
    assert list((data / "data" / "snapshots").glob("1.*"))
    again = chat_process([*CHAT, "--data-dir", str(data), "--chat", "1"],
                         "and again\n")
    assert again.returncode == 0, again.stderr
    assert "going on after its 2 messages" in again.stderr
    assert exchange(messages(data)) == [("user", "done"), ("assistant", "done")] * 2
    reused = next(line for line in again.stderr.splitlines() if "prompt tokens reused" in line)
    assert not reused.strip().startswith("(0/")  # the first turn of the new run reuses the restored cache


def test_scripted_turns_without_json_are_answered_and_kept(tmp_path: Path) -> None:
    data = tmp_path / "cachet"
    turns = tmp_path / "turns.txt"
    turns.write_text("one\n\ntwo\n", encoding="utf-8")
    out = chat_process([*CHAT, "--data-dir", str(data), "--turns", str(turns)], "")
    assert out.returncode == 0, out.stderr
    kept = messages(data)
    assert exchange(kept) == [("user", "done"), ("assistant", "done")] * 2
    assert f"you> one\nbot> {kept[1].content}\nyou> two\nbot> {kept[3].content}\n" in out.stdout


# ----- in a terminal ---------------------------------------------------------------------------------------
class Terminal:
    """A process on a pseudo-terminal, as a shell runs it: what it writes is collected by a reader
    thread, `expect(text)` waits until that text has appeared (after what earlier calls matched)."""

    def __init__(self, argv: list[str]) -> None:
        env = {**os.environ, "TERM": "dumb"}  # line editing without screen control sequences
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the program, the pty its controlling terminal
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, *argv], env)
            finally:
                os._exit(127)
        self.output = ""
        self.seen = 0
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child has ended and closed its side
                chunk = b""
            with self.changed:
                if not chunk:
                    self.output += "\0"  # the end, for expect()
                    self.changed.notify_all()
                    return
                self.output += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
                self.changed.notify_all()

    def expect(self, text: str) -> str:
        """Wait for `text`; return what came before it since the last match."""
        deadline = time.monotonic() + LIMIT_S
        with self.changed:
            while (at := self.output.find(text, self.seen)) < 0:
                assert "\0" not in self.output[self.seen:], f"ended before {text!r}:\n{self.output}"
                assert self.changed.wait(deadline - time.monotonic()), f"no {text!r} in:\n{self.output}"
            before, self.seen = self.output[self.seen:at], at + len(text)
            return before

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self) -> int:
        self.expect("\0")
        _pid, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # already reaped by exit_code()
        except ProcessLookupError:
            pass


@pytest.fixture
def terminal() -> object:
    started: list[Terminal] = []

    def start(argv: list[str]) -> Terminal:
        started.append(Terminal(argv))
        return started[-1]

    yield start
    for t in started:
        t.kill()


def test_ctrl_c_stops_the_reply_the_chat_goes_on_and_the_partial_reply_is_kept(terminal, tmp_path: Path) -> None:
    """Ctrl+C typed while a reply is being written (held open by the model until the turn is stopped, so
    the key certainly lands mid-reply) stops that reply, keeps it as far as it got, and the chat goes
    on: the next message is answered with the stopped reply in its history."""
    data = tmp_path / "cachet"
    chat = terminal(["-m", "tests.launch_cli", "--hold-at", "4", *CHAT, "--max-new-tokens", "40",
                     "--data-dir", str(data)])
    chat.expect("you> ")
    chat.type("tell me a long story\n")
    chat.expect(HELD)
    chat.type("\x03")  # Ctrl+C: the terminal sends SIGINT to the chat
    assert "[stopped]" in chat.expect("you> ")
    chat.type("and now?\n")
    assert "[stopped]" not in chat.expect("you> ")
    chat.type("\x04")  # Ctrl+D at an empty line: the end of input
    assert chat.exit_code() == 0
    kept = messages(data)
    assert exchange(kept) == [("user", "done"), ("assistant", "stopped"), ("user", "done"), ("assistant", "done")]
    stopped = kept[1]
    assert stopped.content and stopped.token_ids is not None and 4 <= len(stopped.token_ids) < 40
    assert kept[3].stats is not None and kept[3].stats["reused_tokens"] > 0  # went on from the stopped reply


def test_ctrl_c_at_the_prompt_does_not_leave_and_lines_can_be_edited(terminal, tmp_path: Path) -> None:
    """At the prompt Ctrl+C only clears the line (a second press meant for a reply that just ended must
    not lose the chat), and the arrow keys edit the line instead of typing escape codes into it."""
    data = tmp_path / "cachet"
    chat = terminal(["-m", "tests.launch_cli", *CHAT, "--data-dir", str(data)])
    chat.expect("you> ")
    chat.type("never sent")
    chat.type("\x03")
    assert "/quit or Ctrl+D leaves" in chat.expect("you> ")
    chat.type("helo\x1b[D\x1b[Dl\n")  # two left arrows, then the missing letter
    chat.expect("bot> ")
    chat.expect("you> ")
    chat.type("/quit\n")
    assert chat.exit_code() == 0
    assert [m.content for m in messages(data) if m.role == "user"] == ["hello"]
