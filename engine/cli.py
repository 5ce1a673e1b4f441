"""`python -m engine`: chat in the terminal, replay scripted turns, measure perplexity."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine import caches, models, paths
from engine.caches import CacheSpec
from engine.graphs import GRAPH_MODES, graphs_wanted
from engine.lock import DataFolderLock, FolderInUseError
from engine.models import LoadedModel
from engine.reports import Budgets, TurnDone
from engine.service import ChatService, Loader
from engine.session import DraftModelError
from engine.specs import OVERFLOW_POLICIES, SPECULATIVE_MODES, SamplingError
from engine.store import ChatSettings, ChatStore
from engine.weights import PRECISIONS


def _add_model_args(p: argparse.ArgumentParser, *, weights: bool = True) -> None:
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="'default' (bundled SmolLM2-135M-Instruct), a .gguf file, a model folder or a Hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (under --weights int8/int4: "
                                                   "the base precision of everything not quantized)")
    if weights:
        add_weight_args(p)
    p.add_argument("--online", action="store_true", help="allow downloading a Hub model")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights")


def add_weight_args(p: Any) -> None:
    """--weights and --gpu-layers: how `models.load` stores and places the weights."""
    p.add_argument("--weights", default="auto", choices=models.WEIGHT_CHOICES,
                   help="weight precision: auto (the advisor's plan: the most faithful that fits with a chat of the "
                        "model's context), fp32, bf16, fp16, or int8 / int4 (optimum-quanto linear layers over the "
                        "--dtype base, quantized once and kept in the cache folder)")
    p.add_argument("--gpu-layers", type=int, default=None, metavar="N",
                   help="decoder layers on the CUDA GPU, the rest run from RAM on the CPU (llama.cpp's -ngl); "
                        "default: as the advisor plans (all of them when they fit)")


def check_weight_args(weights: str | None, dtype: str, gpu_layers: int | None, device: str) -> str | None:
    """What is wrong with --weights/--dtype/--gpu-layers/--device together (None: nothing), before any loading."""
    try:
        models.check_weights(weights, dtype, gpu_layers)
    except models.ModelLoadError as exc:
        return str(exc)
    if gpu_layers:
        if device not in ("auto",) and not str(device).startswith("cuda"):
            return (f"--gpu-layers {gpu_layers} puts layers on a CUDA GPU, but --device is {device}. "
                    "Leave --gpu-layers out, or choose --device cuda.")
        if not torch.cuda.is_available():
            return (f"--gpu-layers {gpu_layers} puts layers on a CUDA GPU, and this torch build sees none. "
                    "Leave --gpu-layers out (or 0) to run every layer on the CPU.")
    return None


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    # Defaults of None: a flag left out is told apart from one typed (a resumed chat keeps its own value).
    d = CacheSpec()
    g = p.add_argument_group("KV cache")
    g.add_argument("--cache", default=None, choices=caches.STRATEGIES, help=f"KV cache strategy (default {d.strategy})")
    g.add_argument("--sink-tokens", type=int, default=None, metavar="N",
                   help=f"sink: first tokens always kept (default {d.sink_tokens})")
    g.add_argument("--window", type=int, default=None, metavar="N",
                   help=f"sink: most recent tokens kept (default {d.window})")
    g.add_argument("--nbits", type=int, default=None, help=f"quantized: 2 or 4 bits (default {d.nbits}); the "
                                                         "flags below left out take that width's measured defaults")
    g.add_argument("--residual", type=int, default=None, metavar="N",
                   help="quantized: recent tokens kept in full precision")
    g.add_argument("--q-group-size", type=int, default=None, metavar="N",
                   help="quantized: values per quantization group")
    g.add_argument("--axis-key", type=int, default=None, choices=(0, -1), help="quantized: 0 per token, -1 per channel")
    g.add_argument("--axis-value", type=int, default=None, choices=(0, -1))
    g.add_argument("--backend", default=None, choices=caches.BACKENDS,
                   help=f"quantized: quanto or hqq (default {d.backend})")
    g.add_argument("--max-cache-len", type=int, default=None, metavar="N",
                   help=f"static: pre-allocated tokens (default {d.max_cache_len})")


_CACHE_FLAGS = ("sink_tokens", "window", "residual", "q_group_size", "axis_key", "axis_value", "backend",
                "max_cache_len")
_SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed")
# What a new terminal chat starts from: the full cache (the window's new chats start from "auto").
NEW_CHAT = ChatSettings(cache=CacheSpec())


def cache_spec_from_args(args: argparse.Namespace, base: CacheSpec | None = None) -> CacheSpec:
    """`base` (default: CacheSpec()) changed by the cache flags given, and only those: `--nbits` also brings
    that width's measured defaults for the quantization flags left out. Raises CacheConfigError."""
    spec = base if base is not None else CacheSpec()
    changes: dict[str, Any] = {}
    if args.cache is not None:
        changes["strategy"] = args.cache
    if args.nbits is not None:
        changes.update(caches.quantization_defaults(args.nbits))
    for name in _CACHE_FLAGS:
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return spec.with_changes(**changes) if changes else spec


def settings_from_args(args: argparse.Namespace, base: ChatSettings) -> ChatSettings:
    """`base` with the chat flags the user typed (sampling, cache, --overflow, --speculative, --system); a
    flag left out keeps base's value. Raises SamplingError / CacheConfigError for a value that cannot work."""
    changes: dict[str, Any] = {}
    if args.system is not None:
        changes["system_prompt"] = args.system
    sampling = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
    if sampling:
        changes["sampling"] = base.sampling.with_changes(**sampling)
    if args.cache is not None or args.nbits is not None or any(getattr(args, n) is not None for n in _CACHE_FLAGS):
        changes["cache"] = cache_spec_from_args(args, base.cache)
    if args.overflow is not None:
        changes["overflow"] = args.overflow
    if args.speculative is not None:
        changes["speculative"] = args.speculative
    return replace(base, **changes)


def describe_changes(old: ChatSettings, new: ChatSettings) -> list[str]:
    """Each setting that differs, as the flag that sets it: "--max-new-tokens 20 (was 512)"."""
    def flat(s: ChatSettings) -> dict[str, Any]:
        return {"system": s.system_prompt, "overflow": s.overflow, "speculative": s.speculative,
                **{f"cache.{k}" if k == "strategy" else k: v for k, v in s.cache.to_dict().items()},
                **s.sampling.to_dict()}

    def shown(value: Any) -> str:
        text = repr(value) if isinstance(value, str) and (not value or " " in value) else str(value)
        return text if len(text) <= 40 else text[:39] + "…"

    before, after = flat(old), flat(new)
    flags = {"cache.strategy": "cache"}
    return [f"--{flags.get(k, k).replace('_', '-')} {shown(v)} (was {shown(before[k])})"
            for k, v in after.items() if before.get(k) != v]


CHAT_DESCRIPTION = """\
Chat with a language model in the terminal: type a message and press Enter, and the reply streams in.
Ctrl+C stops a reply (the chat goes on), /reset starts a new chat, /quit or Ctrl+D leaves.

Without --data-dir nothing is kept. With --data-dir DIR the chat is kept in DIR, and its KV cache as a
snapshot when you leave; --chat N goes on with chat N there. The chat flags you give then (sampling,
cache, --overflow, --system) change that chat's settings and stay with it; flags you leave out keep
the chat's own settings."""

CHAT_EXAMPLES = """\
examples:
  python -m engine chat                                  the bundled model, nothing kept
  python -m engine chat --temperature 0 --max-new-tokens 128
  python -m engine chat --data-dir ~/cachet              kept in ~/cachet (the start line says its number)
  python -m engine chat --data-dir ~/cachet --chat 1     go on with chat 1, its cache restored
  python -m engine chat --turns questions.txt --json     one message per line, one JSON object per turn"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Cachet's engine from the terminal.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a model (interactive, or scripted with --turns)",
                          description=CHAT_DESCRIPTION, epilog=CHAT_EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(chat)
    _add_cache_args(chat)
    # Chat settings default to None: a flag left out is told apart from one typed, so that a resumed
    # chat (--chat N) keeps its own value for it (see settings_from_args).
    d = NEW_CHAT.sampling
    chat.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: none)")
    chat.add_argument("--temperature", type=float, default=None, metavar="T",
                      help=f"0 = greedy, always the most likely token (default {d.temperature})")
    chat.add_argument("--top-p", type=float, default=None, metavar="P", help=f"default {d.top_p}")
    chat.add_argument("--top-k", type=int, default=None, metavar="K", help=f"0 = off (default {d.top_k})")
    chat.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                      help=f"default {d.repetition_penalty}")
    chat.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                      help=f"the longest reply, in tokens (default {d.max_new_tokens})")
    chat.add_argument("--seed", type=int, default=None, metavar="N", help="sample reproducibly (default: no seed)")
    chat.add_argument("--overflow", default=None, choices=OVERFLOW_POLICIES,
                      help="when the chat outgrows the model's context: stop, truncate-middle, or switch to sink "
                           f"(default {NEW_CHAT.overflow})")
    chat.add_argument("--speculative", default=None, choices=SPECULATIVE_MODES,
                      help="check guessed tokens several per step (prompt lookup: guesses from the conversation "
                           "itself); greedy replies are the same token for token either way (default "
                           f"{NEW_CHAT.speculative}; a chat keeps it)")
    chat.add_argument("--graphs", default="auto", choices=GRAPH_MODES,
                      help="one-token decode steps as captured CUDA graphs over KV buffers grown in buckets: auto "
                           "(on for CUDA, off for CPU), on (on a CPU: the same static-shaped step, uncaptured), off")
    chat.add_argument("--draft-model", default=None, metavar="PATH",
                      help="with --speculative draft-model: a small model of the same family (same tokenizer) that "
                           "guesses the next tokens, e.g. SmolLM2-135M for SmolLM2-360M/1.7B (a .gguf or a folder)")
    chat.add_argument("--no-reuse", action="store_true",
                      help="recompute the whole conversation every turn (the baseline reuse is measured against)")
    chat.add_argument("--turns", type=Path, metavar="FILE", help="file with one user message per line")
    chat.add_argument("--json", action="store_true", help="with --turns: one JSON object per turn")
    chat.add_argument("--data-dir", type=Path, metavar="DIR",
                      help="keep the chat (and, on quitting, its KV cache as a snapshot) under this folder, as the "
                           "app's --data-dir does; without it nothing is kept")
    chat.add_argument("--chat", type=int, default=None, metavar="N",
                      help="with --data-dir: go on with chat N (its number is printed at the start); the chat "
                           "flags given change its settings from then on, those left out keep its own")

    adv = sub.add_parser("advise", help="which cache strategy fits this model in this machine's memory")
    _add_model_args(adv, weights=False)
    adv.add_argument("--context", type=int, default=None, help="tokens to plan for (default: the model's context)")
    adv.add_argument("--vram-gib", type=float, default=None, help="simulate a GPU with this much memory")
    adv.add_argument("--ram-gib", type=float, default=None, help="simulate this much system RAM")
    adv.add_argument("--weights", default="auto", choices=("auto", *PRECISIONS),
                     help="weight precision to plan with (auto: the most faithful that fits, layers split if needed)")
    adv.add_argument("--json", action="store_true")

    found = sub.add_parser("models", help="models already on this computer (LM Studio, Ollama, GPT4All, "
                                          "Hugging Face cache) and whether each fits")
    found.add_argument("--add-folder", action="append", type=Path, default=[], metavar="DIR",
                       help="also look in DIR (repeatable)")
    found.add_argument("--context", type=int, default=None,
                       help="chat length the fit columns plan for (default: each model's context)")
    found.add_argument("--vram-gib", type=float, default=None, help="simulate a GPU with this much memory")
    found.add_argument("--ram-gib", type=float, default=None, help="simulate this much system RAM")
    found.add_argument("--json", action="store_true")

    ppl = sub.add_parser("perplexity", help="perplexity of a text through a cache strategy")
    _add_model_args(ppl)
    _add_cache_args(ppl)
    ppl.add_argument("--text", type=Path, required=True, help="a UTF-8 text file")
    ppl.add_argument("--max-tokens", type=int, default=None)
    ppl.add_argument("--chunk", type=int, default=64, help="tokens fed per forward pass")
    ppl.add_argument("--json", action="store_true")

    from engine.bench.runner import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="measure follow-up latency, decode speed, memory and fidelity per strategy, "
                                         "side by side with llama.cpp and plain transformers; writes JSON and plots")
    add_bench_arguments(bench)
    _add_serve(sub)
    return parser


def _add_serve(sub: Any) -> None:
    from engine.server import add_serve_arguments

    serve = sub.add_parser("serve", help="an OpenAI-compatible server on this engine (chat completions, "
                                         "completions, models), reusing caches across requests")
    add_serve_arguments(serve)


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


class ArgumentProblem(ValueError):
    """An argument that cannot work, found before anything is loaded; the message is one line."""


def check_args(args: argparse.Namespace) -> None:
    """Validate every argument of `args` that can be checked without loading a model, so a mistake
    costs one clear line and a non-zero exit, not a model load and a traceback (ArgumentProblem)."""
    if hasattr(args, "device") and not _DEVICE.match(str(args.device)):
        raise ArgumentProblem(f"--device {args.device!r}: choose auto, cpu, cuda, cuda:N or mps.")
    if args.command == "chat":
        if args.speculative == "draft-model" and not args.draft_model:
            raise ArgumentProblem("--speculative draft-model needs --draft-model PATH (a small model of the same "
                                  "family).")
        if args.draft_model and args.speculative != "draft-model":
            raise ArgumentProblem("--draft-model is used by --speculative draft-model; add that, or leave the draft "
                                  "out.")
    if hasattr(args, "dtype") and args.dtype not in _DTYPE_NAMES:
        raise ArgumentProblem(f"--dtype {args.dtype!r}: choose auto, float32, float16 or bfloat16.")
    if hasattr(args, "gpu_layers"):
        problem = check_weight_args(args.weights, args.dtype, args.gpu_layers, args.device)
        if problem is not None:
            raise ArgumentProblem(problem)
    if getattr(args, "context", None) is not None and args.context < 1:
        raise ArgumentProblem(f"--context {args.context}: plan for at least 1 token (leave it out for the model's "
                              "full context).")
    for flag in ("vram_gib", "ram_gib"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ArgumentProblem(f"--{flag.replace('_', '-')} {value}: a memory size is 0 or more GiB.")
    if getattr(args, "ram_gib", None) is not None and args.ram_gib == 0:
        raise ArgumentProblem("--ram-gib 0: a computer with no RAM cannot run a model.")
    if args.command == "perplexity":
        if args.max_tokens is not None and args.max_tokens < 2:
            raise ArgumentProblem(f"--max-tokens {args.max_tokens}: perplexity needs at least 2 tokens.")
        if args.chunk < 1:
            raise ArgumentProblem(f"--chunk {args.chunk}: feed at least 1 token per forward pass.")
        if not _read_text(args.text, "--text").strip():
            raise ArgumentProblem(f"--text {args.text}: the file is empty; there is nothing to measure.")
    if args.command == "perplexity":
        check_cache_device(cache_spec_from_args(args), args.device)  # CacheConfigError: exit 2 with its sentence
    if args.command == "chat":
        if args.chat is None:  # a resumed chat's flags are checked against its own settings (TerminalChat)
            check_cache_device(settings_from_args(args, NEW_CHAT).cache, args.device)  # SamplingError too
        if args.chat is not None and args.data_dir is None:
            raise ArgumentProblem("--chat needs --data-dir (the folder the chat is kept in).")
        if args.turns is not None and not any(line.strip() for line in _read_text(args.turns, "--turns").splitlines()):
            raise ArgumentProblem(f"--turns {args.turns}: the file holds no message (one per line).")
        if args.data_dir is not None:
            try:
                paths.check_data_dir(args.data_dir.expanduser().resolve())
            except paths.DataDirError as exc:
                raise ArgumentProblem(f"--data-dir: {exc}") from None


def check_cache_device(spec: CacheSpec, device: str) -> None:
    """Refuse a cache strategy that cannot work on `device` (ArgumentProblem), before any loading."""
    if spec.strategy == "offloaded" and models.pick_device(device).type == "cpu":
        raise ArgumentProblem("--cache offloaded moves the cache between the GPU and RAM; on the CPU there is "
                              "nothing to offload to. Choose another --cache, or a --device with a GPU.")


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArgumentProblem(f"{flag} {path}: no such file.") from None
    except IsADirectoryError:
        raise ArgumentProblem(f"{flag} {path}: a folder, not a text file.") from None
    except UnicodeDecodeError as exc:
        raise ArgumentProblem(f"{flag} {path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise ArgumentProblem(f"{flag} {path}: {exc.strerror or exc}.") from None


def _print_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(args: argparse.Namespace, progress: Callable[[str], None] = _print_progress) -> models.LoadedModel:
    return models.load(args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                       gpu_layers=args.gpu_layers, offline=not args.online,
                       trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                       progress=progress)


def _turn_json(turn: int, done: TurnDone) -> str:
    s = done.stats
    record: dict[str, object] = {"turn": turn, "reply": done.reply, "finish_reason": done.finish_reason}
    if s is not None:
        record.update({
            "prompt_tokens": s.prompt_tokens, "reused_tokens": s.reused_tokens, "prefilled_tokens": s.prefilled_tokens,
            "generated_tokens": s.generated_tokens, "ttft_ms": round(s.ttft_ms, 2),
            "decode_tok_s": round(s.decode_tok_s, 2), "cache_tokens": s.cache_tokens, "cache_bytes": s.cache_bytes,
            "graph_steps": s.graph_steps,
            # what speculation did (None: it was off): who guessed, how many guesses were kept
            "speculative": s.speculative, "tokens_per_step": s.tokens_per_step,
        })
        if s.graph_fallback:
            record["graph_fallback"] = s.graph_fallback
    if done.error:
        record["error"] = done.error
    return json.dumps(record, ensure_ascii=False)


class TerminalChat:
    """One chat in the terminal, through the same ChatService as the window: its messages are kept in
    a ChatStore (the data folder's, or one in memory), its cache in the service's pool.

    Use it from one thread, the one that made it: SQLite objects refuse every other thread, so turns
    run on it too, and Ctrl+C reaches a turn as a signal handler there (`_turn_interruptible`).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.persist = args.data_dir is not None
        self.lock: DataFolderLock | None = None
        self.notes: list[str] = []  # said once the model is loaded: settings the command line changed
        self.resumed_messages: int | None = None  # with --chat: the messages the chat held
        if self.persist:
            paths.use_base_dir(args.data_dir.expanduser().resolve())
            # the same lock as the app and the server: one owner per data folder (FolderInUseError)
            self.lock = DataFolderLock(paths.data_dir(), owner="chat").acquire()
        try:
            self.store = ChatStore(paths.data_dir() / "chats.sqlite3" if self.persist else Path(":memory:"))
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        try:
            self.chat_id, self.settings = self._open_chat(args)
        except BaseException:
            self.close_store()
            raise
        self.service = ChatService(budgets=Budgets() if self.persist else Budgets(disk=0), reuse=not args.no_reuse,
                                   graphs=getattr(args, "graphs", "auto"),
                                   on_status=lambda msg: print(f"note: {msg}", file=sys.stderr, flush=True))

    def _open_chat(self, args: argparse.Namespace) -> tuple[int, ChatSettings]:
        """A new chat with the flags' settings, or (--chat N) chat N with the flags typed applied to its own.

        A resumed chat keeps what the flags changed: the settings are the chat's, as in the window, so
        it goes on the same way next time (in the terminal or the window), its snapshot is in the strategy
        it will be opened with, and its stored replies were written with the settings it shows.
        """
        if args.chat is None:
            settings = settings_from_args(args, NEW_CHAT)
            return self.store.create_chat(settings).id, settings
        try:
            stored = self.store.chat(args.chat)
        except KeyError:
            raise LookupError(self._no_such_chat(args.chat)) from None
        settings = settings_from_args(args, stored.settings)  # SamplingError, CacheConfigError: exit 2
        check_cache_device(settings.cache, args.device)
        if settings.speculative == "draft-model" and not args.draft_model:
            raise ArgumentProblem(f"chat {stored.id} guesses with a draft model: give --draft-model PATH, or "
                                  "--speculative auto (or off) to go on without one.")
        changed = describe_changes(stored.settings, settings)
        if changed:
            self.store.set_settings(stored.id, settings)
            self.notes.append(f"chat {stored.id} now answers with {', '.join(changed)} and keeps that; the flags "
                              "left out keep its own settings.")
        self.resumed_messages = len(self.store.messages(stored.id))
        return stored.id, settings

    def _no_such_chat(self, chat_id: int) -> str:
        chats = self.store.chats()
        where = f"There is no chat {chat_id} in {paths.data_dir()}"
        if not chats:
            return f"{where}: it holds no chats yet (leave out --chat to start one)."
        listed = "; ".join(f'{c.id} "{c.title or "untitled"}"' for c in chats[:5])
        more = f", and {len(chats) - 5} more" if len(chats) > 5 else ""
        return f"{where}. Its chats, newest first: {listed}{more}."

    def load(self, args: argparse.Namespace, loader: Loader | None = None) -> LoadedModel:
        """Load the model (`loader`, when given, instead of --model: tests inject a tiny one), and the draft."""
        self.service.load_model(loader if loader is not None else (lambda progress: _load(args, progress)),
                                progress=_print_progress)
        assert self.service.lm is not None
        if getattr(args, "draft_model", None):
            self.service.load_draft_model(lambda progress: models.load(
                args.draft_model, device=args.device, dtype=args.dtype, offline=not args.online,
                trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, progress=progress),
                progress=_print_progress)
        return self.service.lm

    def turn(self, text: str, on_delta: Callable[[str], None] | None = None,
             stop: threading.Event | None = None) -> TurnDone:
        """Keep the user's message, answer it, keep the reply (a stopped one too)."""
        self.store.add_message(self.chat_id, "user", text)
        done = self.service.run_turn(self.chat_id, self.store.messages(self.chat_id), self.settings,
                                     on_delta=on_delta, stop=stop)
        if done.cache is not None:  # the engine moved the chat to another strategy: keep it
            self.settings = replace(self.settings, cache=done.cache)
            self.store.set_settings(self.chat_id, self.settings)
        if done.has_reply:
            stats = done.stats.to_dict() if done.stats is not None else None
            status = "done" if done.finish_reason in ("stop", "length") else "stopped"
            self.store.add_message(self.chat_id, "assistant", done.reply, status=status, token_ids=done.token_ids,
                                   tokens=len(done.token_ids), stats=stats)
        return done

    def reset(self) -> None:
        """Start over in a new chat (the old one stays in the data folder)."""
        self.chat_id = self.store.create_chat(self.settings).id

    def close(self) -> None:
        self.service.close(save=self.persist)
        self.close_store()

    def close_store(self) -> None:
        self.store.close()
        if self.lock is not None:
            self.lock.release()


def _turn_interruptible(chat: TerminalChat, text: str, on_delta: Callable[[str], None] | None = None) -> TurnDone:
    """`chat.turn(text)`, with Ctrl+C stopping the reply instead of the chat.

    The turn runs on this thread, which opened the store (SQLite objects refuse other threads). For the
    turn's length SIGINT only sets the turn's stop event, which the session checks before every token,
    instead of raising KeyboardInterrupt, which could land in the middle of a store write and lose the
    reply. The stopped reply is kept as far as it got (status "stopped").
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return chat.turn(text, on_delta=on_delta, stop=stop)
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started with Ctrl+C ignored (a background job): leave it so
        return chat.turn(text, on_delta=on_delta, stop=stop)

    def on_sigint(_signum: int, _frame: object) -> None:
        # Further presses are ignored until the turn ends: run again inside `stop.set()`, this handler
        # would wait forever for the lock that very call holds.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop.set()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        return chat.turn(text, on_delta=on_delta, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def cmd_chat(args: argparse.Namespace, loader: Loader | None = None) -> int:
    try:
        chat = TerminalChat(args)
    except (LookupError, FolderInUseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return _chat(args, chat, loader)
    finally:
        chat.close()


def _print_delta(text: str) -> None:
    print(text, end="", flush=True)


def _answer(chat: TerminalChat, text: str, told: set[str]) -> TurnDone:
    """One turn as the terminal shows it: the reply streamed after "bot> ", then on stderr what it cost
    (or why it failed) and the notes it brought (each graph fallback reason once per run, in `told`)."""
    print("bot> ", end="", flush=True)
    done = _turn_interruptible(chat, text, on_delta=_print_delta)
    print(flush=True)
    if done.finish_reason == "overflow":
        print(f"error: {done.error}", file=sys.stderr)
        return done
    if done.notice:
        print(f"note: {done.notice}", file=sys.stderr)
    s = done.stats
    if s is None:
        print(f"  [{done.finish_reason}: {done.error}]" if done.error else "  [stopped]", file=sys.stderr)
        return done
    if s.overflow_action:
        print(f"note: the chat outgrew the model's context: {s.overflow_action}", file=sys.stderr)
    if s.cache_fallback:
        print(f"note: {s.cache_fallback}", file=sys.stderr)
    if s.graph_fallback and s.graph_fallback not in told:
        told.add(s.graph_fallback)
        print(f"note: graph-captured decoding: {s.graph_fallback}", file=sys.stderr)
    note = f" [{s.finish_reason}: {s.error}]" if s.error else ""
    if s.finish_reason == "cancelled":
        note = " [stopped]"
    speculative = f", {s.tokens_per_step:.2f} tokens/step" if s.speculative and s.tokens_per_step else ""
    print(f"  ({s.reused_tokens}/{s.prompt_tokens} prompt tokens reused, {s.prefilled_tokens} prefilled, "
          f"TTFT {s.ttft_ms:.0f} ms, {s.decode_tok_s:.1f} tok/s{speculative}, cache {s.cache_tokens} tokens "
          f"= {s.cache_bytes / 2**20:.1f} MiB){note}", file=sys.stderr, flush=True)
    return done


def _scripted(args: argparse.Namespace, chat: TerminalChat) -> int:
    """--turns FILE: each non-blank line a user message; --json prints one object per turn instead of the chat."""
    lines = [ln for ln in args.turns.read_text(encoding="utf-8").splitlines() if ln.strip()]
    told: set[str] = set()
    for i, line in enumerate(lines, start=1):
        if args.json:
            done = _turn_interruptible(chat, line)
            print(_turn_json(i, done), flush=True)
            if done.notice:
                print(f"note: {done.notice}", file=sys.stderr)
            if done.stats is not None and done.stats.overflow_action:
                print(f"note: {done.stats.overflow_action}", file=sys.stderr)
            if done.stats is not None and done.stats.graph_fallback and done.stats.graph_fallback not in told:
                told.add(done.stats.graph_fallback)
                print(f"note: graph-captured decoding: {done.stats.graph_fallback}", file=sys.stderr)
        else:
            print(f"you> {line}", flush=True)
            done = _answer(chat, line, told)
        if done.finish_reason in ("overflow", "error"):  # said on stderr and in the exit code, too
            print(f"error: turn {i}: {done.error}", file=sys.stderr)
            return 1
    return 0


HELP = "Ctrl+C stops a reply; /reset starts a new chat; /quit or Ctrl+D leaves."
COMMANDS = re.compile(r"^/[A-Za-z]+$")  # a line of one /word is a command, never sent to the model


def _chat(args: argparse.Namespace, chat: TerminalChat, loader: Loader | None = None) -> int:
    lm = chat.load(args, loader)
    for note in chat.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.turns:
        return _scripted(args, chat)

    kept = ""
    if chat.persist:
        so_far = f", going on after its {chat.resumed_messages} messages" if chat.resumed_messages is not None else ""
        kept = f" Chat {chat.chat_id} in {paths.data_dir()}{so_far} (--chat {chat.chat_id} goes on with it)."
    precision = lm.precision_note if lm.precision_note and lm.precision_note != "chosen" else lm.precision_label
    if lm.weights in ("int8", "int4"):
        precision = lm.precision_label
    split = f" ({lm.split_label})" if lm.split_label else ""
    print(f"Cachet — {lm.source.display_name} on {lm.device}{split} ({lm.load_seconds:.1f} s to load); "
          f"precision {precision.removeprefix('torch.')}; "
          f"speculative decoding: {chat.settings.speculative}; "
          f"decode graphs: {'on' if graphs_wanted(args.graphs, lm.device) else 'off'}; "
          f"attention {lm.attention_note or lm.attention}.{kept} {HELP}", file=sys.stderr, flush=True)
    typed = sys.stdin.isatty()
    if typed:
        with contextlib.suppress(ImportError):  # not on Windows; there the console edits lines itself
            import readline  # noqa: F401  (input() then edits lines: arrows, Home/End, history)
    told: set[str] = set()
    while True:
        try:
            line = input("you> ")
        except EOFError:  # Ctrl+D, or the end of piped input
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt it only clears the line: a reply that just ended is
            print(f"\n({HELP})", file=sys.stderr, flush=True)  # no reason to lose the chat
            continue
        if not typed:  # piped input: show what was sent, so the transcript reads as a chat
            print(line, flush=True)
        text = line.strip()
        if not text:
            continue
        if COMMANDS.match(text):
            command = text.lower()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                before = chat.chat_id
                chat.reset()
                stays = f" (chat {before} stays in {paths.data_dir()})" if chat.persist else ""
                print(f"New chat {chat.chat_id}{stays}.", file=sys.stderr, flush=True)
            elif command == "/help":
                print(HELP, file=sys.stderr, flush=True)
            else:
                print(f"{text}: no such command. {HELP}", file=sys.stderr, flush=True)
            continue
        _answer(chat, line, told)


def cmd_perplexity(args: argparse.Namespace) -> int:
    from engine.perplexity import perplexity

    text = args.text.read_text(encoding="utf-8")
    spec = cache_spec_from_args(args)
    lm = _load(args)
    result = perplexity(lm, text, spec, max_tokens=args.max_tokens, chunk=args.chunk)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{result.tokens} tokens, perplexity {result.ppl:.4f}, cache {result.cache_tokens} tokens "
              f"= {result.cache_bytes / 2**20:.1f} MiB")
    return 0


def _hardware(args: argparse.Namespace) -> Any:
    from engine import memory

    if args.vram_gib is not None or args.ram_gib is not None:
        return memory.simulated_hardware(args.vram_gib, args.ram_gib)
    return memory.read_hardware(models.pick_device(getattr(args, "device", "auto")))


def cmd_advise(args: argparse.Namespace) -> int:
    from engine import memory

    config = models.load_config(args.model, offline=not args.online, trust_remote_code=args.trust_remote_code)
    hardware = _hardware(args)
    dtype = None if args.dtype == "auto" else models.pick_dtype(torch.device(hardware.device), args.dtype)
    advice = memory.advise(config, hardware, context=args.context, dtype=dtype, weights=args.weights)
    if args.json:
        print(json.dumps(advice.to_dict()))
        return 0
    gib = memory.GIB
    where = "GPU" if hardware.has_gpu else "RAM"
    ram = f", {hardware.ram_total / gib:.1f} GiB RAM" if hardware.has_gpu else ""
    plan = advice.weight_plan
    print(f"{hardware.accelerator_total / gib:.1f} GiB {where}{ram}{' (simulated)' if hardware.simulated else ''}; "
          f"weights {advice.weights_bytes / gib:.2f} GiB{f' ({plan.precision})' if plan else ''}; "
          f"free for KV {max(advice.kv_budget, 0) / gib:.2f} GiB; planning for {advice.context:,} tokens")
    for e in advice.estimates:
        print(f"  {e.describe():<58} {e.bytes_at_context / gib:8.2f} GiB at {advice.context:,} tokens")
    print(advice.explanation)
    if plan is not None and advice.recommended is not None:
        tokens = "any length" if advice.tokens_fit is None else f"{advice.tokens_fit:,} tokens fit"
        print(f"Recommended: {plan.describe()}, {advice.recommended.label} KV — {tokens}.")
    return 0


def cmd_bench(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from engine.bench import runner

    try:
        options = runner.options_from_args(args, argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record, out = runner.run(options)
    print(runner.table(record))
    print(f"\nwrote {out / 'bench.json'} and {len(list(out.glob('*.png')))} plots to {out} ({record['seconds']:.0f} s)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from engine import discovery, memory

    found = discovery.discover(args.add_folder)
    hardware = _hardware(args)
    ladder = [p for p, _ in memory.precision_ladder("auto", hardware)]
    fits = [memory.fits_by_precision(m, hardware, ladder, args.context) if m.usable else {} for m in found]
    if args.json:
        print(json.dumps([{**m.to_dict(), "fits": f} for m, f in zip(found, fits, strict=True)]))
        return 0
    gib = memory.GIB
    where = (f"{hardware.vram_total / gib:.1f} GiB GPU, {hardware.ram_total / gib:.1f} GiB RAM" if hardware.has_gpu
             else f"{hardware.ram_total / gib:.1f} GiB RAM, no GPU")
    plan_for = f"{args.context:,} tokens" if args.context else "each model's full context"
    print(f"{len(found)} model{'s' if len(found) != 1 else ''} found. Does it fit this machine ({where}"
          f"{', simulated' if hardware.simulated else ''}) with its weights in {', '.join(ladder)}, planning for "
          f"{plan_for}? yes; N/L: N of its L layers on the GPU, the rest in RAM; sink: only with attention sinks; no.")
    if not found:
        print("Looked in: " + "; ".join(f"{discovery.SOURCES[loc.source]} {loc.path}"
                                        for loc in discovery.default_locations()))
        return 0
    header = ["name", "arch", "params", "quant", "context", "size", "found in", *ladder, "status"]
    rows = []
    for m, fit in zip(found, fits, strict=True):
        status = "ok" if m.usable else f"{m.status}: {m.reason}"
        rows.append([m.name, m.architecture or "—", _count(m.params), m.quantization or "—",
                     _count(m.context_length, exact=True), f"{m.size_bytes / gib:.2f} GiB", m.source_label,
                     *[fit.get(p, {}).get("cell", "—") for p in ladder], status])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]

    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]

    print(line(header))
    for m, row in zip(found, rows, strict=True):
        print(line(row))
        print(f"    {m.path}")
    return 0


def _count(n: int | None, exact: bool = False) -> str:
    if not n:
        return "—"
    if exact:
        return f"{n:,}"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def main(argv: Sequence[str] | None = None, *, loader: Loader | None = None) -> int:
    """Run a subcommand; returns the exit code. `loader` loads the chat's model instead of --model
    (tests inject a tiny one, as `app.__main__.main` takes one)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command != "bench":
            check_args(args)
        if args.command == "chat":
            return cmd_chat(args, loader)
        if args.command == "advise":
            return cmd_advise(args)
        if args.command == "bench":
            return cmd_bench(args, argv)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "serve":
            from engine.server import cmd_serve

            return cmd_serve(args)
        return cmd_perplexity(args)
    except (models.ModelLoadError, DraftModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (SamplingError, caches.CacheConfigError, ArgumentProblem) as exc:  # a setting the user gave is invalid
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl+C while a model loads (a reply's Ctrl+C only stops the reply)
        print("\ninterrupted", file=sys.stderr)
        return 130
