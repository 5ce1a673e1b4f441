"""Fault injection, end to end (issue 12): attack a data folder the way users meet it and check the
app holds — it comes up (or refuses with a clear message) and no committed message is lost.

    python scripts/fault_injection.py [--out DIR] [--cases kill,two-instances,...] [--jobs 2]

Each case gets a fresh temporary base folder (`--data-dir` layout: data/ and cache/) seeded through
the engine's store API with a few chats of committed messages, then attacks it and runs the real app
(`python -m app`'s `main()`, offscreen Qt) in its own process, as a user would start it. The model is a
tiny random Llama written as a model folder and passed with `--model` (the production loader reads it),
except for the converted-model case, which needs the bundled GGUF. A "committed" message is a stored row
whose status is not "streaming", in a chat not deleted; "lost" counts those present before the attack and
missing (or changed) after it. Where the attack itself destroys stored bytes (a damaged page, a damaged
write-ahead log), the rows SQLite can no longer read from the damaged file are counted apart ("destroyed"),
and the case holds when the user was told.

The app process is driven by this same script (`python scripts/fault_injection.py app ...`): it sends a
message, imports files or waits, records every dialog it shows (clicking the dialog's default button, as a
hurried user would), the banners and the status messages, and writes them as JSON.

Prints a table (attack → held, committed before / after, lost, note) and saves it under --out as
fault-injection.json and fault-injection.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED_CHATS = 4
SEED_PAIRS = 5  # user + assistant pairs per chat
APP_TIMEOUT_S = 180.0


# ----- the data folder: seeding and counting --------------------------------------------------------------
def seed(data: Path, chats: int = SEED_CHATS, pairs: int = SEED_PAIRS, filler: int = 0) -> None:
    """A few chats of committed messages, written through the engine's store API."""
    from engine.store import ChatStore

    data.mkdir(parents=True, exist_ok=True)
    (data / "settings.json").write_text(json.dumps({"device": "cpu", "dtype": "float32"}))
    store = ChatStore(data / "chats.sqlite3")
    try:
        for c in range(chats):
            chat = store.create_chat(title=f"Seeded chat {c + 1}")
            for i in range(pairs):
                store.add_message(chat.id, "user", f"Question {i + 1} of chat {c + 1}. " + "q" * filler)
                store.add_message(chat.id, "assistant", f"Answer {i + 1} of chat {c + 1}. " + "a" * filler)
    finally:
        store.close()


Key = tuple[int, int, str, str]  # chat id, position, role, content


def committed(db_path: Path) -> set[Key]:
    """The committed messages of a chat database, read without changing it (no recovery, no salvage)."""
    if not db_path.exists():
        return set()
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT m.chat_id, m.position, m.role, m.content FROM messages m JOIN chats c "
                          "ON c.id = m.chat_id WHERE m.status != 'streaming' AND c.deleted_at IS NULL").fetchall()
    except sqlite3.Error:
        return set()
    finally:
        db.close()
    return {(int(a), int(b), str(r), str(t)) for a, b, r, t in rows}


def readable(db_path: Path, keys: set[Key]) -> set[Key]:
    """Which of `keys` SQLite can still read from a (damaged) database file, row by row."""
    found: set[Key] = set()
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error:
        return found
    try:
        for key in keys:
            try:
                row = db.execute("SELECT content FROM messages WHERE chat_id = ? AND position = ?",
                                 key[:2]).fetchone()
            except sqlite3.Error:
                continue
            if row is not None and row[0] == key[3]:
                found.add(key)
    finally:
        db.close()
    return found


def tiny_model_folder(path: Path) -> Path:
    """A tiny random Llama as a model folder (weights, config, byte-level tokenizer)."""
    if not (path / "config.json").exists():
        from tests.tiny import save_tiny_folder

        save_tiny_folder(path)
    return path


# ----- the app, in its own process ------------------------------------------------------------------------
@dataclass
class AppRun:
    """What one start of the app did (the child's JSON report, its exit and its stderr)."""

    code: int | None
    report: dict[str, Any]
    stderr: str
    killed: bool = False

    @property
    def came_up(self) -> bool:
        return bool(self.report.get("shown"))

    def dialogs(self) -> list[str]:
        return [f"{d['title']}: {d['text']}" for d in self.report.get("dialogs", [])]

    def banners(self) -> list[str]:
        return list(self.report.get("banners", {}).values())

    def tracebacks(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr


def app_command(base: Path | None, model: str, *extra: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "app", "--model", model]
    if base is not None:
        cmd += ["--data-dir", str(base)]
    return cmd + list(extra)


def app_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CACHET_DATA_DIR", "CACHET_CACHE_DIR")}
    env.update(QT_QPA_PLATFORM="offscreen", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def start_app(report: Path, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd + ["--report", str(report)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_app(proc: subprocess.Popen[str], report: Path, timeout: float = APP_TIMEOUT_S,
               kill: bool = False) -> AppRun:
    if kill:
        proc.send_signal(signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err += f"\n(fault_injection: the app did not end within {timeout:.0f} s)"
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        data = {}
    return AppRun(proc.returncode, data, err, killed=kill)


def run_app(report: Path, cmd: list[str], env: dict[str, str], timeout: float = APP_TIMEOUT_S) -> AppRun:
    return finish_app(start_app(report, cmd, env), report, timeout)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str] | None, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(0.05)
    return False


def streaming_reply(db_path: Path) -> bool:
    """An assistant row is streaming, with text, written again after its first token."""
    if not db_path.exists():
        return False
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT COUNT(*) FROM messages WHERE status = 'streaming' AND length(content) > 0 "
                             "AND updated_at > created_at").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return bool(row and row[0])


# ----- results ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    attack: str
    held: str  # "held", "told" (only what the attack itself destroyed is gone, and the user was told), "NOT held"
    before: int
    after: int
    lost: int
    note: str
    destroyed: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def verdict(attack: str, before: set[Key], after: set[Key], run_ok: bool, note: str, *,
            destroyed: set[Key] | None = None, told: bool = True, details: dict[str, Any] | None = None) -> Result:
    missing = before - after
    gone_by_attack = (destroyed or set()) & missing
    lost_by_app = missing - gone_by_attack
    if not run_ok or lost_by_app:
        held = "NOT held"
    elif gone_by_attack:
        held = "told" if told else "NOT held"
    else:
        held = "held"
    return Result(attack, held, len(before), len(before & after), len(missing), note,
                  destroyed=len(gone_by_attack), details=details or {})


def ok_start(run: AppRun) -> bool:
    return run.came_up and not run.tracebacks() and run.code == 0


def summary(run: AppRun) -> dict[str, Any]:
    return {"exit": run.code, "killed": run.killed, "shown": run.came_up, "dialogs": run.dialogs(),
            "banners": run.banners(), "banners_seen": run.report.get("banners_seen", []),
            "status": run.report.get("status", [])[-6:],
            "load": run.report.get("load", [])[-4:], "restored": run.report.get("restored", []),
            "replies": run.report.get("replies", []), "traceback": run.tracebacks(),
            "stderr_tail": run.stderr.strip().splitlines()[-3:]}


# ----- the cases -------------------------------------------------------------------------------------------
class Case:
    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.base = root / "base"
        self.data = self.base / "data"
        self.db = self.data / "chats.sqlite3"
        self.model = str(model)
        self.env = app_env(CACHET_CONFIG_DIR=str(root / "config"), XDG_DATA_HOME=str(root / "xdg-data"),
                           XDG_CACHE_HOME=str(root / "xdg-cache"))
        self.runs = 0

    def report(self) -> Path:
        self.runs += 1
        return self.root / f"run{self.runs}.json"

    def cmd(self, *extra: str) -> list[str]:
        return app_command(self.base, self.model, *extra)

    def run(self, *extra: str, timeout: float = APP_TIMEOUT_S) -> AppRun:
        return run_app(self.report(), self.cmd(*extra), self.env, timeout)


def case_kill(c: Case) -> Result:
    seed(c.data)
    report = c.report()
    proc = start_app(report, c.cmd("--send", "Tell me everything", "--max-tokens", "5000", "--stay"), c.env)
    if not wait_for(lambda: streaming_reply(c.db), proc, APP_TIMEOUT_S):
        run = finish_app(proc, report, kill=True)
        return verdict("kill -9 mid-reply", set(), set(), False, "the reply never streamed",
                       details={"first": summary(run)})
    before = committed(c.db)  # the seeded chats and the user's message, committed before the reply
    first = finish_app(proc, report, kill=True)
    second = c.run()
    after = committed(c.db)
    interrupted = "interrupted" in " ".join(second.banners())
    note = ("killed at a streaming reply; the restart marked it interrupted "
            f"({'banner shown' if interrupted else 'NO banner'})")
    return verdict("kill -9 mid-reply", before, after, ok_start(second) and interrupted, note,
                   details={"first": summary(first), "restart": summary(second)})


def case_two_instances(c: Case) -> Result:
    seed(c.data)
    stop_file = c.root / "stop-now"
    report = c.report()
    first = start_app(report, c.cmd("--send", "Tell me everything", "--max-tokens", "5000",
                                    "--stop-file", str(stop_file)), c.env)
    if not wait_for(lambda: streaming_reply(c.db), first, APP_TIMEOUT_S):
        run = finish_app(first, report, kill=True)
        return verdict("two instances on one folder", set(), set(), False, "the first's reply never streamed",
                       details={"first": summary(run)})
    before = committed(c.db)
    second = c.run("--send", "A second window's message")
    still_streaming = streaming_reply(c.db)  # the second start did not mark the live reply interrupted
    stop_file.write_text("stop")
    first_run = finish_app(first, report)
    after = committed(c.db)
    raised = "brought to the front" in second.stderr
    stopped = [r for r in first_run.report.get("replies", []) if r.get("status") in ("stopped", "done")]
    ok = raised and second.code == 0 and not second.came_up and still_streaming and ok_start(first_run) \
        and bool(stopped)
    note = ("the second start brought the first window to the front and ended (exit 0); the first's reply "
            "kept streaming, then was stopped and saved" if ok else
            f"second: exit {second.code}, raised={raised}, opened a window={second.came_up}; "
            f"first still streaming={still_streaming}, its reply saved={bool(stopped)}")
    return verdict("two instances on one folder", before, after, ok, note,
                   details={"first": summary(first_run), "second": summary(second)})


def case_full_disk(c: Case) -> Result:
    """A real full disk: the data folder is a small tmpfs (mounted in a user and mount namespace, so no
    root is needed), filled up by another file while the reply streams, then freed."""
    if shutil.which("unshare") is None:
        return Result("full disk during a reply", "not run", 0, 0, 0, "unshare is not available")
    out = c.root / "full-disk-result.json"
    c.base.mkdir(parents=True)
    inner = [sys.executable, str(Path(__file__).resolve()), "full-disk-inner", str(c.base), c.model, str(out)]
    script = f"mount -t tmpfs -o size=4m tmpfs {c.base} && exec " + " ".join(f"'{a}'" for a in inner)
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                          env=c.env, capture_output=True, text=True, timeout=APP_TIMEOUT_S * 2)
    if not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return Result("full disk during a reply", "not run", 0, 0, 0,
                      f"no tmpfs could be mounted here (unshare: {tail})")
    data = json.loads(out.read_text())
    return Result(**data)


def full_disk_inner(base: Path, model: str, out: Path) -> None:
    """Inside the namespace, on the tmpfs: seed, start the app, fill the disk at the first streamed token,
    free it once the reply has finished, and count."""
    c = Case(base.parent, Path(model))
    seed(c.data)
    before = committed(c.db)
    filler = base / "filler.bin"
    run = c.run("--send", "Tell me about the sea", "--max-tokens", "300", "--fill-disk", str(filler),
                "--free-after-reply")
    after = committed(c.db)
    replies = run.report.get("replies", [])
    banner_said = any("Disk full" in b or "disk is full" in b for b in run.report.get("banners_seen", []))
    saved_later = run.report.get("saved_again", False)
    stuck = _count_streaming(c.db)
    told = banner_said and saved_later and stuck == 0
    sent = {k for k in after if k[3] == "Tell me about the sea"}
    reply_saved = any(k[2] == "assistant" and k[0] == next(iter(sent))[0] and k[1] == next(iter(sent))[1] + 1
                      for k in after) if sent else False
    note = (f"disk filled at the first streamed token ({run.report.get('refused_bytes', 0):,} bytes of filler); "
            f"banner {'shown' if banner_said else 'NOT shown'}; after freeing space the message and reply were "
            f"{'saved' if sent and reply_saved else 'NOT saved'}, {stuck} rows left streaming")
    ok = ok_start(run) and told and bool(sent) and reply_saved
    result = verdict("full disk during a reply", before, after, ok, note,
                     details={"run": summary(run), "replies": replies})
    out.write_text(json.dumps(asdict(result)))


def _count_streaming(db_path: Path) -> int:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages WHERE status = 'streaming'").fetchone()[0])
    finally:
        db.close()


PAGE = 4096


def case_damaged_page(c: Case) -> Result:
    seed(c.data, chats=10, pairs=10, filler=300)
    before = committed(c.db)
    raw = bytearray(c.db.read_bytes())
    middle = len(raw) // PAGE // 2
    raw[middle * PAGE:(middle + 1) * PAGE] = b"\xa5" * PAGE
    c.db.write_bytes(bytes(raw))
    still = readable(c.db, before)
    run = c.run()
    after = committed(c.db)
    kept = sorted(p.name for p in c.data.glob("chats.sqlite3.damaged-*") if p.name[-1].isdigit())
    told = any("damaged" in b for b in run.banners())
    note = (f"page {middle} of {len(raw) // PAGE} overwritten; {len(before - still)} rows were on it (unreadable "
            f"in the damaged file); salvaged into a fresh database, damaged copy kept ({', '.join(kept) or 'NONE'}); "
            f"banner {'shown' if told else 'NOT shown'}")
    return verdict("damaged database page", before, after, ok_start(run) and bool(kept), note,
                   destroyed=before - still, told=told, details={"run": summary(run)})


def case_damaged_wal(c: Case) -> Result:
    """The last run's turn lives in the write-ahead log (the app was killed before a checkpoint); then the
    log is damaged. SQLite drops its transactions: the app must notice and say so."""
    seed(c.data)
    report = c.report()
    proc = start_app(report, c.cmd("--send", "Remember this", "--max-tokens", "20", "--stay"), c.env)
    done = wait_for(lambda: any(k[3] == "Remember this" for k in committed(c.db)) and _replied(c.db), proc,
                    APP_TIMEOUT_S)
    before = committed(c.db)
    first = finish_app(proc, report, kill=True)
    wal = Path(str(c.db) + "-wal")
    size = wal.stat().st_size if wal.exists() else 0
    if not done or size <= 32 + 24 + PAGE:
        return verdict("damaged -wal", before, committed(c.db), False,
                       f"no write-ahead log to damage (turn done={done}, -wal {size} bytes)",
                       details={"first": summary(first)})
    data = bytearray(wal.read_bytes())
    for i in range(32 + 24 + 100, 32 + 24 + 164):  # inside the first frame's page: its checksum fails
        data[i] ^= 0x5A
    wal.write_bytes(bytes(data))
    shadow = c.root / "shadow.sqlite3"  # what SQLite itself can read of the damaged pair
    shutil.copy(c.db, shadow)
    shutil.copy(wal, Path(str(shadow) + "-wal"))
    still = _readable_copy(shadow, before)
    run = c.run()
    after = committed(c.db)
    told = any("lost" in b or "write-ahead" in b for b in run.banners())
    note = (f"the killed run's last turn was in chats.sqlite3-wal ({size:,} bytes), first frame damaged: "
            f"SQLite dropped {len(before - still)} committed rows; user told: {'yes' if told else 'NO'}")
    return verdict("damaged -wal", before, after, ok_start(run), note, destroyed=before - still, told=told,
                   details={"first": summary(first), "restart": summary(run)})


def _replied(db_path: Path) -> bool:
    keys = committed(db_path)
    sent = [k for k in keys if k[3] == "Remember this"]
    return bool(sent) and any(k[0] == sent[0][0] and k[1] == sent[0][1] + 1 and k[2] == "assistant" for k in keys)


def _readable_copy(path: Path, keys: set[Key]) -> set[Key]:
    db = sqlite3.connect(path)  # opening runs SQLite's own WAL recovery on the copy
    try:
        db.execute("SELECT COUNT(*) FROM messages").fetchone()
    except sqlite3.Error:
        pass
    finally:
        db.close()
    return readable(path, keys)


def case_damaged_snapshot(c: Case) -> Result:
    seed(c.data)
    first = c.run("--send", "First turn", "--max-tokens", "16")
    snaps = sorted(p for p in (c.data / "snapshots").rglob("*") if p.is_file()) if (c.data / "snapshots").exists() \
        else []
    before = committed(c.db)
    if not snaps:
        return verdict("damaged snapshot tensor data", before, committed(c.db), False,
                       "the first run left no snapshot to damage", details={"first": summary(first)})
    target = max(snaps, key=lambda p: p.stat().st_size)
    # The control: the same folder with its snapshot intact restores the chat from disk.
    control = Case(c.root / "control", Path(c.model))
    shutil.copytree(c.base, control.base)
    intact = control.run("--send", "Second turn", "--max-tokens", "16")
    from_disk = any(r.get("source") == "disk" for r in intact.report.get("restored", []))
    raw = bytearray(target.read_bytes())
    for i in range(len(raw) - 400, len(raw) - 300):  # inside the last tensor: the header still parses
        raw[i] ^= 0x5A
    target.write_bytes(bytes(raw))
    damaged = bytes(raw)
    second = c.run("--send", "Second turn", "--max-tokens", "16")
    after = committed(c.db)
    restored = second.report.get("restored", [])
    reused_damaged = any(r.get("source") == "disk" for r in restored)
    replaced = not target.exists() or target.read_bytes() != damaged
    replies = [r for r in second.report.get("replies", []) if r.get("status") == "done"]
    ok = ok_start(second) and from_disk and not reused_damaged and replaced and bool(replies)
    note = (f"{target.name}: 100 bytes of the last tensor flipped (intact, the same folder restores it "
            f"{'from disk' if from_disk else 'NOT from disk'}); restore sources on the next turn: "
            f"{', '.join(r.get('source', '?') for r in restored) or 'none'}; the damaged file "
            f"{'was replaced' if replaced else 'is STILL THERE'}; the reply {'completed' if replies else 'FAILED'}")
    return verdict("damaged snapshot tensor data", before, after, ok, note,
                   details={"first": summary(first), "control": summary(intact), "second": summary(second)})


def case_damaged_converted(c: Case) -> Result:
    """The bundled GGUF's converted copy, truncated (a kill or a disk error mid-write): the next start must
    notice, convert again and answer."""
    from engine import models
    from tests.conftest import kept_cache_dir

    c.model = "default"
    seed(c.data)
    source = models.resolve("default")
    digest = models.file_sha256(Path(source.location))
    os.environ["CACHET_CACHE_DIR"] = str(c.base / "cache")
    try:
        folder = models.converted_dir(digest)
    finally:
        os.environ.pop("CACHET_CACHE_DIR", None)
    kept = kept_cache_dir() / "models" / folder.name
    if kept.is_dir() and models.verify_converted(kept) is None:
        shutil.copytree(kept, folder)  # as an earlier start left it
        first = None
    else:
        first = c.run()
    before = committed(c.db)
    weights = folder / "model.safetensors"
    if not weights.exists():
        return verdict("damaged converted model", before, committed(c.db), False, "no converted copy was made")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    run = c.run("--send", "What is the capital of France?", "--max-tokens", "8", timeout=600)
    after = committed(c.db)
    said = [line for line in run.report.get("load", []) if "damaged" in line]
    replies = [r for r in run.report.get("replies", []) if r.get("status") == "done" and r.get("chars", 0) > 0]
    ok = ok_start(run) and bool(said) and bool(replies) and models.verify_converted(folder) is None
    note = (f"model.safetensors cut to a third; {'told: ' + said[0] if said else 'NOT told'}; "
            f"rebuilt={models.verify_converted(folder) is None}; reply {'completed' if replies else 'FAILED'}")
    return verdict("damaged converted model", before, after, ok, note,
                   details={"first": summary(first) if first else "copied", "run": summary(run)})


def hostile_imports(folder: Path) -> dict[str, Path]:
    """Chat exports a hostile or careless user may import."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {"format": "cachet-chat", "version": 1, "title": "Imported", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    files: dict[str, Any] = {
        "wrong-values": dict(good, settings={"sampling": {"temperature": "hot"}, "cache": {"window": "wide",
                                                                                           "max_cache_len": 1e12}}),
        "wrong-types": dict(good, messages=[{"role": 5, "content": ["x"]}]),
        "nan": None,
        "deep": None,
        "million": None,
        "surrogate": dict(good, messages=[{"role": "user", "content": "a\ud800b"}]),  # valid JSON, not storable text
        "fifo": None,
        "dev-zero": None,
    }
    paths_: dict[str, Path] = {}
    for name, data in files.items():
        p = folder / f"{name}.json"
        if name == "nan":
            p.write_text('{"format": "cachet-chat", "version": 1, "created_at": NaN, "settings": {"sampling": '
                         '{"temperature": NaN, "top_p": Infinity}}, "messages": [{"role": "user", "content": "x"}]}')
        elif name == "deep":
            p.write_text("[" * 100_000 + "]" * 100_000)
        elif name == "fifo":  # a named pipe: reading it waits for a writer forever
            os.mkfifo(p)
        elif name == "dev-zero":  # endless, and its size reads 0
            p.symlink_to("/dev/zero")
        elif name == "million":
            with p.open("w") as fh:
                fh.write('{"format": "cachet-chat", "version": 1, "messages": [')
                fh.write(",".join('{"role":"user","content":"m"}' for _ in range(1_000_000)))
                fh.write("]}")
        else:
            p.write_text(json.dumps(data))
        paths_[name] = p
    return paths_


def case_hostile_imports(c: Case) -> Result:
    seed(c.data)
    before = committed(c.db)
    files = hostile_imports(c.root / "imports")
    args: list[str] = []
    for p in files.values():
        args += ["--import", str(p)]
    run = c.run(*args)
    again = c.run()  # the next start must not depend on what was imported
    after = committed(c.db)
    dialogs = run.report.get("dialogs", [])
    named = [d for d in dialogs if d["title"] in ("Import failed", "Imported with default settings")]
    ok = ok_start(run) and ok_start(again) and len(named) == len(files)
    outcomes = "; ".join(f"{name}: {d['title'].lower()} ({d['text'].splitlines()[-1].strip('• ')[:60]})"
                         for name, d in zip(files, named, strict=False))
    note = (f"{len(files)} files ({', '.join(files)}); {len(named)} answered with a dialog ({outcomes}); "
            f"the next start {'came up' if again.came_up else 'FAILED'}")
    return verdict("hostile import JSON", before, after, ok, note,
                   details={"run": summary(run), "dialogs": dialogs, "next start": summary(again)})


def case_bad_settings(c: Case) -> Result:
    seed(c.data)
    before = committed(c.db)
    runs = []
    for text in ('{"model": 123, "default_sampling": {"temperature": "hot"}, "theme": null, "device": ["cuda"]}',
                 "[" * 100_000 + "]" * 100_000, "\x00\xff not json"):
        (c.data / "settings.json").write_text(text, encoding="utf-8", errors="surrogateescape")
        runs.append(c.run("--send", "Still working?", "--max-tokens", "8"))
    after = committed(c.db)
    answered = sum(1 for r in runs if any(x.get("status") == "done" for x in r.report.get("replies", [])))
    ok = all(ok_start(r) for r in runs) and answered == len(runs)
    warned = sum(1 for r in runs if "settings" in r.stderr.lower())
    note = (f"wrong types, 100k-deep nesting, binary garbage: {sum(r.came_up for r in runs)}/3 starts came up and "
            f"answered {answered}/3; a warning about settings.json on stderr in {warned}/3")
    return verdict("bad settings.json", before, after, ok, note, details={f"run{i + 1}": summary(r)
                                                                            for i, r in enumerate(runs)})


def case_missing_location(c: Case) -> Result:
    """location.json points at a folder on a drive that is not plugged in."""
    drive = c.root / "usb-drive"
    chosen = drive / "Cachet"
    seed(chosen)
    before = committed(chosen / "chats.sqlite3")
    (c.root / "config").mkdir(parents=True)
    (c.root / "config" / "location.json").write_text(json.dumps({"data_dir": str(chosen)}))
    unplugged = c.root / "usb-drive-unplugged"
    drive.rename(unplugged)
    run = run_app(c.report(), app_command(None, c.model), c.env)
    created_behind = drive.exists()
    unplugged.rename(drive)
    after = committed(chosen / "chats.sqlite3")
    asked = [d for d in run.report.get("dialogs", []) if "missing" in d["text"]]
    ok = ok_start(run) and bool(asked) and not created_behind
    note = (f"{'asked: ' + asked[0]['text'] if asked else 'NOT asked'} (answered with the default button: "
            f"{asked[0]['clicked'] if asked else '-'}); the missing folder was "
            f"{'CREATED empty' if created_behind else 'not created'}; the chats are intact on the drive")
    return verdict("location.json → missing folder", before, after, ok, note, details={"run": summary(run)})


def case_deleted_folder(c: Case) -> Result:
    """The data folder deleted while a reply streams: the app must notice, and at quit (the dialog's default
    answer) write everything it held into the folder again; the next start shows every chat."""
    seed(c.data)
    before = committed(c.db)
    run = c.run("--send", "Tell me about the sea", "--max-tokens", "40", "--delete-data-at-first-token")
    after = committed(c.db)
    again = c.run()
    asked = [d for d in run.report.get("dialogs", []) if "deleted" in d["text"]]
    sent = [k for k in after if k[3] == "Tell me about the sea"]
    replied = bool(sent) and any(k[0] == sent[0][0] and k[1] == sent[0][1] + 1 for k in after)
    ok = ok_start(run) and ok_start(again) and bool(asked) and replied and c.data.exists()
    note = (f"data folder deleted at the first streamed token; "
            f"{'asked at quit, answered ' + repr(asked[0]['clicked']) if asked else 'NOT asked'}; the message and "
            f"its reply (written after the delete) {'kept' if replied else 'LOST'}; the next start "
            f"{'came up' if again.came_up else 'FAILED'} with {len({k[0] for k in after})} chats")
    return verdict("data folder deleted mid-reply", before, after, ok, note,
                   details={"run": summary(run), "next start": summary(again)})


def case_damaged_header(c: Case) -> Result:
    seed(c.data)
    before = committed(c.db)
    raw = bytearray(c.db.read_bytes())
    raw[:100] = bytes((i * 37 + 11) % 256 for i in range(100))
    c.db.write_bytes(bytes(raw))
    run = c.run()
    after = committed(c.db)
    kept = sorted(p.name for p in c.data.glob("chats.sqlite3.damaged-*") if p.name[-1].isdigit())
    told = any("header" in b and "rebuilt" in b for b in run.banners())
    note = (f"the first 100 bytes of chats.sqlite3 garbled; {len(before & after)} of {len(before)} messages read "
            f"back through a rebuilt header; damaged copy kept ({', '.join(kept) or 'NONE'}); banner "
            f"{'shown' if told else 'NOT shown'}")
    return verdict("damaged database header", before, after, ok_start(run) and bool(kept) and told, note,
                   details={"run": summary(run)})


def case_leftover_temps(c: Case) -> Result:
    """What a killed snapshot write and a quit on a full disk leave behind: swept at the next start."""
    seed(c.data)
    before = committed(c.db)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (c.data / "snapshots").mkdir()
    left = [c.data / "snapshots" / f".1.safetensors.{dead}.tmp", c.data / f".chats.sqlite3.closed.{dead}.tmp"]
    for path in left:
        path.write_bytes(b"\0" * 65536)
    run = c.run()
    after = committed(c.db)
    remaining = [p.name for p in left if p.exists()]
    note = (f"{', '.join(p.name for p in left)} of a dead process: "
            f"{'all removed' if not remaining else 'STILL THERE: ' + ', '.join(remaining)} at the next start")
    return verdict("leftover temporary files", before, after, ok_start(run) and not remaining, note,
                   details={"run": summary(run)})


CASES: dict[str, Callable[[Case], Result]] = {
    "kill": case_kill,
    "two-instances": case_two_instances,
    "full-disk": case_full_disk,
    "damaged-page": case_damaged_page,
    "damaged-wal": case_damaged_wal,
    "damaged-snapshot": case_damaged_snapshot,
    "damaged-converted": case_damaged_converted,
    "hostile-import": case_hostile_imports,
    "bad-settings": case_bad_settings,
    "missing-location": case_missing_location,
    "deleted-folder": case_deleted_folder,
    "damaged-header": case_damaged_header,
    "leftover-temps": case_leftover_temps,
}


# ----- the child: the real app, driven and watched ----------------------------------------------------------
def run_child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fault_injection.py app")
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--send")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--import", dest="imports", action="append", type=Path, default=[])
    p.add_argument("--stay", action="store_true", help="keep running after the reply (to be killed)")
    p.add_argument("--stop-file", type=Path, help="press Stop once this file exists, then quit")
    p.add_argument("--fill-disk", type=Path, help="at the first streamed token, fill the disk with this file")
    p.add_argument("--free-after-reply", action="store_true")
    p.add_argument("--delete-data-at-first-token", action="store_true",
                   help="delete the data folder when the reply's first token arrives")
    args, app_args = p.parse_known_args(argv)

    from PySide6 import QtWidgets
    from PySide6.QtCore import QEvent, QObject, QTimer

    report: dict[str, Any] = {"shown": False, "dialogs": [], "banners": {}, "banners_seen": [], "status": [],
                              "load": [], "restored": [], "replies": []}

    def save() -> None:
        tmp = args.report.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, default=str))
        os.replace(tmp, args.report)

    class Dialogs(QObject):
        """Every message box shown: recorded, and answered with its default button (else accepted)."""

        def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
            if event.type() == QEvent.Type.Show and isinstance(watched, QtWidgets.QMessageBox) \
                    and id(watched) not in answered:
                box = watched
                answered.add(id(box))
                button = box.defaultButton() or next(
                    (b for b in box.buttons() if box.buttonRole(b) == QtWidgets.QMessageBox.ButtonRole.AcceptRole),
                    None)
                report["dialogs"].append({"title": box.windowTitle(), "text": box.text(),
                                          "clicked": button.text() if button is not None else "(closed)"})
                save()
                def answer() -> None:
                    with suppress(RuntimeError):  # a static QMessageBox may be gone already
                        if button is not None:
                            button.click()
                        else:
                            box.reject()

                QTimer.singleShot(0, answer)
            return False

    answered: set[int] = set()

    dialogs = Dialogs()
    original = QtWidgets.QApplication

    class WatchedApplication(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            self.installEventFilter(dialogs)

    QtWidgets.QApplication = WatchedApplication  # app/__main__ imports it at start-up, after this

    def after_start(window: Any) -> None:
        QtWidgets.QApplication = original
        report["shown"] = True
        report["banners"] = {k: window.banner_text(k) for k in list(window.banners)}
        save()
        state = {"filled": False, "sent": False, "chat": None, "deleted": False}
        engine, controller = window.engine, window.controller
        engine.status.connect(lambda text: (report["status"].append(text), save()))
        engine.load_progress.connect(lambda text: (report["load"].append(text), save()))
        engine.cache_restored.connect(lambda r: (report["restored"].append(
            {"source": r.source, "tokens": r.tokens}), save()))

        def banners_now() -> None:
            report["banners"] = {k: window.banner_text(k) for k in list(window.banners)}
            for text in report["banners"].values():
                if text and text not in report["banners_seen"]:
                    report["banners_seen"].append(text)

        def quit_app() -> None:
            banners_now()
            save()
            window.close()
            QtWidgets.QApplication.exit(0)

        def on_stream(_chat: int) -> None:
            if args.delete_data_at_first_token and not state["deleted"]:
                from engine import paths

                state["deleted"] = True
                shutil.rmtree(paths.data_dir())
            if args.fill_disk is not None and not state["filled"]:
                state["filled"] = True
                report["refused_bytes"] = fill(args.fill_disk)
                save()

        def on_saved() -> None:
            banners_now()
            if state["filled"] and controller.save_problem is None and not controller.unsaved:
                report["saved_again"] = True
                save()
                quit_app()

        def on_finished(chat_id: int) -> None:
            msgs = controller.messages(chat_id)
            last = msgs[-1] if msgs else None
            report["replies"].append({"status": last.status if last else None,
                                      "chars": len(last.content) if last else 0})
            banners_now()
            save()
            if args.free_after_reply and args.fill_disk is not None:
                args.fill_disk.unlink(missing_ok=True)  # space again: the retry timer saves what waits
                return
            if args.stay:
                return
            QTimer.singleShot(0, quit_app)

        def do_imports(_outcome: object = None) -> None:
            # One at a time: an import is read in a thread and ends with its dialog, then `import_done`.
            if pending_imports:
                window.import_file(pending_imports.pop(0))
                return
            banners_now()
            save()
            QTimer.singleShot(0, quit_app)

        pending_imports = list(args.imports)
        window.import_done.connect(do_imports)

        def send() -> None:
            if window.current_chat is None:
                window.new_chat()
            chat_id = window.current_chat
            state["chat"] = chat_id
            if args.max_tokens and chat_id is not None:
                from dataclasses import replace

                s = window.store.chat(chat_id).settings
                controller.set_settings(chat_id, replace(s, sampling=replace(
                    s.sampling, max_new_tokens=args.max_tokens, temperature=0.0)))
            window.send(args.send)

        def poll_stop() -> None:
            if args.stop_file is not None and args.stop_file.exists() and state["chat"] is not None:
                window.stop()
                args.stop_file.unlink()

        def ready(_model: object) -> None:
            banners_now()
            save()
            if args.send:
                QTimer.singleShot(0, send)
            elif args.imports:
                QTimer.singleShot(0, do_imports)
            else:
                QTimer.singleShot(0, quit_app)

        controller.turn_finished.connect(on_finished)
        controller.stream_changed.connect(on_stream)
        controller.save_state_changed.connect(on_saved)
        engine.model_ready.connect(ready)
        engine.model_failed.connect(lambda message: (report.__setitem__("model_failed", message), save()))
        if args.stop_file is not None:
            timer = QTimer(window)
            timer.timeout.connect(poll_stop)
            timer.start(100)

    from app.__main__ import main as app_main

    code = app_main(app_args, after_start=after_start)
    report["exit"] = code
    save()
    return code


def fill(path: Path) -> int:
    """Write `path` until the disk is full; returns how many bytes it took."""
    written = 0
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as fh:
        try:
            while True:
                written += fh.write(chunk)
        except OSError:
            pass
        try:
            while True:
                written += fh.write(b"\0" * 512)
        except OSError:
            pass
    return written


# ----- the table -------------------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    head = ["attack", "held", "committed before", "after", "lost", "note"]
    rows = [[r.attack, r.held, str(r.before), str(r.after),
             str(r.lost) + (f" ({r.destroyed} destroyed by the attack)" if r.destroyed else ""), r.note]
            for r in results]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(5)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head[:5], widths, strict=True)) + " | note",
             "-+-".join("-" * w for w in widths) + "-+-----"]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + " | " + r[5] for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["app"]:
        return run_child(argv[1:])
    if argv[:1] == ["full-disk-inner"]:
        full_disk_inner(Path(argv[1]), argv[2], Path(argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / f"{time.strftime('%Y-%m-%d')}-fault-injection")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--jobs", type=int, default=2, help="cases run at the same time (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s): {', '.join(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="cachet-fault-"))
    model = tiny_model_folder(work / "tiny-model")
    lock = threading.Lock()

    def one(name: str) -> Result:
        root = work / name
        root.mkdir()
        started = time.monotonic()
        try:
            result = CASES[name](Case(root, model))
        except Exception as exc:  # a case that cannot run is reported, not hidden
            result = Result(name, "error", 0, 0, 0, f"{type(exc).__name__}: {exc}")
        result.seconds = round(time.monotonic() - started, 1)
        result.note = result.note.replace(str(work), "$TMP")
        with lock:
            print(f"{result.attack}: {result.held} ({result.seconds:.0f} s)", flush=True)
        return result

    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(one, names))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fault-injection.txt").write_text(
        f"python scripts/fault_injection.py --out {args.out}  ({time.strftime('%Y-%m-%d %H:%M')})\n\n{text}\n")
    (args.out / "fault-injection.json").write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    return 0 if all(r.held in ("held", "told") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
