"""What the window does with chats, independent of any widget: it persists every message as soon
as it exists, sends turns to the engine worker, and keeps each chat's live state (queued,
generating, the reply streaming in, notices, where its cache is) and its messages in memory, so
that the window redraws without reading the database again.

Streaming replies are written to the store when their first token arrives and then at most
every `FLUSH_EVERY_S`, so a crash loses at most that much of a reply; the store marks such a
reply "interrupted" on the next start.

A write that fails (a full disk, a folder gone read-only) loses nothing either: the change is
applied in memory at once and queued, the chat stays usable, `save_problem` says what is wrong,
and the queue is written, in order, as soon as the store accepts writes again (retried every
`RETRY_MS`).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal, Slot

from app.client import EngineClient
from app.config import AppConfig
from app.protocol import (
    CacheChange,
    CacheRestored,
    CacheState,
    OpenChat,
    RebuildDone,
    TokenDelta,
    TurnDone,
    TurnRequest,
    TurnStarted,
)
from app.texts import human_bytes
from engine.specs import OVERFLOW_POLICIES, CacheSpec, SamplingSettings
from engine.store import (
    ChatSettings,
    ChatStore,
    ImportedChat,
    StoredMessage,
    StoreError,
    StoreWriteError,
    load_import,
)

FLUSH_EVERY_S = 0.5
RETRY_MS = 2000  # how often changes that could not be written are tried again
NEAR_CONTEXT = 0.85  # warn once a chat uses this share of the model's context

POLICY_PLANS = {  # "When this chat is full, Cachet will …"
    "stop": "stop and ask",
    "truncate-middle": "leave the oldest turns after the first exchange out of the model's view",
    "sink": "continue with attention sinks (the oldest middle of the chat is forgotten)",
}
POLICY_LABELS = {
    "stop": "Stop here",
    "truncate-middle": "Truncate the middle",
    "sink": "Continue with attention sinks",
}


@dataclass(frozen=True)
class NoticeAction:
    key: str  # e.g. "overflow:sink"
    label: str
    disabled_reason: str | None = None


@dataclass(frozen=True)
class Notice:
    """A line shown at the end of a chat that is not a message: errors, warnings, progress."""

    kind: str  # "info" | "warning" | "error"
    text: str
    actions: tuple[NoticeAction, ...] = ()


@dataclass(frozen=True)
class ImportOutcome:
    """How the import of one file ended: the chat made from it, or why there is none (a sentence)."""

    path: Path
    imported: ImportedChat | None = None
    error: str | None = None


@dataclass
class ChatRuntime:
    state: str = "idle"  # "idle" | "queued" | "generating" | "rebuilding"
    turn_id: int | None = None
    reply_id: int | None = None  # the store row of the reply streaming in
    text: str = ""
    flushed_at: float = 0.0
    notices: list[Notice] = field(default_factory=list)
    cache: CacheState | None = None
    restore: CacheRestored | None = None  # where the cache came from when the chat was last made active
    last_stats: dict[str, object] | None = None  # the last reply's figures, as stored with it
    rebuild_from: CacheSpec | None = None  # the cache settings to go back to if a rebuild fails
    messages: list[StoredMessage] | None = None  # as in the store; None until first read

    @property
    def busy(self) -> bool:
        return self.state != "idle"


@dataclass
class PendingWrite:
    """A change to a chat's messages the store refused (disk full...), kept until it can be written.

    kind "add": `message` is the message as shown, under a temporary negative id until stored;
    "update": `changes` for message `message_id`; "truncate": from `position` on.
    """

    kind: str
    chat_id: int
    message_id: int = 0
    message: StoredMessage | None = None
    changes: dict[str, object] = field(default_factory=dict)
    position: int = 0


class ChatController(QObject):
    """Signals:
        chats_changed(): chats were added, removed or renamed (the list is read again).
        chat_touched(int): a chat's title, activity or settings changed (its entry is redrawn).
        messages_changed(int): a chat's messages were added, removed or finished.
        stream_changed(int): the reply streaming into a chat grew.
        state_changed(int): a chat's state or notices changed.
        cache_changed(int): where a chat's cache is, or its size, changed.
        turn_finished(int): a turn ended and its reply is stored.
        rebuild_finished(int): a cache strategy switch ended (see the chat's notices).
        save_state_changed(): writing to the store started or stopped failing (see `save_problem`).
        write_failed(str): a change that is not kept for a retry (a rename, new settings) could not be saved.
        import_finished(ImportOutcome): a file given to `start_import` was read and stored (or refused).
    """

    chats_changed = Signal()
    chat_touched = Signal(int)
    messages_changed = Signal(int)
    stream_changed = Signal(int)
    state_changed = Signal(int)
    cache_changed = Signal(int)
    turn_finished = Signal(int)
    rebuild_finished = Signal(int)
    save_state_changed = Signal()
    write_failed = Signal(str)
    import_finished = Signal(object)
    _import_read = Signal(object, object)  # (path, JSON or the exception): from the reading thread, queued here

    def __init__(self, store: ChatStore, engine: EngineClient, config: AppConfig,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.store = store
        self.engine = engine
        self.config = config
        self.runtimes: dict[int, ChatRuntime] = {}
        self.last_deleted: int | None = None
        self._turn_ids = itertools.count(1)
        self.unsaved: list[PendingWrite] = []  # in order; written by `flush_unsaved`
        self.save_problem: str | None = None  # why they are not written yet, for the user
        self._temp_ids = itertools.count(-1, -1)
        self._retry = QTimer(self)
        self._retry.setInterval(RETRY_MS)
        self._retry.timeout.connect(self.flush_unsaved)
        engine.turn_started.connect(self._on_turn_started)
        engine.token_delta.connect(self._on_delta)
        engine.turn_done.connect(self._on_turn_done)
        engine.cache_state.connect(self._on_cache_state)
        engine.cache_restored.connect(self._on_cache_restored)
        engine.rebuild_done.connect(self._on_rebuild_done)
        self._import_read.connect(self._store_import)

    def runtime(self, chat_id: int) -> ChatRuntime:
        return self.runtimes.setdefault(chat_id, ChatRuntime())

    def messages(self, chat_id: int) -> list[StoredMessage]:
        """The chat's messages as stored, read from the database once and kept in step since."""
        rt = self.runtime(chat_id)
        if rt.messages is None:
            rt.messages = self.store.messages(chat_id)
        return rt.messages

    def reload(self, chat_id: int) -> list[StoredMessage]:
        """Read a chat's messages from the database again (opening a chat: another window or an
        import may have written them)."""
        self.runtime(chat_id).messages = None
        return self.messages(chat_id)

    def last_stats(self, chat_id: int) -> dict[str, object] | None:
        """The chat's last reply's figures: from this run, else as stored with the reply."""
        rt = self.runtime(chat_id)
        if not rt.last_stats:
            reply = next((m for m in reversed(self.messages(chat_id)) if m.role == "assistant" and m.stats), None)
            rt.last_stats = dict(reply.stats) if reply is not None and reply.stats else None
        return dict(rt.last_stats) if rt.last_stats else None

    # ----- keeping the in-memory messages in step with the store ---------------------------------
    def _add(self, chat_id: int, role: str, content: str, *, status: str = "done",
             token_ids: Sequence[int] | None = None, tokens: int | None = None,
             stats: dict[str, object] | None = None) -> StoredMessage:
        messages = self.messages(chat_id)
        if not self.unsaved:
            try:
                message = self.store.add_message(chat_id, role, content, status=status, token_ids=token_ids,
                                                 tokens=tokens, stats=stats)
            except StoreWriteError as exc:
                self._failed(exc)
            else:
                messages.append(message)
                return message
        message = StoredMessage(id=next(self._temp_ids), chat_id=chat_id,
                                position=messages[-1].position + 1 if messages else 0, role=role, content=content,
                                status=status, token_ids=tuple(token_ids) if token_ids is not None else None,
                                tokens=tokens, stats=dict(stats) if stats is not None else None,
                                created_at=time.time())
        self.unsaved.append(PendingWrite("add", chat_id, message.id, message))
        messages.append(message)
        return message

    def _update(self, chat_id: int, message_id: int, *, content: str | None = None, status: str | None = None,
                token_ids: Sequence[int] | None = None, tokens: int | None = None,
                stats: dict[str, object] | None = None) -> None:
        changes: dict[str, object] = {k: v for k, v in (("content", content), ("status", status),
                                                        ("token_ids", token_ids), ("tokens", tokens),
                                                        ("stats", stats)) if v is not None}
        message: StoredMessage | None = None
        if not self.unsaved:
            try:
                message = self.store.update_message(message_id, content=content, status=status,
                                                    token_ids=token_ids, tokens=tokens, stats=stats)
            except StoreWriteError as exc:
                self._failed(exc)
            else:
                self._replace_message(chat_id, message_id, message)
                return
        self._queue_update(chat_id, message_id, changes)
        old = next((m for m in self.runtime(chat_id).messages or () if m.id == message_id), None)
        if old is not None:
            shown = {**changes}
            if "token_ids" in shown:
                shown["token_ids"] = tuple(token_ids or ())
            self._replace_message(chat_id, message_id, replace(old, **shown))  # type: ignore[arg-type]

    def _queue_update(self, chat_id: int, message_id: int, changes: dict[str, object]) -> None:
        """Queue `changes`, folded into a queued write of the same message (a streaming reply
        grows one queued row, not a queue of every token)."""
        for pending in reversed(self.unsaved):
            if pending.chat_id != chat_id or pending.kind == "truncate":
                break
            if pending.kind == "add" and pending.message is not None and pending.message_id == message_id:
                fixed = {**changes}
                if "token_ids" in fixed:
                    fixed["token_ids"] = tuple(fixed["token_ids"])  # type: ignore[arg-type]
                pending.message = replace(pending.message, **fixed)  # type: ignore[arg-type]
                return
            if pending.kind == "update" and pending.message_id == message_id:
                pending.changes.update(changes)
                return
        self.unsaved.append(PendingWrite("update", chat_id, message_id, changes=dict(changes)))

    def _replace_message(self, chat_id: int, message_id: int, message: StoredMessage | None) -> None:
        messages = self.runtime(chat_id).messages
        if message is not None and messages is not None:
            for i, old in enumerate(messages):
                if old.id == message_id:
                    messages[i] = message

    def _truncate(self, chat_id: int, position: int) -> None:
        if not self.unsaved:
            try:
                self.store.truncate(chat_id, position)
            except StoreWriteError as exc:
                self._failed(exc)
                self.unsaved.append(PendingWrite("truncate", chat_id, position=position))
        else:
            self.unsaved.append(PendingWrite("truncate", chat_id, position=position))
        self.runtime(chat_id).messages = [m for m in self.messages(chat_id) if m.position < position]

    def _failed(self, exc: StoreWriteError) -> None:
        """A message write failed: say so, and retry until the store takes it."""
        self.save_problem = (f"{exc} Disk full: the reply is kept in memory and will be saved when space is "
                             "free." if exc.disk_full else f"{exc} The chat is kept in memory and will be saved "
                             "as soon as the database accepts it again.")
        if not self._retry.isActive():
            self._retry.start()
        self.save_state_changed.emit()

    def flush_unsaved(self) -> bool:
        """Write what the store refused, in order; True when nothing is left unsaved."""
        touched: set[int] = set()
        ids: dict[int, int] = {}  # temporary id -> stored id
        while self.unsaved:
            pending = self.unsaved[0]
            try:
                if pending.kind == "add" and pending.message is not None:
                    m = pending.message
                    stored = self.store.add_message(m.chat_id, m.role, m.content, status=m.status,
                                                    token_ids=m.token_ids, tokens=m.tokens, stats=m.stats)
                    ids[m.id] = stored.id
                    self._replace_message(m.chat_id, m.id, stored)
                    rt = self.runtimes.get(m.chat_id)
                    if rt is not None and rt.reply_id == m.id:
                        rt.reply_id = stored.id
                elif pending.kind == "update":
                    target = ids.get(pending.message_id, pending.message_id)
                    c = pending.changes
                    updated = self.store.update_message(
                        target, content=c.get("content"), status=c.get("status"),  # type: ignore[arg-type]
                        token_ids=c.get("token_ids"), tokens=c.get("tokens"),  # type: ignore[arg-type]
                        stats=c.get("stats"))  # type: ignore[arg-type]
                    self._replace_message(pending.chat_id, target, updated)
                elif pending.kind == "truncate":
                    self.store.truncate(pending.chat_id, pending.position)
            except StoreWriteError as exc:
                if ids:  # a later update may refer to an add written now
                    for later in self.unsaved:
                        later.message_id = ids.get(later.message_id, later.message_id)
                self._failed(exc)
                return False
            except KeyError:
                pass  # the chat was deleted for good meanwhile
            self.unsaved.pop(0)
            touched.add(pending.chat_id)
        self._retry.stop()
        self.save_problem = None
        self.save_state_changed.emit()
        for chat_id in touched:
            self.chat_touched.emit(chat_id)
            self.messages_changed.emit(chat_id)
        return True

    def _try(self, write: object, what: str) -> bool:
        """Run a write that is not queued for a retry (settings, titles): False, and `write_failed`
        with the reason, when the store refuses it."""
        try:
            write()  # type: ignore[operator]
        except StoreWriteError as exc:
            self.write_failed.emit(f"Could not save {what}: {exc}")
            return False
        return True

    # ----- chats ---------------------------------------------------------------------------------
    def new_settings(self) -> ChatSettings:
        """What a new chat starts with: the defaults of the global settings."""
        return ChatSettings(system_prompt=self.config.default_system_prompt,
                            sampling=SamplingSettings.from_dict(self.config.default_sampling),
                            cache=CacheSpec.from_dict(self.config.default_cache))

    def new_chat(self) -> int | None:
        """A new chat's id; None (and `write_failed`) when the store cannot create one."""
        try:
            chat = self.store.create_chat(self.new_settings())
        except StoreWriteError as exc:
            self.write_failed.emit(f"Could not start a new chat: {exc}")
            return None
        self.chats_changed.emit()
        return chat.id

    def open_chat(self, chat_id: int) -> None:
        """The user opened a chat: have the worker bring its cache back now, not at the next message."""
        if not self.engine.ready or self.runtime(chat_id).busy or not self._exists(chat_id):
            return
        messages = self.messages(chat_id)
        if messages:
            self.engine.open_chat(OpenChat(chat_id, tuple(messages), self.store.chat(chat_id).settings))

    def rename(self, chat_id: int, title: str) -> None:
        self._try(lambda: self.store.rename(chat_id, title), "the new title")
        self.chat_touched.emit(chat_id)

    def delete(self, chat_id: int) -> None:
        """Hide the chat (undo brings it back until the app quits) and free its cache."""
        self.stop(chat_id)
        rt = self.runtimes.get(chat_id)
        if rt is not None and rt.reply_id is not None:
            # The turn's end will not reach a deleted chat: settle its reply now (undo brings it back).
            self._update(chat_id, rt.reply_id, content=rt.text, status="stopped")
        if not self._try(lambda: self.store.delete_chat(chat_id), "the deletion"):
            return
        self.engine.forget(chat_id)
        self.runtimes.pop(chat_id, None)
        self.last_deleted = chat_id
        self.chats_changed.emit()

    def undo_delete(self) -> int | None:
        chat_id, self.last_deleted = self.last_deleted, None
        if chat_id is not None:
            self._try(lambda: self.store.restore_chat(chat_id), "the restored chat")
            self.chats_changed.emit()
        return chat_id

    def settle_streaming(self) -> None:
        """The app quits: keep every reply still streaming as it stands, marked stopped."""
        for chat_id, rt in self.runtimes.items():
            if rt.reply_id is not None:
                self._update(chat_id, rt.reply_id, content=rt.text, status="stopped")
            rt.state, rt.turn_id, rt.reply_id = "idle", None, None

    def set_settings(self, chat_id: int, settings: ChatSettings) -> None:
        """Store new chat settings; a different cache strategy makes the worker rebuild the cache."""
        old = self.store.chat(chat_id).settings
        if not self._try(lambda: self.store.set_settings(chat_id, settings), "the chat's settings"):
            return
        self.chat_touched.emit(chat_id)
        rt = self.runtime(chat_id)
        auto = self.engine.model.auto_cache if self.engine.model else None
        if (old.cache.resolve(auto) == settings.cache.resolve(auto) or not self.engine.ready
                or rt.busy):
            return
        rt.state = "rebuilding"
        rt.rebuild_from = old.cache
        rt.notices = [Notice("info", f"Switching this chat's cache to “{settings.cache.resolve(auto).strategy}”…")]
        self.state_changed.emit(chat_id)
        self.engine.change_cache(CacheChange(chat_id, tuple(self.messages(chat_id)), settings))

    # ----- turns ---------------------------------------------------------------------------------
    def send(self, chat_id: int, text: str) -> bool:
        """Store the user's message (committed before anything is generated) and ask for a reply."""
        text = text.strip()
        if not text or self.runtime(chat_id).busy:
            return False
        self._add(chat_id, "user", text)
        self.chat_touched.emit(chat_id)
        self._start_turn(chat_id)
        return True

    def regenerate(self, chat_id: int) -> bool:
        """Replace the last reply (or answer a last user message that has none)."""
        messages = self.messages(chat_id)
        if not messages or self.runtime(chat_id).busy:
            return False
        if messages[-1].role == "assistant":
            self._truncate(chat_id, messages[-1].position)
        self._start_turn(chat_id)
        return True

    def edit(self, chat_id: int, position: int, text: str) -> bool:
        """Replace user message `position`, drop what followed it, and answer it again."""
        text = text.strip()
        messages = self.messages(chat_id)
        if (not text or self.runtime(chat_id).busy or not 0 <= position < len(messages)
                or messages[position].role != "user"):
            return False
        self._truncate(chat_id, position)
        self._add(chat_id, "user", text)
        self.chat_touched.emit(chat_id)
        self._start_turn(chat_id)
        return True

    def stop(self, chat_id: int) -> None:
        rt = self.runtimes.get(chat_id)
        if rt is not None and rt.turn_id is not None:
            self.engine.cancel(rt.turn_id)

    def act(self, chat_id: int, key: str) -> None:
        """A notice's button was pressed."""
        if key.startswith("when-full:"):  # chosen ahead of time: applied when the context is full
            policy = key.split(":", 1)[1]
            chat = self.store.chat(chat_id)
            if not self._try(lambda: self.store.set_settings(chat_id, replace(chat.settings, overflow=policy)),
                             "the chat's settings"):
                return
            self.runtime(chat_id).notices = [Notice("info", f"When this chat is full, Cachet will "
                                                            f"{POLICY_PLANS.get(policy, policy)}.")]
            self.state_changed.emit(chat_id)
            self.chat_touched.emit(chat_id)
            return
        if key.startswith("overflow:"):
            policy = key.split(":", 1)[1]
            rt = self.runtime(chat_id)
            if policy == "stop":
                rt.notices = [Notice("info", "Stopped. Start a new chat, or edit an earlier message to shorten "
                                             "this one.")]
                self.state_changed.emit(chat_id)
            elif not rt.busy:
                # the choice is kept with the chat: later turns apply it without asking again
                chat = self.store.chat(chat_id)
                self._try(lambda: self.store.set_settings(chat_id, replace(chat.settings, overflow=policy)),
                          "the chat's settings")
                self._start_turn(chat_id)

    def _start_turn(self, chat_id: int) -> None:
        """Have the worker answer the chat as it stands now."""
        rt = self.runtime(chat_id)
        rt.state = "queued"
        rt.turn_id = next(self._turn_ids)
        rt.reply_id = None
        rt.text = ""
        rt.notices = []
        self.messages_changed.emit(chat_id)
        self.state_changed.emit(chat_id)
        self.engine.run_turn(TurnRequest(rt.turn_id, chat_id, tuple(self.messages(chat_id)),
                                         self.store.chat(chat_id).settings))

    @Slot(object)
    def _on_turn_started(self, event: TurnStarted) -> None:
        rt = self.runtimes.get(event.chat_id)
        if rt is not None and rt.turn_id == event.turn_id:
            rt.state = "generating"
            self.state_changed.emit(event.chat_id)

    @Slot(object)
    def _on_delta(self, delta: TokenDelta) -> None:
        rt = self.runtimes.get(delta.chat_id)
        if rt is None or rt.turn_id != delta.turn_id:
            return
        if delta.restart:  # the worker writes the reply again (after running out of memory)
            rt.text = delta.text
            if rt.reply_id is not None:
                self._update(delta.chat_id, rt.reply_id, content=rt.text)
            self.stream_changed.emit(delta.chat_id)
            return
        rt.text += delta.text
        now = time.monotonic()
        if rt.reply_id is None:
            rt.reply_id = self._add(delta.chat_id, "assistant", rt.text, status="streaming").id
            rt.flushed_at = now
            self.messages_changed.emit(delta.chat_id)
        elif now - rt.flushed_at >= FLUSH_EVERY_S:
            self._update(delta.chat_id, rt.reply_id, content=rt.text)
            rt.flushed_at = now
        self.stream_changed.emit(delta.chat_id)

    @Slot(object)
    def _on_turn_done(self, done: TurnDone) -> None:
        rt = self.runtimes.get(done.chat_id)
        if rt is None or rt.turn_id != done.turn_id:
            return  # the chat was deleted meanwhile
        status = {"stop": "done", "length": "done", "cancelled": "stopped"}.get(done.finish_reason, "error")
        if done.cache is not None and self._exists(done.chat_id):  # the engine switched the strategy
            chat = self.store.chat(done.chat_id)
            cache = done.cache
            self._try(lambda: self.store.set_settings(done.chat_id, replace(chat.settings, cache=cache)),
                      "the chat's new cache strategy")
        stats = None
        if done.stats is not None:  # stored with the reply: the figures a reply's hover and the meters show
            stats = {**done.stats.to_dict(), "restore": done.restore.to_dict() if done.restore else None}
        if done.has_reply:
            if rt.reply_id is not None:
                self._update(done.chat_id, rt.reply_id, content=done.reply, status=status, token_ids=done.token_ids,
                             tokens=len(done.token_ids), stats=stats)
            else:
                self._add(done.chat_id, "assistant", done.reply, status=status, token_ids=done.token_ids,
                          tokens=len(done.token_ids), stats=stats)
        elif rt.reply_id is not None:
            self._update(done.chat_id, rt.reply_id, content=rt.text, status=status)
        if done.stats is not None and done.stats.user_tokens is not None:
            last_user = next((m for m in reversed(self.messages(done.chat_id)) if m.role == "user"), None)
            if last_user is not None:
                self._update(done.chat_id, last_user.id, tokens=done.stats.user_tokens)
        rt.notices = self._notices_for(done)
        if done.notice:
            rt.notices.insert(0, Notice("info", done.notice))
        rt.state, rt.turn_id, rt.reply_id, rt.text = "idle", None, None, ""
        if stats is not None:
            rt.last_stats = stats
        self.messages_changed.emit(done.chat_id)
        self.state_changed.emit(done.chat_id)
        self.chat_touched.emit(done.chat_id)
        self.turn_finished.emit(done.chat_id)

    def near_context_notice(self, chat_id: int, stats: dict[str, object] | None) -> Notice | None:
        """The warning for a chat whose last turn used most of the model's context, with the
        overflow policies to choose ahead of time; None when it is not near the limit."""
        model = self.engine.model
        if not stats or model is None or not model.context_length:
            return None
        used = _count(stats, "prompt_tokens") + _count(stats, "generated_tokens")
        if used < NEAR_CONTEXT * model.context_length:
            return None
        current = self.store.chat(chat_id).settings.overflow if self._exists(chat_id) else "stop"
        actions = tuple(NoticeAction(f"when-full:{p}", POLICY_LABELS[p]) for p in OVERFLOW_POLICIES if p != current)
        return Notice("warning", f"This chat uses {used:,} of the model's {model.context_length:,} tokens of context. "
                                 f"When it is full, Cachet will {POLICY_PLANS.get(current, 'stop and ask')} — "
                                 "or choose now:", actions)

    def _notices_for(self, done: TurnDone) -> list[Notice]:
        if done.finish_reason == "overflow":
            actions = tuple(NoticeAction(f"overflow:{p}", POLICY_LABELS[p]) for p in OVERFLOW_POLICIES)
            return [Notice("warning", f"This chat no longer fits the model's context: {done.error}", actions)]
        if done.finish_reason == "error":
            return [Notice("error", f"The reply failed: {done.error}")]
        if done.finish_reason == "cancelled" and not done.has_reply:
            return [Notice("info", "Stopped before the first token.")]
        notices = []
        if done.stats is not None and done.stats.overflow_action:
            notices.append(Notice("info", f"The chat outgrew the model's context, so Cachet "
                                          f"{done.stats.overflow_action}."))
        near = self.near_context_notice(done.chat_id, done.stats.to_dict() if done.stats else None)
        if near is not None:
            notices.append(near)
        if done.finish_reason == "length":
            notices.append(Notice("info", "The reply reached the “max new tokens” limit of this chat."))
        return notices

    @Slot(object)
    def _on_cache_state(self, state: CacheState) -> None:
        if state.chat_id in self.runtimes or self._exists(state.chat_id):
            self.runtime(state.chat_id).cache = state
            self.cache_changed.emit(state.chat_id)

    @Slot(object)
    def _on_cache_restored(self, event: CacheRestored) -> None:
        if event.chat_id in self.runtimes or self._exists(event.chat_id):
            self.runtime(event.chat_id).restore = event

    @Slot(object)
    def _on_rebuild_done(self, done: RebuildDone) -> None:
        rt = self.runtime(done.chat_id)
        auto = self.engine.model.auto_cache if self.engine.model else None
        strategy = done.cache.resolve(auto).strategy
        if done.ok:
            verb = "converted to" if done.how == "converted" else "rebuilt as"
            rt.notices = [Notice("info", f"Cache {verb} “{strategy}”: {done.tokens:,} tokens, "
                                         f"{human_bytes(done.bytes)}, in {done.seconds:.1f} s.")]
        else:
            if rt.rebuild_from is not None and self._exists(done.chat_id):
                chat = self.store.chat(done.chat_id)
                previous = rt.rebuild_from
                self._try(lambda: self.store.set_settings(done.chat_id, replace(chat.settings, cache=previous)),
                          "the chat's cache settings")
            rt.notices = [Notice("error", f"Could not switch the cache to “{strategy}”: {done.error} "
                                          "The chat keeps its previous cache settings.")]
        rt.state = "idle"
        rt.rebuild_from = None
        self.state_changed.emit(done.chat_id)
        self.chat_touched.emit(done.chat_id)
        self.rebuild_finished.emit(done.chat_id)

    def _exists(self, chat_id: int) -> bool:
        try:
            self.store.chat(chat_id)
        except KeyError:
            return False
        return True

    # ----- files ---------------------------------------------------------------------------------
    def export_json(self, chat_id: int, path: Path) -> None:
        _atomic_write(path, json.dumps(self.store.export_json(chat_id), indent=2, ensure_ascii=False))

    def export_markdown(self, chat_id: int, path: Path) -> None:
        _atomic_write(path, self.store.export_markdown(chat_id))

    def import_chat(self, path: Path) -> ImportedChat:
        """Import a chat file, checked completely first (engine.store.load_import, import_chat);
        raises StoreError with a message for the user. The result lists settings that were reset."""
        imported = self.store.import_chat(load_import(path))
        self.chats_changed.emit()
        return imported

    def start_import(self, path: Path) -> None:
        """Import a chat file without holding up the GUI thread: the file is read and parsed in a thread
        (engine.store.load_import: bounded, regular files only), the chat stored on this thread (the store's),
        then `import_finished` says how it went."""
        delivered = self._import_read

        def read() -> None:
            try:
                result: object = load_import(path)
            except Exception as exc:  # told in the import's dialog, not lost in a thread
                result = exc
            with suppress(RuntimeError):  # the window closed meanwhile
                delivered.emit(path, result)

        threading.Thread(target=read, name="cachet-import", daemon=True).start()

    @Slot(object, object)
    def _store_import(self, path: Path, result: object) -> None:
        if isinstance(result, BaseException):
            reason = str(result) if isinstance(result, StoreError) else \
                f"Cannot read {path}: {type(result).__name__}: {result}."
            self.import_finished.emit(ImportOutcome(path, error=reason))
            return
        try:
            imported = self.store.import_chat(result)
        except StoreError as exc:
            self.import_finished.emit(ImportOutcome(path, error=str(exc)))
            return
        self.chats_changed.emit()
        self.import_finished.emit(ImportOutcome(path, imported))

    def import_json(self, path: Path) -> int:
        """`import_chat`, returning the new chat's id."""
        return self.import_chat(path).chat.id


def _count(stats: dict[str, object], name: str) -> int:
    value = stats.get(name, 0)
    return int(value) if isinstance(value, int | float) else 0


def _atomic_write(path: Path, text: str) -> None:
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
