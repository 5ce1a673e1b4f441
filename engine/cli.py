"""`python -m engine`: chat in the terminal, replay scripted turns, measure perplexity."""

from __future__ import annotations

import argparse
import json
import math
import re
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
from engine.service import ChatService
from engine.session import DraftModelError
from engine.specs import OVERFLOW_POLICIES, SPECULATIVE_MODES, SamplingError, SamplingSettings
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
    d = CacheSpec()
    g = p.add_argument_group("KV cache")
    g.add_argument("--cache", default="dynamic", choices=caches.STRATEGIES, help="KV cache strategy")
    g.add_argument("--sink-tokens", type=int, default=d.sink_tokens, help="sink: first tokens always kept")
    g.add_argument("--window", type=int, default=d.window, help="sink: most recent tokens kept")
    g.add_argument("--nbits", type=int, default=None, help="quantized: 2 or 4 bits")
    g.add_argument("--residual", type=int, default=None, help="quantized: recent tokens kept in full precision")
    g.add_argument("--q-group-size", type=int, default=None, help="quantized: values per quantization group")
    g.add_argument("--axis-key", type=int, default=None, choices=(0, -1), help="quantized: 0 per token, -1 per channel")
    g.add_argument("--axis-value", type=int, default=None, choices=(0, -1))
    g.add_argument("--backend", default=d.backend, choices=caches.BACKENDS, help="quantized: quanto or hqq")
    g.add_argument("--max-cache-len", type=int, default=d.max_cache_len, help="static: pre-allocated tokens")


def cache_spec_from_args(args: argparse.Namespace) -> CacheSpec:
    """The CacheSpec the flags ask for; quantization flags left out take the measured defaults for nbits."""
    spec = CacheSpec(strategy=args.cache, sink_tokens=args.sink_tokens, window=args.window, backend=args.backend,
                     max_cache_len=args.max_cache_len)
    quant = {"nbits": args.nbits if args.nbits is not None else spec.nbits}
    quant.update(caches.quantization_defaults(quant["nbits"]))
    for name in ("residual", "q_group_size", "axis_key", "axis_value"):
        if getattr(args, name) is not None:
            quant[name] = getattr(args, name)
    return spec.with_changes(**quant)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Cachet's engine from the terminal.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a model (interactive, or scripted with --turns)")
    _add_model_args(chat)
    _add_cache_args(chat)
    chat.add_argument("--system", default="", help="system prompt")
    defaults = SamplingSettings()
    chat.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=defaults.top_p)
    chat.add_argument("--top-k", type=int, default=defaults.top_k)
    chat.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    chat.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--overflow", default="stop", choices=OVERFLOW_POLICIES,
                      help="when the chat outgrows the model's context: stop, truncate-middle, or switch to sink")
    chat.add_argument("--speculative", default="auto", choices=SPECULATIVE_MODES,
                      help="check guessed tokens several per step (prompt lookup: guesses from the conversation "
                           "itself); greedy replies are the same token for token either way")
    chat.add_argument("--graphs", default="auto", choices=GRAPH_MODES,
                      help="one-token decode steps as captured CUDA graphs over KV buffers grown in buckets: auto "
                           "(on for CUDA, off for CPU), on (on a CPU: the same static-shaped step, uncaptured), off")
    chat.add_argument("--draft-model", default=None, metavar="PATH",
                      help="with --speculative draft-model: a small model of the same family (same tokenizer) that "
                           "guesses the next tokens, e.g. SmolLM2-135M for SmolLM2-360M/1.7B (a .gguf or a folder)")
    chat.add_argument("--no-reuse", action="store_true",
                      help="recompute the whole conversation every turn (the baseline reuse is measured against)")
    chat.add_argument("--turns", type=Path, help="file with one user message per line")
    chat.add_argument("--json", action="store_true", help="with --turns: one JSON object per turn")
    chat.add_argument("--data-dir", type=Path,
                      help="keep the chat (and, on quitting, its KV cache as a snapshot) under this folder, as the "
                           "app's --data-dir does; without it nothing is kept")
    chat.add_argument("--chat", type=int, default=None,
                      help="with --data-dir: go on with this chat (its number is printed at the start)")

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
    if getattr(args, "speculative", None) == "draft-model" and not getattr(args, "draft_model", None):
        raise ArgumentProblem("--speculative draft-model needs --draft-model PATH (a small model of the same family).")
    if getattr(args, "draft_model", None) and getattr(args, "speculative", None) != "draft-model":
        raise ArgumentProblem("--draft-model is used by --speculative draft-model; add that, or leave the draft out.")
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
    if args.command in ("chat", "perplexity"):
        spec = cache_spec_from_args(args)  # CacheConfigError: exit 2 with its sentence
        if spec.strategy == "offloaded" and models.pick_device(args.device).type == "cpu":
            raise ArgumentProblem("--cache offloaded moves the cache between the GPU and RAM; on the CPU there is "
                                  "nothing to offload to. Choose another --cache, or a --device with a GPU.")
    if args.command == "chat":
        SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                         seed=args.seed).validate()  # SamplingError: exit 2
        if args.chat is not None and args.data_dir is None:
            raise ArgumentProblem("--chat needs --data-dir (the folder the chat is kept in).")
        if args.turns is not None and not any(line.strip() for line in _read_text(args.turns, "--turns").splitlines()):
            raise ArgumentProblem(f"--turns {args.turns}: the file holds no message (one per line).")
        if args.data_dir is not None:
            try:
                paths.check_data_dir(args.data_dir.expanduser().resolve())
            except paths.DataDirError as exc:
                raise ArgumentProblem(f"--data-dir: {exc}") from None


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
        })
        if s.graph_fallback:
            record["graph_fallback"] = s.graph_fallback
    if done.error:
        record["error"] = done.error
    return json.dumps(record, ensure_ascii=False)


class TerminalChat:
    """One chat in the terminal, through the same ChatService as the window: its messages are kept in
    a ChatStore (the data folder's, or one in memory), its cache in the service's pool."""

    def __init__(self, args: argparse.Namespace, settings: ChatSettings) -> None:
        persist = args.data_dir is not None
        self.lock: DataFolderLock | None = None
        if persist:
            paths.use_base_dir(args.data_dir.expanduser().resolve())
            # the same lock as the app and the server: one owner per data folder (FolderInUseError)
            self.lock = DataFolderLock(paths.data_dir(), owner="chat").acquire()
        try:
            self.store = ChatStore(paths.data_dir() / "chats.sqlite3" if persist else Path(":memory:"))
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        self.service = ChatService(budgets=Budgets() if persist else Budgets(disk=0), reuse=not args.no_reuse,
                                   graphs=getattr(args, "graphs", "auto"),
                                   on_status=lambda msg: print(f"note: {msg}", file=sys.stderr, flush=True))
        if args.chat is not None:
            try:
                self.chat_id = self.store.chat(args.chat).id
            except KeyError:
                self.close_store()
                raise LookupError(f"There is no chat {args.chat} in {paths.data_dir()}.") from None
            self.settings = self.store.chat(self.chat_id).settings
        else:
            self.chat_id = self.store.create_chat(settings).id
            self.settings = settings
        self.persist = persist

    def load(self, args: argparse.Namespace) -> LoadedModel:
        self.service.load_model(lambda progress: _load(args, progress))
        assert self.service.lm is not None
        if getattr(args, "draft_model", None):
            self.service.load_draft_model(lambda progress: models.load(
                args.draft_model, device=args.device, dtype=args.dtype, offline=not args.online,
                trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, progress=progress))
        return self.service.lm

    def turn(self, text: str, on_delta: Callable[[str], None] | None = None,
             stop: threading.Event | None = None) -> TurnDone:
        """Keep the user's message, answer it, keep the reply (partial ones too)."""
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


def _turn_interruptible(chat: TerminalChat, text: str) -> TurnDone:
    """Generate in a helper thread so Ctrl+C stops the reply instead of the chat."""
    stop = threading.Event()
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["done"] = chat.turn(text, on_delta=lambda d: print(d, end="", flush=True), stop=stop)
        except BaseException as exc:  # handed to the main thread below
            box["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        try:
            worker.join(0.1)
        except KeyboardInterrupt:
            stop.set()
    print()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["done"]  # type: ignore[return-value]


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                repetition_penalty=args.repetition_penalty,
                                max_new_tokens=args.max_new_tokens, seed=args.seed).validate()
    settings = ChatSettings(system_prompt=args.system, sampling=sampling, cache=cache_spec_from_args(args),
                            overflow=args.overflow, speculative=args.speculative)
    try:
        chat = TerminalChat(args, settings)
    except (LookupError, FolderInUseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return _chat(args, chat)
    finally:
        chat.close()


def _chat(args: argparse.Namespace, chat: TerminalChat) -> int:
    lm = chat.load(args)
    told_graphs: str | None = None
    if args.turns:
        lines = [ln for ln in args.turns.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for i, line in enumerate(lines, start=1):
            done = chat.turn(line) if args.json else _turn_interruptible(chat, line)
            if args.json:
                print(_turn_json(i, done), flush=True)
            if done.finish_reason in ("overflow", "error"):  # said on stderr and in the exit code, too
                print(f"error: turn {i}: {done.error}", file=sys.stderr)
                return 1
            if done.notice:
                print(f"note: {done.notice}", file=sys.stderr)
            if done.stats is not None and done.stats.overflow_action:
                print(f"note: {done.stats.overflow_action}", file=sys.stderr)
            if done.stats is not None and done.stats.graph_fallback and done.stats.graph_fallback != told_graphs:
                told_graphs = done.stats.graph_fallback
                print(f"note: graph-captured decoding: {told_graphs}", file=sys.stderr)
        return 0

    kept = f" Chat {chat.chat_id} in {paths.data_dir()} (--chat {chat.chat_id} goes on with it)." \
        if chat.persist else ""
    precision = lm.precision_note if lm.precision_note and lm.precision_note != "chosen" else lm.precision_label
    if lm.weights in ("int8", "int4"):
        precision = lm.precision_label
    split = f" ({lm.split_label})" if lm.split_label else ""
    print(f"Cachet — {lm.source.display_name} on {lm.device}{split} ({lm.load_seconds:.1f} s to load); "
          f"precision {precision.removeprefix('torch.')}; speculative decoding: {args.speculative}; "
          f"decode graphs: {'on' if graphs_wanted(args.graphs, lm.device) else 'off'}; "
          f"attention {lm.attention_note or lm.attention}.{kept} "
          "Ctrl+C stops a reply; /reset starts a new chat; /quit or Ctrl+D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            chat.reset()
            continue
        print("bot> ", end="", flush=True)
        done = _turn_interruptible(chat, line)
        if done.finish_reason == "overflow":
            print(f"error: {done.error}", file=sys.stderr)
            continue
        if done.notice:
            print(f"note: {done.notice}", file=sys.stderr)
        s = done.stats
        if s is None:
            print(f"  [{done.finish_reason}: {done.error}]" if done.error else "  [stopped]", file=sys.stderr)
            continue
        if s.overflow_action:
            print(f"note: the chat outgrew the model's context: {s.overflow_action}", file=sys.stderr)
        if s.cache_fallback:
            print(f"note: {s.cache_fallback}", file=sys.stderr)
        if s.graph_fallback and s.graph_fallback != told_graphs:
            told_graphs = s.graph_fallback  # once per reason, not every turn
            print(f"note: graph-captured decoding: {s.graph_fallback}", file=sys.stderr)
        note = f" [{s.finish_reason}: {s.error}]" if s.error else ""
        if s.finish_reason == "cancelled":
            note = " [stopped]"
        speculative = f", {s.tokens_per_step:.2f} tokens/step" if s.speculative and s.tokens_per_step else ""
        print(f"  ({s.reused_tokens}/{s.prompt_tokens} prompt tokens reused, {s.prefilled_tokens} prefilled, "
              f"TTFT {s.ttft_ms:.0f} ms, {s.decode_tok_s:.1f} tok/s{speculative}, cache {s.cache_tokens} tokens "
              f"= {s.cache_bytes / 2**20:.1f} MiB){note}", file=sys.stderr)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command != "bench":
            check_args(args)
        if args.command == "chat":
            return cmd_chat(args)
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
