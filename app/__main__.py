"""`python -m app` (or `cachet`): the desktop app.

The window appears before anything heavy is imported; the engine worker then imports torch
and loads the model while the user can already type (messages queue until the model is ready).

Test-only hooks, not for users: `--tiny-model` or CACHET_TEST_TINY_MODEL=1 loads the tiny random
model from tests/tiny.py instead of a real one; CACHET_TEST_AUTOSEND=TEXT sends TEXT in a new
chat right after start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine import paths

STARTED = time.time()


def default_loader(config: Any) -> Callable[..., Any]:
    """Load the configured model in the worker thread (engine.models imports torch)."""

    def load(progress: Callable[[str], None]) -> Any:
        from engine import models

        return models.load(config.model, device=config.device, dtype=config.dtype, offline=not config.online,
                           progress=progress)

    return load


def tiny_loader() -> Any:
    from tests.tiny import tiny_loaded_model

    return tiny_loaded_model()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachet", description="Cachet: chat with local models, every chat's KV cache "
                                                           "kept.")
    p.add_argument("--data-dir", type=Path, help="keep chats, settings and converted models under this folder "
                                                 "(for a throwaway run)")
    p.add_argument("--model", help="use this model for this run: 'default', a .gguf file, a folder or a Hub id")
    p.add_argument("--theme", choices=("system", "light", "dark"), help="override the theme for this run")
    p.add_argument("--tiny-model", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--exit-when-shown", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir is not None:
        paths.use_base_dir(args.data_dir.expanduser().resolve())

    from PySide6.QtCore import QTimer
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication, QMessageBox

    from app.config import load_config
    from app.main_window import MainWindow
    from engine.resources import resource_path
    from engine.store import ChatStore, StoreError

    app = QApplication(sys.argv[:1])
    app.setApplicationName("Cachet")
    app.setOrganizationName("Cachet")
    app.setStyle("Fusion")
    app.setWindowIcon(QIcon(str(resource_path("app.resources", "icons", "cachet.png"))))

    config = load_config()
    save = True
    overrides: dict[str, Any] = {}
    if args.model:
        overrides["model"] = args.model
    if args.theme:
        overrides["theme"] = args.theme
    if overrides:
        config = config.with_changes(**overrides)
        save = False  # a one-off choice on the command line is not written back
    try:
        store = ChatStore()
    except StoreError as exc:
        QMessageBox.critical(None, "Cachet cannot open its chats", str(exc))
        return 1
    tiny = args.tiny_model or os.environ.get("CACHET_TEST_TINY_MODEL") == "1"
    window = MainWindow(store, config, tiny_loader if tiny else default_loader(config), save_settings=save)
    window.show()

    def after_show() -> None:
        if os.environ.get("CACHET_PRINT_SHOWN") == "1":
            heavy = int("torch" in sys.modules or "transformers" in sys.modules)
            print(f"cachet-window-shown {time.time():.4f} {time.time() - STARTED:.4f} heavy-imports={heavy}",
                  flush=True)
        if args.exit_when_shown:
            window.close()
            app.quit()
            return
        window.start_engine()
        autosend = os.environ.get("CACHET_TEST_AUTOSEND")
        if autosend:
            window.new_chat()
            window.send(autosend)

    QTimer.singleShot(0, after_show)
    code = app.exec()
    store.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
