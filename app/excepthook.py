"""What escapes: an exception no code caught, in any thread, logged and shown instead of vanishing.

Without a hook, an exception raised in a Qt slot is printed to a terminal the user does not see and the
slot simply stops: an import that failed halfway said nothing and made no chat. `ExceptionHook` is
installed as `sys.excepthook` (PySide6 hands it every exception a slot or a QThread raises) and as
`threading.excepthook` (Python threads). It appends the traceback to `cachet.log` in the data folder —
or, when that folder cannot be written (it was deleted, the disk is full), in the temporary folder —
still prints it to stderr, and shows a dialog on the GUI thread naming what escaped and where the
details are. It only reports: the chats, their messages in memory and on disk and the worker are left
as they are, so the app goes on.

One dialog at a time: exceptions raised while it is open are logged and counted, and the same
exception (type and place) is shown once per run (a timer's slot raising every second would otherwise
open a dialog every second).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

from engine import paths

LOG_NAME = "cachet.log"
MAX_LOG_BYTES = 1024 * 1024  # then the log starts again, the previous one kept as cachet.log.1
TITLE = "Something went wrong in Cachet"


def log_path() -> Path:
    """Where escaped exceptions are logged: the data folder's cachet.log (see `write_log` for the fallback)."""
    return paths.data_dir() / LOG_NAME


def write_log(text: str, path: Path | None = None) -> Path | None:
    """Append `text` (a dated traceback) to the log; returns the file written, None when none could be.
    Never creates the data folder: a folder deleted under the running app is not re-created by a log line
    (that would look as if every chat were lost); the temporary folder is used instead."""
    target = path or log_path()
    fallback = Path(tempfile.gettempdir()) / f"cachet-{os.getuid() if hasattr(os, 'getuid') else 0}.log"
    for place in (target, fallback):
        try:
            if not place.parent.is_dir():
                continue
            if place.exists() and place.stat().st_size > MAX_LOG_BYTES:
                os.replace(place, place.with_name(place.name + ".1"))
            with place.open("a", encoding="utf-8", errors="backslashreplace") as fh:
                fh.write(text)
            return place
        except OSError:
            continue
    return None


class ExceptionHook(QObject):
    """Logs and shows every exception that escapes (see the module docstring).

    `parent_window` gives the window the dialog belongs to (None: no parent); `log` overrides the log file.

    Signals:
        reported(str, str): an exception was shown — its one-line summary and the dialog's text.
    """

    reported = Signal(str, str)
    _escaped = Signal(str, str, str)  # (key, summary, log path): from any thread, queued to the GUI thread

    def __init__(self, parent_window: Callable[[], QWidget | None] = lambda: None, log: Path | None = None) -> None:
        super().__init__()
        self.parent_window = parent_window
        self.log = log
        self.escaped = 0  # how many exceptions escaped this run (all logged)
        self._shown: set[str] = set()
        self._showing = False
        self._previous: tuple[Any, Any] | None = None
        # Queued even from the GUI thread: the dialog opens after the hook returns, never inside it.
        self._escaped.connect(self._show, Qt.ConnectionType.QueuedConnection)

    def install(self) -> ExceptionHook:
        if self._previous is None:
            self._previous = (sys.excepthook, threading.excepthook)
            sys.excepthook = self.handle
            threading.excepthook = self._handle_thread
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            sys.excepthook, threading.excepthook = self._previous
            self._previous = None

    def _handle_thread(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        self.handle(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback, thread=name)

    def handle(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None,
               thread: str | None = None) -> None:
        """Log the exception, print it to stderr, and have the GUI thread show it."""
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        try:
            self.escaped += 1
            where = thread or threading.current_thread().name
            trace = "".join(traceback.format_exception(exc_type, exc, tb))
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            written = write_log(f"--- {stamp}, thread {where}: an exception escaped\n{trace}\n", self.log)
            sys.stderr.write(trace)
            frames = traceback.extract_tb(tb)
            last = frames[-1] if frames else None
            key = f"{exc_type.__qualname__}@{last.filename}:{last.lineno}" if last else exc_type.__qualname__
            summary = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
            if last is not None:
                summary += f" (in {Path(last.filename).name}, line {last.lineno}, {last.name})"
            self._escaped.emit(key, summary, str(written) if written else "")
        except Exception:  # the hook itself must never raise: at worst Python's own report
            sys.__excepthook__(exc_type, exc, tb)

    def _show(self, key: str, summary: str, written: str) -> None:
        if self._showing or key in self._shown or QApplication.instance() is None:
            return
        self._shown.add(key)
        details = f"The details were written to {written}." if written else "The details could not be written."
        text = (f"An error escaped where Cachet did not expect one:\n\n{summary}\n\nYour chats and messages are "
                f"kept, and Cachet goes on; what was being done when it happened may not have finished. {details}")
        self._showing = True
        try:
            box = QMessageBox(QMessageBox.Icon.Critical, TITLE, text, parent=self.parent_window())
            box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.reported.emit(summary, text)
            box.exec()
        finally:
            self._showing = False
