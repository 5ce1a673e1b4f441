#!/usr/bin/env python3
"""Render the window driving a remote Cachet server into docs/screenshots/remote-server.png.

    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/screenshot_remote.py [--out DIR]

A second process runs `python -m engine serve` with the bundled model on a free loopback port (the
"bigger machine"); the window's model source is that server, chosen as in Settings → Model → "An
OpenAI-compatible server". Two turns go through it (greedy, so the picture is reproducible); the
chat settings panel shows the cache note and the reply's hover the server's cached tokens.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # screenshots.py's helpers
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_server(url: str, process: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the server did not come up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="cachet-remote-shot-"))
    port = free_port()
    env = dict(os.environ, CACHET_DATA_DIR=str(data / "server"))
    server = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port), "--temperature", "0",
                               "--max-new-tokens", "120", "--device", "cpu"], cwd=ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(base, server)
        return shoot(args.out, data, f"{base}/v1")
    finally:
        server.terminate()
        server.wait(30)


def shoot(out: Path, data: Path, url: str) -> int:
    from screenshots import settle, use_throwaway_folders, wait

    use_throwaway_folders(data, "window")

    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QApplication

    from app.__main__ import default_loader
    from app.config import AppConfig
    from app.main_window import MainWindow
    from engine.store import ChatStore

    app = QApplication([])
    app.setStyle("Fusion")
    store = ChatStore()
    sampling: dict[str, object] = {"temperature": 0.0, "max_new_tokens": 120, "repetition_penalty": 1.0}
    config = AppConfig(theme="light", default_sampling=sampling, engine_source="remote", remote_url=url)
    win = MainWindow(store, config, default_loader(config), save_settings=False)
    win.resize(1280, 800)
    win.show()

    win.start_engine()
    wait(lambda: win.engine.ready or win.engine.load_error is not None)
    if win.engine.load_error:
        print(f"error: {win.engine.load_error}", file=sys.stderr)
        return 1
    chat = win.new_chat()
    for question in ("What is the capital of France?", "And what is it famous for?"):
        win.send(question)
        wait(lambda: not win.controller.runtime(chat).busy)
    last = store.messages(chat)[-1]
    print(f"last reply: {last.content[:80]!r}…; stats: {last.stats}")
    win.dock.show()
    win.resizeDocks([win.dock], [400], Qt.Orientation.Horizontal)
    win.settings_panel.verticalScrollBar().setValue(0)
    settle()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "remote-server.png"
    win.grab().save(str(path))
    print(f"wrote {path}")
    win.close()
    store.close()
    app.processEvents()
    return 0


if __name__ == "__main__":
    sys.exit(main())
