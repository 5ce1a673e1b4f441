"""The chat view with big content (issue 12 item 11), measured in the real window, offscreen.

    python scripts/bench_view.py [--out DIR] [--runs 3] [--cases open-2000,...]

Open cases: a chat is stored through the engine's store, and the time is from selecting it in the main
window until the window has laid it out and painted it (the next event-loop pass included). Content cases
store a chat of one question and one reply holding the content (a 200×200 Markdown table, a 200,000-character
word, 50,000 nested brackets, a 100×40 table) and time opening it the same way. The streaming case types a
reply into the open chat token by token (4 characters every 2 ms, through ChatView.update_streaming, the
path the window's stream_changed takes) and reports the longest stall of the GUI thread: the longest gap
between two ticks of a 5 ms heartbeat timer, less its interval. Medians of --runs runs, each in a fresh
window; the figures "before" are those of the issue (measured before the view was reworked).

Prints a table and saves view.json and view.txt under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

# The figures, measured on this machine class before the view was reworked (issue 12 item 11).
BEFORE = {
    "open-2000": "30 s",
    "open-10000": "525 s",
    "table-200x200": "41 s",
    "word-200k": "11.5 s",
    "brackets-50k": "4.6 s",
    "table-100x40": "2.3 s",
    "stream-table-100x40": "1.2–3.0 s per re-render",
}
LABELS = {
    "open-2000": "open a 2,000-message chat",
    "open-10000": "open a 10,000-message chat",
    "table-200x200": "200×200 Markdown table",
    "word-200k": "200,000-character word",
    "brackets-50k": "50,000 nested brackets",
    "table-100x40": "100×40 table",
    "stream-table-100x40": "longest GUI stall, 100×40 table streaming",
}
TOKEN_CHARS = 4
TOKEN_EVERY_MS = 2
HEARTBEAT_MS = 5
LAST_STREAM: dict[str, float] = {}  # the last streaming run's longest stall while streaming, and when it ended


def table(rows: int, cols: int) -> str:
    head = "| " + " | ".join(f"h{c}" for c in range(cols)) + " |\n"
    rule = "|" + "---|" * cols + "\n"
    return head + rule + "".join("| " + " | ".join(f"r{r}c{c}" for c in range(cols)) + " |\n" for r in range(rows))


CONTENT: dict[str, Callable[[], str]] = {
    "table-200x200": lambda: table(200, 200),
    "word-200k": lambda: "see " + "x" * 200_000,
    "brackets-50k": lambda: "[" * 50_000 + "x" + "]" * 50_000,
    "table-100x40": lambda: table(100, 40),
}


class Bench:
    """A fresh data folder with the chats the cases open, and a main window on it (its engine never started:
    opening and drawing a chat does not need the model)."""

    def __init__(self, folder: Path) -> None:
        from engine.store import ChatStore

        self.store = ChatStore(folder / "chats.sqlite3")
        self.chats: dict[str, int] = {}

    def add_chat(self, name: str, messages: list[tuple[str, str]]) -> None:
        chat = self.store.create_chat(title=name)
        rows = [(chat.id, i, role, text, "done", time.time(), time.time()) for i, (role, text) in enumerate(messages)]
        with self.store._transaction() as db:  # one transaction: 10,000 single commits take minutes
            db.executemany("INSERT INTO messages (chat_id, position, role, content, status, created_at, "
                           "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self.chats[name] = chat.id

    def window(self) -> Any:
        from app.config import AppConfig
        from app.main_window import MainWindow

        def no_model(*_a: Any) -> Any:
            raise RuntimeError("the view bench loads no model")

        win = MainWindow(self.store, AppConfig(), no_model, save_settings=False)
        win.resize(1200, 800)
        win.show()
        settle()
        win.select_chat(None)
        settle()
        return win


def settle() -> None:
    from PySide6.QtCore import QCoreApplication, QEvent
    from PySide6.QtWidgets import QApplication

    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    for _ in range(3):
        QApplication.processEvents()


def shown(win: Any) -> None:
    """Until the window has laid out and painted what it shows."""
    from PySide6.QtWidgets import QApplication

    QApplication.processEvents()
    win.repaint()
    QApplication.processEvents()


def time_open(bench: Bench, name: str) -> float:
    win = bench.window()
    try:
        start = time.perf_counter()
        win.select_chat(bench.chats[name])
        shown(win)
        return time.perf_counter() - start
    finally:
        close(win)


def close(win: Any) -> None:
    win._quit_unsaved = lambda: True
    win.close()
    win.deleteLater()
    settle()


def time_stream(bench: Bench, text: str) -> float:
    """The longest GUI stall while `text` streams into the open chat's reply."""
    from PySide6.QtCore import QEventLoop, QTimer

    from app.chat_view import MessageView

    win = bench.window()
    try:
        win.select_chat(bench.chats["stream"])
        shown(win)
        view = win.chat_view
        user = view.views[0]
        view.set_messages([user, MessageView(key="live", position=1, role="assistant", text="", status="streaming")],
                          scroll_to_end=True)
        shown(win)
        loop = QEventLoop()
        beats: list[float] = []
        state: dict[str, Any] = {"at": 0, "finished_at": float("inf")}
        heartbeat = QTimer()
        heartbeat.setInterval(HEARTBEAT_MS)
        heartbeat.timeout.connect(lambda: beats.append(time.perf_counter()))
        tokens = QTimer()
        tokens.setInterval(TOKEN_EVERY_MS)

        def token() -> None:
            state["at"] += TOKEN_CHARS
            done = state["at"] >= len(text)
            view.update_streaming(MessageView(key="live", position=1, role="assistant", text=text[:state["at"]],
                                              status="streaming"))
            if done:
                tokens.stop()
                state["finished_at"] = time.perf_counter()
                view.set_messages([user, MessageView(key="live", position=1, role="assistant", text=text,
                                                     status="done")])
                QTimer.singleShot(50, loop.quit)

        tokens.timeout.connect(token)
        heartbeat.start()
        tokens.start()
        loop.exec()
        heartbeat.stop()
        end = state["finished_at"]
        gaps = [(b - a, b > end) for a, b in zip(beats, beats[1:], strict=False)]
        streaming = max((g for g, after in gaps if not after), default=0.0)
        finishing = max((g for g, after in gaps if after), default=0.0)
        LAST_STREAM.update(streaming=streaming - HEARTBEAT_MS / 1000, finishing=finishing - HEARTBEAT_MS / 1000,
                           chars=len(text), ticks=len(beats))
        return max(0.0, max(streaming, finishing) - HEARTBEAT_MS / 1000)
    finally:
        close(win)


CASES = ["open-2000", "open-10000", "table-200x200", "word-200k", "brackets-50k", "table-100x40",
         "stream-table-100x40"]


def measure(cases: list[str], runs: int) -> list[dict[str, Any]]:
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    results = []
    details: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cachet-view-") as tmp:
        bench = Bench(Path(tmp))
        for n in (2_000, 10_000):
            if f"open-{n}" in cases:
                bench.add_chat(f"open-{n}", [("user" if i % 2 == 0 else "assistant",
                                              f"Message {i}: some **Markdown**, a `code span` and a list:\n\n"
                                              "- one\n- two\n") for i in range(n)])
        for name, make in CONTENT.items():
            if name in cases:
                bench.add_chat(name, [("user", "Show me"), ("assistant", make())])
        if "stream-table-100x40" in cases:
            bench.add_chat("stream", [("user", "A big table, please")])
        for name in cases:
            samples = []
            for _ in range(runs):
                if name.startswith("stream-"):
                    samples.append(time_stream(bench, CONTENT[name.removeprefix("stream-")]()))
                    print(f"  stream: longest stall while streaming {fmt(LAST_STREAM['streaming'])}, at the end "
                          f"(the reply rendered whole) {fmt(LAST_STREAM['finishing'])}", flush=True)
                    details.setdefault(name, []).append(dict(LAST_STREAM))
                else:
                    samples.append(time_open(bench, name))
            median = statistics.median(samples)
            results.append({"case": name, "what": LABELS[name], "median_s": round(median, 4),
                            "runs_s": [round(s, 4) for s in samples], "before": BEFORE[name],
                            **({"stream_runs": details[name]} if name in details else {})})
            print(f"{LABELS[name]}: {fmt(median)} (runs {', '.join(fmt(s) for s in samples)})", flush=True)
        bench.store.close()
    return results


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def render_table(results: list[dict[str, Any]]) -> str:
    head = ["what", "before (issue 12)", "now (median)", "runs"]
    rows = [[r["what"], r["before"], fmt(r["median_s"]), ", ".join(fmt(s) for s in r["runs_s"])] for r in results]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(4)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / f"{time.strftime('%Y-%m-%d')}-view")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s): {', '.join(unknown)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    results = measure(cases, args.runs)
    text = render_table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_view.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "view.txt").write_text(f"{command.strip()}  ({time.strftime('%Y-%m-%d %H:%M')}, "
                                       f"{platform.machine()}, {os.cpu_count()} cores, offscreen Qt)\n\n{text}\n")
    (args.out / "view.json").write_text(json.dumps({"machine": platform.platform(), "cores": os.cpu_count(),
                                                    "token_chars": TOKEN_CHARS, "token_every_ms": TOKEN_EVERY_MS,
                                                    "heartbeat_ms": HEARTBEAT_MS, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
