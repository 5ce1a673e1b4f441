"""One engine service for every front end: the window's worker, the terminal chat, a script.

`ChatService` owns the loaded model, every chat's `ChatSession`, the `CachePool` that keeps their
caches within the memory budgets (device → RAM → disk snapshots → recomputed), what `auto` means
on this machine, the out-of-memory fallback, and the snapshots written on close. Its methods are
the user's actions: `load_model`, `open_chat`, `run_turn`, `change_cache`, `forget`,
`set_budgets`, `close`. Each turn is "answer this chat as it stands": the caller passes the
chat's messages (a front end keeps them, e.g. in `engine.store`) and its settings, and the
service always calls `ChatSession.generate()`; the session finds what of its cache still
matches.

Not thread-safe, like the sessions it drives: one thread calls it at a time (the window's worker
thread, or the terminal's main thread). A front end that calls it from two threads — the window's
worker and the local server it starts (engine/server.py) — holds `lock` around each call. The
exceptions are `interrupt()` and the `stop` event a turn is given, which any thread may set.
Progress goes out through plain callbacks; results are the frozen dataclasses of `engine.reports`.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from engine import caches, memory, paths
from engine.graphs import validate_graphs
from engine.models import LoadedModel, ModelLoadError
from engine.pool import CachePool
from engine.reports import (
    MIB,
    OUT_OF_MEMORY,
    Budgets,
    CacheRestored,
    CacheState,
    Estimate,
    ModelInfo,
    RebuildDone,
    TurnDone,
)
from engine.session import (
    ChatSession,
    ContextOverflowError,
    Message,
    SessionSettings,
    check_draft_compatible,
    common_prefix_length,
    error_kind,
)
from engine.snapshots import SnapshotStore
from engine.specs import CacheConfigError, CacheSpec, SamplingError, validate_overflow, validate_speculative
from engine.store import ChatSettings

log = logging.getLogger(__name__)

Loader = Callable[..., LoadedModel]  # may take a `progress` keyword
STATE_EVERY_S = 0.5  # how often a streaming turn reports its cache's size
# A chat starts from a copy of another chat's cache when that saves at least this many prompt tokens
# of prefill; below it, copying and prefilling cost about the same.
MIN_SHARED_TOKENS = 32


class LoadInterrupted(Exception):
    """`interrupt()` was called while a model was loading: the load stopped at its next step."""


class HistoryMessage(Protocol):
    """A message of a chat as a front end keeps it (engine.store.StoredMessage is one)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...

    @property
    def complete(self) -> bool: ...

    @property
    def token_ids(self) -> Sequence[int] | None: ...


def call_loader(loader: Loader, progress: Callable[[str], None]) -> LoadedModel:
    """Call `loader(progress=...)` when it takes a `progress` argument, else `loader()`."""
    try:
        takes_progress = "progress" in inspect.signature(loader).parameters
    except (TypeError, ValueError):
        takes_progress = False
    return loader(progress=progress) if takes_progress else loader()


def resolve_budgets(budgets: Budgets, hardware: memory.HardwareProfile, advised_kv: int | None) -> tuple[int, int]:
    """(device, host) budgets in bytes for `hardware`.

    Automatic device budget: what the advisor finds free for KV (half the free memory without
    advice). Automatic host budget: a quarter of the RAM with a GPU; on a CPU-only machine the
    device budget already is RAM, so only a small share (5%, at most 512 MiB).
    """
    if budgets.device > 0:
        device = budgets.device
    elif advised_kv is not None:
        device = max(advised_kv, 0)
    else:
        device = hardware.accelerator_free // 2
    if budgets.host is not None:
        host = budgets.host
    elif hardware.has_gpu:
        host = hardware.ram_total // 4
    else:
        host = min(hardware.ram_total // 20, 512 * MIB)
    return device, host


def estimate(spec: CacheSpec, tokens: int, model: ModelInfo, free: int) -> Estimate:
    """Bytes of `spec` at `tokens` tokens for `model`, and the longest chat that fits in `free` bytes."""
    try:
        resolved = spec.resolve(model.auto_cache).validate()
        size = caches.bytes_for(resolved, tokens, model.config, model.torch_dtype)
        fit = memory.tokens_that_fit(resolved, model.config, model.torch_dtype, free)
    except (CacheConfigError, ValueError, TypeError) as exc:  # a parameter this model cannot take
        return Estimate(spec.strategy, None, None, f"{type(exc).__name__}: {exc}")
    return Estimate(resolved.strategy, size, fit)


def free_memory(device: str) -> int:
    """Memory free for new KV caches on `device` ("cpu", "cuda:0", ...) now."""
    import torch

    return memory.read_hardware(torch.device(device)).accelerator_free


def describe_error(exc: BaseException) -> str:
    """An error as the user should read it: our own errors by their message, others with their type."""
    if isinstance(exc, ModelLoadError | CacheConfigError | SamplingError | ContextOverflowError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _message(m: HistoryMessage | Message) -> Message:
    ids = m.token_ids
    return Message(m.role, m.content, complete=m.complete, token_ids=list(ids) if ids is not None else None)


class ChatService:
    """Every chat of one front end, on one loaded model (see the module docstring).

    Args:
        snapshot_dir: where chats' caches are saved as snapshots (default: the data folder's
            `snapshots/`); names are chat ids, which only mean something next to their chats.
        budgets: the memory budgets (Budgets(disk=0): no snapshots).
        reuse: False recomputes every turn from scratch (the baseline reuse is measured against).
        graphs: one-token decode steps as captured graphs, "auto" (on for CUDA), "on" or "off" (engine/graphs.py).
        on_status: a one-line message for the user (a library being loaded, ...).
        on_cache_state: a chat's cache changed place or size (also every STATE_EVERY_S while a
            reply streams, and for each chat with a snapshot from an earlier run once a model is loaded).
        on_cache_restored: a chat was made active (opened, or at the start of a turn), with where
            its cache came from; said before the reply starts.
    """

    def __init__(self, *, snapshot_dir: Path | None = None, budgets: Budgets | None = None, reuse: bool = True,
                 graphs: str = "auto",
                 on_status: Callable[[str], None] | None = None,
                 on_cache_state: Callable[[CacheState], None] | None = None,
                 on_cache_restored: Callable[[CacheRestored], None] | None = None) -> None:
        self.snapshot_dir = snapshot_dir
        self.budgets = budgets or Budgets()
        self.reuse = reuse
        self.graphs = validate_graphs(graphs)
        self.on_status = on_status
        self.on_cache_state = on_cache_state
        self.on_cache_restored = on_cache_restored
        self.lm: LoadedModel | None = None
        self.model: ModelInfo | None = None
        self.pool: CachePool | None = None
        self._auto = CacheSpec()
        self._advised_kv: int | None = None
        self._hardware: memory.HardwareProfile | None = None
        self._shown: dict[int, CacheState] = {}  # the last place reported for each chat
        self._opened: dict[int, CacheRestored] = {}  # restores done on opening, told with the next reply
        self._interrupted = threading.Event()
        self.lock = threading.RLock()  # held by callers on more than one thread around each call (see above)
        self.draft_lm: LoadedModel | None = None  # speculative "draft-model": the small model guessing for chats

    # ----- from any thread -----------------------------------------------------------------------
    def interrupt(self) -> None:
        """Stop what runs now and refuse what comes (the front end is closing): a load stops at its
        next step, the running turn before its next token, later turns answer "cancelled"."""
        self._interrupted.set()
        pool = self.pool
        for _key, session in pool.sessions() if pool is not None else []:
            session.cancel()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    # ----- the model ---------------------------------------------------------------------------------
    def load_model(self, loader: Loader, progress: Callable[[str], None] | None = None) -> ModelInfo:
        """Load a model (raises ModelLoadError and the like, LoadInterrupted after `interrupt()`).

        The chats of the previous model lose their caches: snapshots of another model would not fit it.
        """
        self._close_pool(save=False)
        self.lm = self.model = None
        self.draft_lm = None  # a draft fits one main model's tokenizer; load it again after
        self._shown.clear()
        self._opened.clear()

        def step(text: str) -> None:
            if self._interrupted.is_set():
                raise LoadInterrupted
            if progress is not None:
                progress(text)

        lm = call_loader(loader, step)
        if self._interrupted.is_set():
            raise LoadInterrupted
        self.model = self._model_info(lm)
        self.lm = lm
        self.pool = CachePool(lm, device_budget=0, host_budget=0, snapshots=self._snapshot_store())
        self.pool.device_budget, self.pool.host_budget = self._resolved_budgets()
        self._announce_snapshots()
        return self.model

    def load_draft_model(self, loader: Loader | None, progress: Callable[[str], None] | None = None) -> str | None:
        """Load the small model that guesses for chats whose speculative mode is "draft-model" (None: drop it).

        It must share the main model's tokenizer (DraftModelError otherwise, and the previous draft stays).
        Returns its name. Every chat keeps its own cache of it, in the pool with the chat's cache.
        """
        if loader is None:
            self.draft_lm = None
        else:
            if self.lm is None:
                raise RuntimeError("Load the model before its draft model.")
            draft = call_loader(loader, progress or (lambda _msg: None))
            check_draft_compatible(self.lm, draft)
            self.draft_lm = draft
        for _key, session in self.pool.sessions() if self.pool is not None else []:
            session.set_draft_model(self.draft_lm)
        return self.draft_lm.source.display_name if self.draft_lm is not None else None

    def set_budgets(self, budgets: Budgets) -> None:
        self.budgets = budgets
        if self.pool is None:
            return  # applied when the pool is made
        self.pool.device_budget, self.pool.host_budget = self._resolved_budgets()
        if budgets.disk <= 0:
            self.pool.snapshots = None
        elif self.pool.snapshots is None:
            self.pool.snapshots = self._snapshot_store()
        else:
            self.pool.snapshots.budget_bytes = budgets.disk
            self.pool.snapshots.enforce_budget()
        self._rebalance()

    def close(self, save: bool = True) -> None:
        """Let the cache moves under way finish and, with `save`, write every chat's cache as a
        snapshot (most recently used first, within the disk budget) so that it resumes after a restart."""
        self._close_pool(save)

    # ----- chats ---------------------------------------------------------------------------------------
    def open_chat(self, chat_id: int, history: Sequence[HistoryMessage | Message],
                  settings: ChatSettings) -> CacheRestored:
        """The user opened a chat: bring its cache back to the device now, so its next reply starts at once."""
        try:
            _session, restore, _how = self._open(chat_id, history, settings, warm=True)
        finally:
            self._report_state(chat_id)
        if restore.source != "device":
            self._opened[chat_id] = restore  # told with the next reply, which it serves
        if self.on_cache_restored is not None:
            self.on_cache_restored(restore)
        self._report_moves()
        return restore

    def run_turn(self, chat_id: int, history: Sequence[HistoryMessage | Message], settings: ChatSettings, *,
                 on_delta: Callable[[str], None] | None = None, on_retry: Callable[[str], None] | None = None,
                 stop: threading.Event | None = None, turn_id: int = 0) -> TurnDone:
        """Answer the chat as `history` has it (its last message is the user's).

        A reply that runs out of memory is written again once with a leaner cache (see
        `_go_leaner`): `on_retry(notice)` says so before the new reply streams in. Never raises for
        what a turn meets (a bad setting, an overflowing context, an error): the TurnDone says it.
        """
        if self._stopped(stop):
            return TurnDone(chat_id, turn_id, "", "cancelled")
        if self.lm is None or self.pool is None:
            return TurnDone(chat_id, turn_id, "", "error", error="No model is loaded.")
        notice: str | None = None
        switched: CacheSpec | None = None
        session: ChatSession | None = None
        for attempt in (1, 2):
            try:
                session, restore, _how = self._open(chat_id, history, settings)
                restore = self._opened.pop(chat_id, restore) if restore.source == "device" else restore
                self._opened.pop(chat_id, None)
                restore = self._share_prefix(chat_id, session) or restore
                if self.on_cache_restored is not None:
                    self.on_cache_restored(restore)
                self._report_moves()
                session.stop = stop
                result = session.generate(self._delta_sender(chat_id, on_delta))
            except ContextOverflowError as exc:
                return TurnDone(chat_id, turn_id, "", "overflow", error=str(exc), error_kind=error_kind(exc),
                                prompt_tokens=exc.prompt_tokens, context_length=exc.context_length,
                                notice=notice, cache=switched)
            except Exception as exc:  # restoring, converting or building the cache failed
                kind = error_kind(exc)
                if attempt == 1 and kind == OUT_OF_MEMORY and not self._stopped(stop):
                    leaner = self._go_leaner(chat_id)
                    if leaner is not None:
                        notice, switched = leaner
                        settings = replace(settings, cache=switched)
                        if on_retry is not None:
                            on_retry(notice)
                        continue
                finish = "cancelled" if self._stopped(stop) else "error"  # Stop during a restore or recompute
                return TurnDone(chat_id, turn_id, "", finish, error=None if finish == "cancelled" else
                                describe_error(exc), error_kind=None if finish == "cancelled" else kind,
                                notice=notice, cache=switched)
            finally:
                if session is not None:
                    session.stop = None
            if attempt == 1 and result.stats.error_kind == OUT_OF_MEMORY and not self._stopped(stop):
                leaner = self._go_leaner(chat_id)
                if leaner is not None:
                    notice, switched = leaner
                    settings = replace(settings, cache=switched)
                    if on_retry is not None:
                        on_retry(notice)
                    continue
            break
        assert session is not None
        last = session.messages[-1] if session.messages else None
        has_reply = last is not None and last.role == "assistant"
        stats = result.stats
        if switched is None and stats.overflow_action and session.settings.cache != settings.cache.resolve(self._auto):
            # The overflow policy moved the chat to another strategy (attention sinks): keep it, or the
            # next turn would switch back to the stored one and recompute the whole chat every time.
            switched = session.settings.cache
        self._report_state(chat_id)  # before the turn's end, so that the end finds it current
        self._rebalance()
        return TurnDone(chat_id, turn_id, result.reply, stats.finish_reason, has_reply=has_reply,
                        token_ids=tuple(last.token_ids or ()) if has_reply and last is not None else (),
                        stats=stats, restore=restore, error=stats.error, error_kind=stats.error_kind,
                        notice=notice, cache=switched)

    def change_cache(self, chat_id: int, history: Sequence[HistoryMessage | Message],
                     settings: ChatSettings) -> RebuildDone:
        """Switch a chat's strategy: convert its cache where the engine can, else recompute it now."""
        started = time.perf_counter()
        try:
            pool = self._require_pool()
            spec = settings.cache.resolve(self._auto).validate()
            session, _restore, how = self._open(chat_id, history, settings)
            if how in ("new", "unchanged") or session.cache is None:
                how = "recompute"
            if session.cache is None:
                if session.messages:
                    session.next_token_logits()  # recompute the conversation into the new cache
                else:  # fail now if it cannot be built
                    session.cache = caches.build_cache(spec, pool.lm.config, pool.lm.device)
        except Exception as exc:
            failed = self.pool.session(chat_id) if self.pool is not None else None
            if failed is not None:
                failed.reset_cache()
            self._report_state(chat_id)
            return RebuildDone(chat_id, False, settings.cache, error=describe_error(exc))
        self._report_state(chat_id)  # before the end, so that the meters show the new cache with it
        done = RebuildDone(chat_id, True, settings.cache, how=how, tokens=len(session.cached_ids),
                           bytes=caches.cache_bytes(session.cache), seconds=time.perf_counter() - started)
        self._rebalance()
        return done

    def forget(self, chat_id: int) -> None:
        """Drop a chat's session, cache and snapshot (the chat was deleted)."""
        self._shown.pop(chat_id, None)
        self._opened.pop(chat_id, None)
        if self.pool is not None:
            self.pool.remove(chat_id)

    def cache_state(self, chat_id: int) -> CacheState:
        """Where the pool keeps a chat's cache: "gpu" (the device, when it is a GPU), "ram", "disk" or "none"."""
        session = self.pool.session(chat_id) if self.pool is not None else None
        if self.pool is None or session is None:
            return CacheState(chat_id, "none", 0, 0, "")
        strategy = session.settings.cache.strategy
        tier = self.pool.tier(chat_id)
        on_gpu = self.model is not None and self.model.on_gpu
        device = "gpu" if on_gpu and strategy != "offloaded" else "ram"  # a CPU's device is RAM
        where = device if tier == "device" else tier
        if where in ("disk", "none"):
            before = self._shown.get(chat_id)
            tokens = before.tokens if before is not None and where == "disk" else 0
            return CacheState(chat_id, where, tokens, 0, strategy)
        cache = session.cache  # the pool's mover may drop it meanwhile: read it once
        if self.pool.gpu_layers and tier == "device":  # split between GPU and CPU: ready, partly on the GPU
            from engine.layer_split import bytes_on_gpu

            return CacheState(chat_id, "gpu", len(session.cached_ids), caches.cache_bytes(cache), strategy,
                              gpu_bytes=bytes_on_gpu(cache, self.pool.gpu_layers))
        return CacheState(chat_id, where, len(session.cached_ids), caches.cache_bytes(cache), strategy)

    # ----- inside ------------------------------------------------------------------------------------
    def _stopped(self, stop: threading.Event | None) -> bool:
        return self._interrupted.is_set() or (stop is not None and stop.is_set())

    def _require_pool(self) -> CachePool:
        if self.pool is None or self.lm is None:
            raise RuntimeError("No model is loaded.")
        return self.pool

    def _open(self, chat_id: int, history: Sequence[HistoryMessage | Message], settings: ChatSettings,
              warm: bool = False) -> tuple[ChatSession, CacheRestored, str]:
        """The chat's session, with its cache active on the device and `settings` applied.

        With `warm` (the user opened the chat) a cache that is nowhere is recomputed now, so that the
        next reply starts at once; a turn leaves that to its own prefill, whose time it reports.

        Returns:
            (session, where its cache came from, how the cache strategy changed: "new" for a new
            session, else "unchanged", "converted" or "recompute").
        """
        pool = self._require_pool()
        spec = settings.cache.resolve(self._auto).validate()
        sampling = settings.sampling.validate()
        overflow = validate_overflow(settings.overflow)
        speculative = validate_speculative(settings.speculative)
        if speculative == "draft-model" and self.draft_lm is None:
            raise CacheConfigError("Speculative decoding with a draft model needs one: choose a draft model of the "
                                   "same family (CLI: --draft-model PATH), or another speculative mode.")
        if spec.is_quantized:
            self._warm_quantization(spec.backend)
        session = pool.session(chat_id)
        created = session is None
        if session is None:
            chosen = SessionSettings(settings.system_prompt, sampling, spec, self.reuse, overflow, speculative,
                                     graphs=self.graphs)
            session = ChatSession(pool.lm, chosen)
            session.set_draft_model(self.draft_lm)
            # A snapshot from an earlier run: activating restores it (or, if it no longer fits this
            # model or strategy, deletes it and recomputes).
            on_disk = pool.snapshots is not None and pool.snapshots.path(chat_id).is_file()
            pool.add(chat_id, session, tier="disk" if on_disk else "device")
        else:
            session.set_system_prompt(settings.system_prompt)
            session.set_sampling(sampling)
            session.settings.overflow = overflow
            session.settings.speculative = speculative
            session.settings.graphs = self.graphs
        session.on_progress = self.on_status
        session.messages = [_message(m) for m in history]
        # Nothing to restore and too long to recompute as it stands: the turn applies the overflow
        # policy first (or says it cannot), so do not prefill it here.
        if warm and pool.tier(chat_id) == "none" and session.messages and not session.context_status().fits:
            warm = False
        restore = pool.activate(chat_id, warm=warm)
        how = "new" if created else session.set_cache_spec(spec)  # after activating: the cache is here now
        return session, restore, how

    def _share_prefix(self, chat_id: int, session: ChatSession) -> CacheRestored | None:
        """Start the chat from a copy of the longest prefix of its prompt that another chat's cache holds
        (the same long system prompt, the same pasted document), when that beats its own cache by at
        least MIN_SHARED_TOKENS.

        Only exact caches are shared (not quantized or attention-sink ones, on either side): the copy
        then holds the very keys and values that prefilling those tokens computes. Returns the
        restore to report ("shared"), or None when nothing was copied.
        """
        pool = self._require_pool()
        spec = session.settings.cache
        if not self.reuse or spec.is_lossy or spec.bounded_length:
            return None
        others = [(key, other) for key, other in pool.sessions()
                  if key != chat_id and other.cached_ids and not other.settings.cache.is_lossy
                  and not other.settings.cache.bounded_length]
        if not others:
            return None
        started = time.perf_counter()
        prompt = session.render_ids()
        if len(prompt) + session.reply_reserve() > session.context_limit():
            return None  # the overflow policy rewrites the prompt first; the turn prefills what it keeps
        limit = len(prompt) - 1  # the turn feeds at least one token: its logits choose the first reply token
        own = min(common_prefix_length(session.cached_ids, prompt), limit) if session.cache is not None else 0
        best_key, best = None, own + MIN_SHARED_TOKENS - 1
        for key, other in others:
            shared = min(common_prefix_length(other.cached_ids, prompt), limit)
            if shared > best:
                best_key, best = key, shared
        if best_key is None:
            return None
        copy = pool.copy_prefix(best_key, best, spec)
        if copy is None:
            return None
        session.cache, session.cached_ids = copy, prompt[:best]
        log.debug("chat %s starts from %d tokens of chat %s's cache", chat_id, best, best_key)
        return CacheRestored(chat_id, "shared", time.perf_counter() - started, best,
                             on_gpu=self.model is not None and self.model.on_gpu)

    def _delta_sender(self, chat_id: int, on_delta: Callable[[str], None] | None) -> Callable[[str], None]:
        last_state = time.monotonic()

        def send(text: str) -> None:
            nonlocal last_state
            if on_delta is not None:
                on_delta(text)
            now = time.monotonic()
            if now - last_state >= STATE_EVERY_S:
                last_state = now
                self._report_state(chat_id)

        return send

    def _go_leaner(self, chat_id: int) -> tuple[str, CacheSpec] | None:
        """The reply ran out of memory: move every idle cache off the device and give this chat a
        leaner strategy (4-bit quantized; if it already is, attention sinks).

        Returns:
            (one sentence for the user, the chat's new cache settings), or None when there is
            nothing leaner to switch to.
        """
        pool = self._require_pool()
        lm = pool.lm
        session = pool.session(chat_id)
        if session is None or session.settings.cache.bounded_length:
            return None
        if session.settings.cache.strategy != "quantized" and caches.availability(lm.device)["quantized"] is None:
            spec = CacheSpec(strategy="quantized", **caches.quantization_defaults(4))
            what = "a 4-bit quantized cache"
        else:
            spec = next(s for _, s in memory.candidate_specs(lm.config, lm.context_length) if s.strategy == "sink")
            what = f"attention sinks (it keeps the start and the last {spec.window:,} tokens)"
        budget, pool.device_budget = pool.device_budget, 0
        try:
            pool.rebalance(wait=True)
        finally:
            pool.device_budget = budget
        self._report_moves()
        if lm.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        try:
            session.set_cache_spec(spec)
        except Exception:  # converting needs memory too: rebuild from the messages instead
            session.reset_cache()
            session.settings.cache = spec
        where = "the GPU" if self.model is not None and self.model.on_gpu else "memory"
        return (f"Memory ran out while writing this reply, so Cachet moved the other chats' caches out of {where}, "
                f"switched this chat to {what}, and wrote the reply again.", spec)

    def _warm_quantization(self, backend: str) -> None:
        """Import the quantization library once (seconds), telling the user why the first turn waits."""
        from engine.caches import quantized

        try:
            seconds = quantized.warm_up(backend, progress=self.on_status)
        except Exception:  # an unusable backend is reported by the cache build with its reason
            return
        if seconds >= 0.5 and self.on_status is not None:
            self.on_status(f"Quantization library ready ({seconds:.1f} s, once per run).")

    def _model_info(self, lm: LoadedModel) -> ModelInfo:
        gpu_device, gpu_weights = "", 0
        if lm.gpu_layers is not None:  # split between GPU and CPU: the GPU, and what it holds of the weights
            from engine.layer_split import gpu_placement
            from engine.quantized_weights import model_bytes

            gpu_device = gpu_placement(lm.model, lm.layers)[0]
            gpu_weights = model_bytes(lm.model, off_cpu=True)
        self._auto, reason, advice = _advise(lm, gpu_device)
        self._advised_kv = advice.kv_budget if advice is not None else None
        self._hardware = advice.hardware if advice is not None else None
        return ModelInfo(
            name=lm.source.display_name, device=str(lm.device), dtype=lm.precision_label,
            context_length=lm.context_length, weights_bytes=lm.weights_bytes, load_seconds=lm.load_seconds,
            availability=caches.availability(lm.device), backend_availability=caches.backend_availability(),
            auto_cache=self._auto, auto_reason=reason, config=lm.config, torch_dtype=lm.dtype,
            precision_note=lm.precision_note, weights=lm.weights, weights_note=lm.weights_note,
            gpu_layers=lm.gpu_layers, layers=lm.layers, split=lm.split_label,
            attention=lm.attention, attention_note=lm.attention_note,
            gpu_device=gpu_device, gpu_weights_bytes=gpu_weights,
        )

    def _resolved_budgets(self) -> tuple[int, int]:
        assert self.lm is not None
        if self._hardware is None:
            self._hardware = memory.read_hardware(_budget_device(self.lm, self.model.gpu_device if self.model else ""))
        return resolve_budgets(self.budgets, self._hardware, self._advised_kv)

    def _snapshot_store(self) -> SnapshotStore | None:
        if self.budgets.disk <= 0:
            return None
        # Next to the chats they belong to: snapshots are named after chat ids, which only mean
        # something in their own data folder.
        return SnapshotStore(self.snapshot_dir or paths.data_dir() / "snapshots", self.budgets.disk)

    def _close_pool(self, save: bool) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        pool.close()  # lets moves under way finish
        if save and pool.snapshots is not None:
            _save_snapshots(pool)

    def _rebalance(self) -> None:
        """Let the pool move idle caches within the budgets (on its own thread), and say where they went."""
        if self.pool is not None:
            self.pool.rebalance()
            self._report_moves()

    def _report(self, state: CacheState) -> None:
        self._shown[state.chat_id] = state
        if self.on_cache_state is not None:
            self.on_cache_state(state)

    def _report_state(self, chat_id: int) -> None:
        self._report(self.cache_state(chat_id))

    def _report_moves(self) -> None:
        """Report every chat whose cache the pool has moved since it was last reported."""
        if self.pool is None:
            return
        for chat_id, _session in self.pool.sessions():
            state = self.cache_state(chat_id)
            before = self._shown.get(chat_id)
            if before is None or before.where != state.where:
                self._report(state)

    def _announce_snapshots(self) -> None:
        """Say which chats have a snapshot on disk from an earlier run."""
        store = self.pool.snapshots if self.pool is not None else None
        if store is None:
            return
        for path in store.files():
            if path.stem.isdigit():
                self._report(CacheState(int(path.stem), "disk", store.tokens(path), 0, ""))


def _save_snapshots(pool: CachePool) -> None:
    """Save each chat whose cache is in memory, most recently used first, while the disk budget lasts."""
    from engine.caches.shape import KVShape

    store = pool.snapshots
    assert store is not None
    per_token = KVShape.of(pool.lm.config).bytes_per_token(pool.lm.dtype)
    used = store.total_bytes()
    saved: list[Path] = []
    for key, entry in reversed(pool.entries.items()):
        session = entry.session
        if entry.tier not in ("device", "ram") or session.cache is None or not session.cached_ids:
            continue
        size = per_token * len(session.cached_ids)  # snapshots hold full precision
        if saved and used + size > store.budget_bytes:
            continue  # saving it would push out a more recently used chat's snapshot
        try:
            path = store.save(key, session)
        except Exception as exc:  # a full disk must not stop Cachet from quitting
            log.warning("could not save the cache of chat %s (%s: %s)", key, type(exc).__name__, exc)
            continue
        if path is not None:
            saved.append(path)
            used = store.total_bytes()
    for path in reversed(saved):  # the store evicts the oldest files first: date them by use
        if path.exists():
            os.utime(path)


def _budget_device(lm: LoadedModel, gpu_device: str) -> Any:
    """The device whose free memory bounds the KV caches: the model's, or for a model split between GPU and CPU
    (which takes its inputs on the CPU) the GPU its last layers run on."""
    import torch

    return torch.device(gpu_device) if gpu_device else lm.device


def _advise(lm: LoadedModel, gpu_device: str = "") -> tuple[CacheSpec, str, memory.Advice | None]:
    """What "auto" means for this model here, and the advice itself (None when there is none). For a model split
    between GPU and CPU the advice is on the GPU's memory for the GPU layers' KV and on RAM for the others'."""
    try:
        advice = memory.advise(lm.config, memory.read_hardware(_budget_device(lm, gpu_device)), dtype=lm.dtype,
                               weights_bytes=lm.weights_bytes, weights_loaded=True,
                               gpu_layers=lm.gpu_layers if gpu_device else None)
    except Exception as exc:  # the hardware could not be read: the full cache
        return CacheSpec(), f"auto means dynamic (no advice: {type(exc).__name__}).", None
    if advice.recommended is None:
        return CacheSpec(), f"auto means dynamic. {advice.explanation}", advice
    return advice.recommended.spec, f"auto means {advice.recommended.label}: {advice.explanation}", advice

