"""What the window and its engine worker say to each other: the requests the GUI thread sends
(`TurnRequest`, `OpenChat`, `CacheChange`, `Budgets`) and what comes back — the engine's own
reports (engine/reports.py, re-exported here) plus the two events only a streaming GUI needs
(`TurnStarted`, `TokenDelta`). All are small frozen dataclasses; none imports torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.reports import (  # noqa: F401  (re-exported: the worker's answers)
    Budgets,
    CacheRestored,
    CacheState,
    ModelInfo,
    RebuildDone,
    TurnDone,
    TurnStats,
)
from engine.store import ChatSettings, StoredMessage

if TYPE_CHECKING:
    from engine.models import LoadedModel

Loader = Callable[..., "LoadedModel"]  # may take a `progress` keyword; runs in the worker thread


@dataclass(frozen=True)
class TurnRequest:
    """Answer a chat as it stands: `history` is the chat after the user's action (the store has it).

    `stop` is set by the GUI thread to stop the turn (before it starts, or at its next token).
    """

    turn_id: int
    chat_id: int
    history: tuple[StoredMessage, ...]
    settings: ChatSettings
    stop: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


@dataclass(frozen=True)
class OpenChat:
    """The user opened a chat: bring its cache back to the device before the next message.

    seq: set by the client; an opening overtaken by a later one is skipped.
    """

    chat_id: int
    history: tuple[StoredMessage, ...]
    settings: ChatSettings
    seq: int = 0


@dataclass(frozen=True)
class CacheChange:
    """Switch a chat's cache strategy to `settings.cache`; the worker converts or rebuilds its cache."""

    chat_id: int
    history: tuple[StoredMessage, ...]
    settings: ChatSettings


@dataclass(frozen=True)
class TurnStarted:
    chat_id: int
    turn_id: int


@dataclass(frozen=True)
class TokenDelta:
    """Text streamed into a reply. restart: the reply starts over (a retry) and `text` replaces it."""

    chat_id: int
    turn_id: int
    text: str
    restart: bool = False


@dataclass(frozen=True)
class ServeRequest:
    """Start (port set) or stop (port None) the local OpenAI-compatible server on the window's model."""

    port: int | None


@dataclass(frozen=True)
class ServerState:
    """Where the local server stands. `stats` is the live counter object (engine.server.ServerStats,
    read from any thread) while it runs; `error` says why it is not running when it should be."""

    running: bool
    url: str = ""
    error: str | None = None
    stats: Any = field(default=None, compare=False, repr=False)
