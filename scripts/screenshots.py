#!/usr/bin/env python3
"""Render the README's screenshots offscreen into docs/screenshots/*.png.

    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/screenshots.py [--tiny] [--out DIR]

Chats are written by the bundled model (greedy decoding, so the pictures are reproducible) in
a throwaway data folder; converted model weights are reused from the usual cache folder.
`--tiny` uses the tiny random test model instead (no real text; the code-block reply is then
injected through the store, and the captions say so).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

CODE_QUESTION = "Write a Python function that checks whether a word is a palindrome."
INJECTED_REPLY = '''Here is a small function that ignores case:

```python
def is_palindrome(word: str) -> bool:
    """True when `word` reads the same backwards."""
    cleaned = word.lower()
    return cleaned == cleaned[::-1]
```

For example, `is_palindrome("Level")` returns `True`.'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use the tiny random test model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="cachet-shots-"))
    # A throwaway data folder chosen as a user would (so the settings show it as changeable),
    # with the choice itself kept in a throwaway config folder, never the user's.
    os.environ.pop("CACHET_DATA_DIR", None)
    os.environ["CACHET_CONFIG_DIR"] = str(data / "config")
    from engine import paths

    paths.set_data_dir(data / "data")

    from PySide6.QtCore import QEventLoop, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from app.config import AppConfig
    from app.main_window import MainWindow
    from app.settings_dialog import SettingsDialog
    from engine.specs import CacheSpec, SamplingSettings
    from engine.store import ChatSettings, ChatStore

    app = QApplication([])
    app.setStyle("Fusion")
    store = ChatStore()
    if args.tiny:
        from tests.tiny import tiny_loaded_model

        loader: Callable[..., object] = tiny_loaded_model
    else:
        from app.__main__ import default_loader

        loader = default_loader(AppConfig(device="cpu"))
    sampling: dict[str, object] = {"temperature": 0.0, "max_new_tokens": 160, "repetition_penalty": 1.0}
    win = MainWindow(store, AppConfig(theme="light", default_sampling=sampling), loader, save_settings=False)
    win.resize(1280, 800)
    win.show()

    def wait(done: Callable[[], bool], timeout: float = 300.0) -> None:
        """Run the event loop (sleeping between events, as the app does) until `done()`."""
        end = time.monotonic() + timeout
        loop = QEventLoop()
        timer = QTimer()
        timer.timeout.connect(lambda: loop.quit() if done() or time.monotonic() > end else None)
        timer.start(50)
        if not done():
            loop.exec()
        timer.stop()
        if not done():
            raise TimeoutError("the window did not get there in time")

    def settle() -> None:
        # a few rounds of layout: word-wrapped labels settle their height after their width
        deadline = time.monotonic() + 0.4
        wait(lambda: time.monotonic() > deadline)

    def idle(chat_id: int) -> bool:
        return not win.controller.runtime(chat_id).busy

    def shot(name: str, widget: object = None) -> None:
        settle()
        target = widget or win
        path = args.out / f"{name}.png"
        target.grab().save(str(path))  # type: ignore[attr-defined]
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

    args.out.mkdir(parents=True, exist_ok=True)
    win.start_engine()
    wait(lambda: win.engine.ready or win.engine.load_error is not None)
    if win.engine.load_error:
        print(f"error: {win.engine.load_error}", file=sys.stderr)
        return 1

    # A few chats for the sidebar, the last one with a lossy strategy.
    for question in ("What is the capital of France?", "Give me three tips for a good night's sleep."):
        chat = win.new_chat()
        win.send(question)
        wait(lambda c=chat: idle(c))
    sink_chat = win.new_chat()
    store.set_settings(sink_chat, ChatSettings(sampling=SamplingSettings.from_dict(sampling),
                                               cache=CacheSpec("sink", window=512)))
    win.send("Let's keep a very long conversation going.")
    wait(lambda: idle(sink_chat))

    code_chat = win.new_chat()
    win.send(CODE_QUESTION)
    wait(lambda: idle(code_chat))
    reply = store.messages(code_chat)[-1]
    injected = "```" not in reply.content
    if injected:  # the model wrote no code block: show one written by hand, and say so
        store.update_message(reply.id, content=INJECTED_REPLY)
        win.current_chat = None
        win.select_chat(code_chat)
    print(f"code block reply: {'injected through the store' if injected else 'written by the model'}")

    shot("main-light")
    win.set_theme("dark")
    shot("main-dark")
    win.set_theme("light")

    win.dock.show()
    win.resizeDocks([win.dock], [400], Qt.Orientation.Horizontal)
    win.settings_panel.verticalScrollBar().setValue(0)
    shot("chat-settings")
    win.dock.hide()

    # A reply caught while it streams (the Stop button is up).
    win.send("Now make it ignore spaces too.")
    wait(lambda: len(win.controller.runtime(code_chat).text) > 120 or idle(code_chat))
    shot("streaming")
    win.stop()
    wait(lambda: idle(code_chat))

    dialog = SettingsDialog(win.config, win)
    dialog.show()
    shot("settings-dialog", dialog)
    dialog.close()

    win.close()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
