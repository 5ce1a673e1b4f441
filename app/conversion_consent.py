"""Asking before a large GGUF is converted: how much disk its copy takes, where, what is free, and
"convert at every start" to keep nothing on disk (issue 15 §2). The answer is kept per model path in
AppConfig.gguf_conversion, so each model is asked about once.

Torch-free: the size comes from the GGUF header (engine/conversion.py); whether a copy already exists
needs the file's SHA-256, computed here the first time (remembered, and the load needs it anyway). That
takes seconds for a file of several GB, so `find_question` works it out in a thread while the window
keeps painting, and says "Checking…" (with Cancel) when it takes longer than a moment.
"""

from __future__ import annotations

import functools
import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEventLoop, QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import QMessageBox, QProgressDialog, QWidget

from app.config import AppConfig
from app.texts import human_bytes
from engine import conversion
from engine.gguf_header import GGUFHeaderError
from engine.sources import ModelLoadError, resolve

ASK_ABOVE_BYTES = 2 * 1024**3  # a converted copy larger than this is made only after the user agreed
ONCE, EVERY_START = "once", "every_start"
CHECKING_SHOWN_AFTER_MS = 300  # a quicker check (the file's hash is remembered) shows nothing


@dataclass(frozen=True)
class ConversionQuestion:
    """What the user is asked about a GGUF without a converted copy."""

    name: str
    need: conversion.ConversionNeed  # the copy's bytes, its folder, and what is free on that disk
    temporary: Path  # where a copy for one start goes (engine.conversion.temporary_dir())
    temporary_free: int

    @property
    def can_keep(self) -> bool:
        return self.need.bytes <= self.need.free_bytes

    @property
    def can_convert_each_start(self) -> bool:
        return self.need.bytes <= self.temporary_free


class CheckCancelled(Exception):
    """The user cancelled the check of whether a GGUF was converted before (so nothing is loaded)."""


def question_for(config: AppConfig) -> ConversionQuestion | None:
    """The question to ask before loading `config`'s model, or None: not a local GGUF, already answered,
    a copy exists, it is small, or the file cannot be read (the load then says why).

    Blocking (the first time it reads the whole file for its hash), and no Qt: `find_question` runs the
    slow part in a thread."""
    gguf = _gguf_to_check(config)
    return None if gguf is None else _question_about(*gguf)


def _gguf_to_check(config: AppConfig) -> tuple[str, Path] | None:
    """The name and file of `config`'s model when it is a local GGUF not answered about yet (quick: no reading)."""
    if config.engine_source != "local" or config.model.strip() in config.gguf_conversion:
        return None
    try:
        source = resolve(config.model)
    except ModelLoadError:
        return None
    if source.kind != "gguf":
        return None
    return source.display_name, Path(source.location)


def _question_about(name: str, gguf: Path) -> ConversionQuestion | None:
    """The question about a GGUF file, or None when its copy is small or exists (reads its header, and
    hashes the whole file the first time)."""
    try:
        if conversion.converted_bytes(gguf) <= ASK_ABOVE_BYTES:
            return None
        need = conversion.conversion_need(gguf)
    except (GGUFHeaderError, OSError):
        return None
    if need is None:
        return None
    temporary = conversion.temporary_dir()
    return ConversionQuestion(name, need, temporary, conversion.free_disk(temporary))


class _Relay(QObject):
    """Lives on the GUI thread for good, so that a check's thread never holds the last reference to a QObject.

    Signals:
        done(list): emitted from a check's thread once its outcome is in that list (queued to the GUI thread).
    """

    done = Signal(object)


@functools.cache
def _relay() -> _Relay:
    return _Relay()  # made on the GUI thread, by the first `find_question`


# The check of each file still under way or ended unseen (GUI thread only): its outcome list, empty while it runs.
_under_way: dict[Path, list[tuple[ConversionQuestion | None, Exception | None]]] = {}


def find_question(parent: QWidget | None, config: AppConfig) -> ConversionQuestion | None:
    """`question_for(config)`, its slow part worked out in a thread, so that hashing a multi-GB file never
    freezes the window.

    The caller waits in an event loop that leaves out clicks and keys (the window still paints); when the
    check takes longer than CHECKING_SHOWN_AFTER_MS, a modal "Checking…" dialog says why, and its Cancel
    raises CheckCancelled (the hashing then ends in the background, and is remembered for the next try)."""
    gguf = _gguf_to_check(config)
    if gguf is None:
        return None
    relay = _relay()
    loop = QEventLoop()
    # A check cancelled a moment ago may still be hashing this file: wait for it rather than read the file twice.
    outcome = _under_way.get(gguf[1])
    fresh = outcome is None or bool(outcome)
    if outcome is None or outcome:
        outcome = []
        _under_way[gguf[1]] = outcome

    def work(outcome: list[tuple[ConversionQuestion | None, Exception | None]]) -> None:
        try:
            outcome.append((_question_about(*gguf), None))
        except Exception as exc:  # raised again on the GUI thread, as if it had run there
            outcome.append((None, exc))
        with suppress(RuntimeError):  # the app quit meanwhile (after a cancelled check)
            relay.done.emit(outcome)

    def finished(which: object) -> None:
        if which is outcome:
            loop.quit()

    relay.done.connect(finished)
    timer = QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(loop.quit)
    try:
        if fresh:
            threading.Thread(target=work, args=(outcome,), name="cachet-conversion-check", daemon=True).start()
        timer.start(CHECKING_SHOWN_AFTER_MS)
        if not outcome:
            loop.exec(QEventLoop.ProcessEventsFlag.ExcludeUserInputEvents)
        timer.stop()
        if not outcome:
                _wait_with_dialog(parent, gguf[0], loop, outcome)
    finally:
        relay.done.disconnect(finished)
    if not outcome:
        raise CheckCancelled(f"checking {config.model.strip()} was cancelled")
    if _under_way.get(gguf[1]) is outcome:
        del _under_way[gguf[1]]
    question, error = outcome[0]
    if error is not None:
        raise error
    return question


def _wait_with_dialog(parent: QWidget | None, name: str, loop: QEventLoop, outcome: list[Any]) -> None:
    """Run `loop` under a modal "Checking…" dialog until the check's outcome is in or the user cancels."""
    dialog = QProgressDialog(f"Checking whether {name} was converted before…\n\nThe first time, Cachet reads the "
                             "whole file once to recognise it, which takes a few seconds for each GB.", "Cancel",
                             0, 0, parent)
    dialog.setWindowTitle(f"Checking {name}")
    dialog.setWindowModality(Qt.WindowModality.WindowModal if parent else Qt.WindowModality.ApplicationModal)
    dialog.setMinimumDuration(0)
    dialog.canceled.connect(loop.quit)
    dialog.finished.connect(loop.quit)  # closed another way (Escape)
    dialog.show()
    if not outcome:
        loop.exec()
    dialog.canceled.disconnect(loop.quit)
    dialog.finished.disconnect(loop.quit)
    dialog.close()
    dialog.deleteLater()


def ask(parent: QWidget | None, question: ConversionQuestion) -> str | None:
    """ONCE, EVERY_START, or None (cancelled). Only what the disks allow is offered, and the text says why."""
    need, name = question.need, question.name
    size, folder, free = human_bytes(need.bytes), need.folder.parent, human_bytes(need.free_bytes)
    each_start = (f"Converting at every start keeps nothing on disk: each start converts it again, which takes "
                  f"longer, using {size} in {question.temporary} ({human_bytes(question.temporary_free)} free) "
                  "only while it loads.")
    if question.can_keep:
        text = f"Opening {name} converts it once into a copy of {size} in {folder} ({free} free)."
        detail = "Later starts read the copy, in seconds. " + each_start
    else:
        text = f"Opening {name} needs a copy of {size} in {folder}, but only {free} is free there."
        detail = each_start if question.can_convert_each_start else (
            f"Converting at every start needs {size} in {question.temporary} too, where "
            f"{human_bytes(question.temporary_free)} is free. Free some disk space, or choose a smaller model.")
    if not question.can_convert_each_start and question.can_keep:
        detail = ("Later starts read the copy, in seconds. Converting at every start is not offered: it needs "
                  f"{size} in {question.temporary}, where {human_bytes(question.temporary_free)} is free.")
    box = QMessageBox(QMessageBox.Icon.Question, f"Convert {name}?", text, parent=parent)
    box.setInformativeText(detail)
    once = box.addButton("Convert once", QMessageBox.ButtonRole.AcceptRole) if question.can_keep else None
    every = (box.addButton("Convert at every start", QMessageBox.ButtonRole.ActionRole)
             if question.can_convert_each_start else None)
    cancel = box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(once or every or cancel)
    box.exec()
    clicked = box.clickedButton()
    if once is not None and clicked is once:
        return ONCE
    if every is not None and clicked is every:
        return EVERY_START
    return None

