"""Asking before a large GGUF is converted: how much disk its copy takes, where, what is free, and
"convert at every start" to keep nothing on disk (issue 15 §2). The answer is kept per model path in
AppConfig.gguf_conversion, so each model is asked about once.

Torch-free: the size comes from the GGUF header (engine/conversion.py); whether a copy already exists
needs the file's SHA-256, computed here the first time (remembered, and the load needs it anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

from app.config import AppConfig
from app.texts import human_bytes
from engine import conversion
from engine.gguf_header import GGUFHeaderError
from engine.sources import ModelLoadError, resolve

ASK_ABOVE_BYTES = 2 * 1024**3  # a converted copy larger than this is made only after the user agreed
ONCE, EVERY_START = "once", "every_start"


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


def question_for(config: AppConfig) -> ConversionQuestion | None:
    """The question to ask before loading `config`'s model, or None: not a local GGUF, already answered,
    a copy exists, it is small, or the file cannot be read (the load then says why)."""
    if config.engine_source != "local" or config.model.strip() in config.gguf_conversion:
        return None
    try:
        source = resolve(config.model)
    except ModelLoadError:
        return None
    if source.kind != "gguf":
        return None
    gguf = Path(source.location)
    try:
        if conversion.converted_bytes(gguf) <= ASK_ABOVE_BYTES:
            return None
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)  # hashing a multi-GB file the first time
        try:
            need = conversion.conversion_need(gguf)
        finally:
            QApplication.restoreOverrideCursor()
    except (GGUFHeaderError, OSError):
        return None
    if need is None:
        return None
    temporary = conversion.temporary_dir()
    return ConversionQuestion(source.display_name, need, temporary, conversion.free_disk(temporary))


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

