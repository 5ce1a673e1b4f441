"""`cachet --self-test`: an installed or frozen Cachet checks itself end to end, then exits.

It opens the real window, checks that the files shipped with the app were found (the style sheet
is applied, the measured cache costs are readable), loads the configured model (the bundled one
by default), answers one message, reads the stored reply back through a second connection to the
chat database, and exits 0. Any failure (the model does not load, the reply fails, an error dialog
opens, nothing happens within the time limit) prints `cachet-self-test: FAILED: <reason>` to stderr
and exits 1. `packaging/build.py --smoke` runs it on the frozen build, and packaging/check_wheel.py
(run by tests/test_packaging.py) on a wheel installed outside the checkout. Progress lines go to
stdout, prefixed `cachet-self-test:`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox

from app.main_window import MainWindow
from engine.store import ChatStore

MESSAGE = "What is the capital of France? Answer in one sentence."
TIMEOUT_S = 600.0  # the first start of a source install converts the model (~40 s here); a slow disk more


class SelfTest(QObject):
    """Drives one window through start, model load and one reply; `result` is the exit code."""

    def __init__(self, window: MainWindow, started: float, timeout_s: float = TIMEOUT_S,
                 message: str = MESSAGE) -> None:
        super().__init__(window)
        self.window = window
        self.started = started
        self.message = message
        self.result: int | None = None
        self.chat_id: int | None = None
        self._sent_at = 0.0
        self._watchdog = QTimer(self)
        self._watchdog.setSingleShot(True)
        self._watchdog.timeout.connect(lambda: self.fail(f"no answer within {timeout_s:.0f} s"))
        self._watchdog.start(int(timeout_s * 1000))
        app = QApplication.instance()
        if app is not None:
            app.installEventFilter(self)  # an error dialog would wait for a click forever
        window.engine.model_ready.connect(self._model_ready)
        window.engine.model_failed.connect(lambda message: self.fail(f"the model did not load: {message}"))
        window.controller.turn_finished.connect(self._turn_finished)

    def say(self, text: str) -> None:
        print(f"cachet-self-test: {text}", flush=True)

    def elapsed(self) -> str:
        return f"{time.time() - self.started:.2f} s"

    def start(self) -> None:
        """Check the shipped files and send the message (call once the engine is started)."""
        self.say(f"window shown after {self.elapsed()}")
        app = QApplication.instance()
        sheet = app.styleSheet() if isinstance(app, QApplication) else ""
        if "#chatHeader" not in sheet:  # a rule of resources/cachet.qss
            self.fail("the style sheet was not applied")
            return
        from engine.caches import CacheSpec, quantization_defaults  # imports torch: not before the window is up
        from engine.caches.fidelity import measured_cost

        if measured_cost(CacheSpec("quantized", **quantization_defaults(4))) is None:
            self.fail("the measured cache costs (resources/fidelity.json) were not found")
            return
        self.say("style sheet applied, measured cache costs found")
        self.chat_id = self.window.new_chat()
        if self.chat_id is not None:  # greedy: the same, checkable answer on every machine and start
            settings = self.window.store.chat(self.chat_id).settings
            self.window.controller.set_settings(self.chat_id, replace(
                settings, sampling=replace(settings.sampling, temperature=0.0)))
        self._sent_at = time.time()
        self.window.send(self.message)

    def _model_ready(self, model: object) -> None:
        self.say(f"model {getattr(model, 'name', '?')} ready after {self.elapsed()}")

    def _turn_finished(self, chat_id: int) -> None:
        if chat_id != self.chat_id or self.result is not None:
            return
        messages = self.window.store.messages(chat_id)
        if len(messages) != 2 or messages[1].role != "assistant" or messages[1].status != "done" \
                or not messages[1].content.strip():
            notices = "; ".join(n.text for n in self.window.controller.runtime(chat_id).notices)
            self.fail(f"the reply did not complete ({[(m.role, m.status) for m in messages]}) {notices}".strip())
            return
        # Stored, not only shown: a second connection sees the committed reply.
        second = ChatStore(self.window.store.path)
        try:
            stored = [(m.role, m.content) for m in second.messages(chat_id)]
        finally:
            second.close()
        if stored != [("user", self.message), ("assistant", messages[1].content)]:
            self.fail(f"the stored chat differs from the one shown: {stored!r}")
            return
        self.say(f"reply after {time.time() - self._sent_at:.2f} s: {messages[1].content.strip()!r}")
        self.say(f"ok ({self.elapsed()} in all)")
        self.finish(0)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Show and isinstance(watched, QMessageBox):
            self.fail(f"an error dialog opened: {watched.text()}")
            QTimer.singleShot(0, watched.reject)
        return False

    def fail(self, reason: str) -> None:
        if self.result is None:
            print(f"cachet-self-test: FAILED: {reason}", file=sys.stderr, flush=True)
            self.finish(1)

    def finish(self, code: int) -> None:
        self.result = code
        self._watchdog.stop()
        app = QApplication.instance()
        if app is not None:
            app.removeEventFilter(self)
        self.window.close()  # stops the worker and stores what it must, as a user's quit does
        QApplication.exit(code)
