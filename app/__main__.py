"""`python -m app` (or `cachet`): the desktop app.

The window appears before anything heavy is imported; the engine worker then imports torch
and loads the model while the user can already type (messages queue until the model is ready).

`--self-test` checks an installed or frozen app end to end (app/selftest.py). Nothing here
imports from tests/: a test that wants another model or an action after start calls `main()` with
`loader=` and `after_start=` (tests/launch_app.py does so in a subprocess).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine import paths

STARTED = time.time()


def default_loader(config: Any) -> Any:
    """Load the configured model in the worker thread (engine.models imports torch), or, with the
    source "remote", the server the worker connects to instead (an engine.remote.Endpoint)."""
    if config.engine_source == "remote":
        from engine import api_keys
        from engine.remote import Endpoint

        url = config.remote_url.strip()
        return Endpoint(url, config.remote_model.strip(), api_keys.load(url))

    def load(progress: Callable[[str], None]) -> Any:
        from engine import models

        return models.load(config.model, device=config.device, dtype=config.dtype, weights=config.weights,
                           gpu_layers=config.gpu_layers, offline=not config.online, progress=progress,
                           keep_converted=config.gguf_conversion.get(config.model.strip()) != "every_start")

    return load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachet", description="Cachet: chat with local models, every chat's KV cache "
                                                           "kept.")
    p.add_argument("--data-dir", type=Path, help="keep chats, settings and converted models under this folder "
                                                 "(for a throwaway run)")
    p.add_argument("--model", help="use this model for this run: 'default', a .gguf file, a folder or a Hub id")
    p.add_argument("--theme", choices=("system", "light", "dark"), help="override the theme for this run")
    p.add_argument("--self-test", action="store_true",
                   help="open the window, answer one message with the model, check it was stored, and exit "
                        "(0 when all went well)")
    p.add_argument("--exit-when-shown", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None, *, loader: Callable[..., Any] | None = None,
         after_start: Callable[[Any], None] | None = None) -> int:
    """Run the app; returns the exit code.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).
        loader: loads the model in the worker thread instead of the configured one (tests inject a tiny one).
        after_start: called with the MainWindow once it is shown and its engine started.
    """
    args = build_parser().parse_args(argv)
    throwaway: Path | None = None
    if args.data_dir is not None:
        paths.use_base_dir(args.data_dir.expanduser().resolve())
    elif args.self_test and not paths.data_dir_is_overridden():
        # The self-test never adds a chat to the user's own; converted models stay in the user's cache.
        throwaway = Path(tempfile.mkdtemp(prefix="cachet-self-test-"))
        os.environ["CACHET_DATA_DIR"] = str(throwaway)
    try:
        return _run(args, loader, after_start)
    finally:
        if throwaway is not None:
            shutil.rmtree(throwaway, ignore_errors=True)


def _run(args: argparse.Namespace, loader: Callable[..., Any] | None,
         after_start: Callable[[Any], None] | None) -> int:

    from app import qt_platform

    missing = qt_platform.missing_xcb_libraries()
    if missing:
        qt_platform.tell_user(qt_platform.explain(missing))
        return 1

    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication, QMessageBox

    from engine.resources import MissingResourceError, resource_path

    app = QApplication(sys.argv[:1])
    app.setApplicationName("Cachet")
    app.setOrganizationName("Cachet")
    app.setStyle("Fusion")
    app.setDesktopFileName("cachet")  # Wayland and X11 docks match the window to cachet.desktop's icon
    try:
        app.setWindowIcon(QIcon(str(resource_path("icons", "cachet.png"))))
    except MissingResourceError as exc:
        QMessageBox.critical(None, "Cachet is not installed completely", str(exc))
        return 1

    from app.excepthook import ExceptionHook

    # From here on, an exception no code catches (in a slot, a thread) is logged and shown, never lost.
    shown_in: list[Any] = []
    hook = ExceptionHook(lambda: shown_in[0] if shown_in else None).install()
    try:
        return _run_app(app, args, loader, after_start, shown_in)
    finally:
        hook.uninstall()


def _run_app(app: Any, args: argparse.Namespace, loader: Callable[..., Any] | None,
             after_start: Callable[[Any], None] | None, shown_in: list[Any]) -> int:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QMessageBox

    from app.config import load_config
    from app.main_window import MainWindow
    from app.single_instance import claim_data_folder
    from engine.store import ChatStore, StoreError

    claim = claim_data_folder()
    if claim is None:
        return 0  # the user quit, or the running Cachet that owns the folder was brought to the front
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
        claim.release()
        return 1
    window = MainWindow(store, config, loader or default_loader(config), save_settings=save,
                        folder_lock=claim.lock)
    shown_in.append(window)
    window.consent_at_start = loader is None  # a large GGUF without a converted copy: ask before converting it
    claim.serve(window)
    self_test = None
    if args.self_test:
        from app.selftest import SelfTest

        self_test = SelfTest(window, STARTED)
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
        if self_test is not None:
            self_test.start()
        if after_start is not None:
            after_start(window)

    QTimer.singleShot(0, after_show)
    code = app.exec()
    store.close()
    claim.release()
    if self_test is not None:
        return self_test.result if self_test.result is not None else 1
    return code


if __name__ == "__main__":
    sys.exit(main())
