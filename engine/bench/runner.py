"""`python -m engine bench`: measure Cachet against recomputing, plain transformers and llama.cpp.

Sections (each can be run alone with `--only`):

* ttft — a follow-up message of ~30 tokens after histories of 256 … 8k tokens (32k on a GPU):
  time to the first token with the cache kept, and recomputing the conversation every turn, per
  strategy; transformers' `generate()` on the whole conversation; llama.cpp with its prompt cache.
* memory — the KV cache's real size after each history (bytes its tensors hold; on a GPU also the
  allocator's count) next to the advisor's estimate (`caches.bytes_for`).
* decode — tokens per second at the start of a long reply and after 256 generated tokens, after a
  short and a long history.
* fidelity — perplexity on the shipped long text (read from resources/fidelity.json when it was
  measured with this model on this text, else measured), and the share of the full cache's greedy
  tokens each strategy predicts too (20 questions about one passage × 64 tokens, teacher-forced).
* chat — a scripted six-turn chat (questions, code, an edit of that code, a summary of an earlier
  reply): time to first token and decode speed per turn, for Cachet and the peers.

Every timed figure is the median with min–max over `--repeat` runs, after a warm-up. Results go to
one JSON record and one PNG per section; a short table is printed.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine import caches, models, paths
from engine.bench import machine, plots, shapes, workload
from engine.bench.record import SCHEMA, SECTIONS, Figure, figure_or_none, validate
from engine.bench.systems import (
    CachetSystem,
    LlamaCppSystem,
    Reply,
    System,
    TransformersSystem,
    llama_cpp_available,
)
from engine.caches import CacheSpec
from engine.caches import fidelity as fidelity_table
from engine.graphs import GRAPH_MODES
from engine.models import LoadedModel
from engine.session import ChatSession, Message, SessionSettings
from engine.specs import SPECULATIVE_MODES

PEERS = ("llama-cpp", "transformers")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full benchmark, or `--quick` (proves the harness in well under a minute)."""

    histories: tuple[int, ...]
    decode_histories: tuple[int, ...]
    decode_late_at: int  # the "after N generated tokens" point
    decode_window: int  # tokens per speed reading
    fidelity_doc_tokens: int
    fidelity_questions: int
    fidelity_tokens: int
    ppl_tokens: int
    chat_turns: int
    chat_max_new: int

    @classmethod
    def full(cls, gpu: bool) -> Plan:
        histories = (256, 512, 1024, 2048, 4096, 8192) + ((16384, 32768) if gpu else ())
        return cls(histories, (256, 4096, 8192), 256, 32, 2000, 20, 64, 8000, len(workload.CHAT_TURNS), 128)

    @classmethod
    def quick(cls) -> Plan:
        return cls((64, 128), (64,), 8, 4, 160, 2, 8, 96, 2, 8)


@dataclass
class BenchOptions:
    """The command line, as data (see `add_arguments`)."""

    quick: bool = False
    out: Path | None = None
    model: str = models.DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    weights: str = "auto"  # models.load's weight precision
    gpu_layers: int | None = None
    caches: tuple[str, ...] = ()  # empty: every strategy
    peers: tuple[str, ...] = ("transformers",)
    repeat: int | None = None  # None: 3, or 1 with --quick
    threads: int | None = None
    only: tuple[str, ...] = SECTIONS
    chat_cache: str = "dynamic"
    speculative: str = "auto"  # Cachet's speculative decoding; the chat section also runs it "off" to compare
    graphs: str = "auto"  # Cachet's graph-captured one-token steps (engine/graphs.py): auto = on for CUDA
    plots: bool = True
    command: str = "python -m engine bench"
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def runs(self) -> int:
        return self.repeat if self.repeat is not None else (1 if self.quick else 3)


def add_arguments(p: Any) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a few short histories, one run, small token counts, no llama.cpp: proves the harness")
    p.add_argument("--out", type=Path, help="folder for bench.json and the plots (default: docs/bench/DATE-DEVICE "
                                            "in a checkout, else the data folder's bench/)")
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="'default', a .gguf / folder / Hub id, or shape:llama-3.2-1b | shape:llama-3.1-8b "
                        "(random weights of that shape, for GPU timing)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    from engine.cli import add_weight_args

    add_weight_args(p)
    p.add_argument("--cache", action="append", choices=caches.STRATEGIES, dest="caches",
                   help="a strategy to measure (repeatable; default: all)")
    p.add_argument("--peer", action="append", choices=PEERS, dest="peers",
                   help="a peer to compare with (repeatable; default: transformers, plus llama-cpp when installed)")
    p.add_argument("--no-peers", action="store_true", help="measure Cachet only")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per figure (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp (default: torch's)")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    p.add_argument("--speculative", default="auto", choices=[m for m in SPECULATIVE_MODES if m != "draft-model"],
                   help="Cachet's speculative decoding (default auto); the scripted chat is also run with it off. "
                        "A draft model is measured with `python -m engine chat --speculative draft-model --turns`")
    p.add_argument("--graphs", default="auto", choices=GRAPH_MODES,
                   help="Cachet's one-token decode steps as captured CUDA graphs (auto: on for CUDA, off for CPU)")
    p.add_argument("--chat-cache", default="dynamic", choices=caches.STRATEGIES,
                   help="the strategy the scripted chat runs with")
    p.add_argument("--no-plots", action="store_true", help="write the JSON and the table only")


def options_from_args(args: Any, argv: Sequence[str] | None = None) -> BenchOptions:
    if args.repeat is not None and args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, not {args.repeat}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, not {args.threads}.")
    from engine.cli import check_weight_args

    problem = check_weight_args(args.weights, args.dtype, args.gpu_layers, args.device)
    if problem is not None:
        raise ValueError(problem)
    if shapes.is_shape(args.model) and (args.weights != "auto" or args.gpu_layers is not None):
        raise ValueError("--weights and --gpu-layers apply to a real model, not to a shape: of random weights.")
    if args.no_peers:
        peers: tuple[str, ...] = ()
    elif args.peers:
        peers = tuple(dict.fromkeys(args.peers))
    elif args.quick:
        peers = ("transformers",)
    else:
        peers = ("transformers",) + (("llama-cpp",) if llama_cpp_available() is None else ())
    words = list(argv) if argv is not None else sys.argv[1:]
    return BenchOptions(
        quick=args.quick, out=args.out, model=args.model, device=args.device, dtype=args.dtype,
        weights=args.weights, gpu_layers=args.gpu_layers,
        caches=tuple(dict.fromkeys(args.caches or ())), peers=peers, repeat=args.repeat, threads=args.threads,
        only=tuple(dict.fromkeys(args.only)) if args.only else SECTIONS,
        chat_cache=args.chat_cache, speculative=args.speculative, graphs=args.graphs,
        plots=not args.no_plots, command="python -m engine " + " ".join(words),
    )


def default_out_dir(device: torch.device, quick: bool, model_label: str) -> Path:
    """docs/bench/DATE-DEVICE[-quick] in a checkout, else bench/… in the user's data folder."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", f"{where} {model_label}".lower()).strip("-")
    name = f"{_dt.date.today().isoformat()}-{slug}" + ("-quick" if quick else "")
    in_checkout = (ROOT / ".git").exists() and (ROOT / "docs").is_dir()
    return (ROOT / "docs" / "bench" if in_checkout else paths.data_dir() / "bench") / name


def strategy_specs(lm: LoadedModel, wanted: Sequence[str], max_tokens: int) -> dict[str, CacheSpec]:
    """Each strategy with the defaults a user gets (static sized for the longest conversation measured)."""
    q4 = caches.quantization_defaults(4)
    specs = {
        "dynamic": CacheSpec(),
        "sink": CacheSpec(strategy="sink"),
        "quantized": CacheSpec(strategy="quantized", **q4),
        "sink-quantized": CacheSpec(strategy="sink-quantized", **q4),
        "offloaded": CacheSpec(strategy="offloaded"),
        "static": CacheSpec(strategy="static", max_cache_len=max(16, min(lm.context_length, max_tokens))),
    }
    return {name: spec.validate() for name, spec in specs.items() if not wanted or name in wanted}


def _gpu_allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


class Bench:
    """One benchmark run: a loaded model, the plan, the systems, and the record being filled."""

    def __init__(self, lm: LoadedModel, options: BenchOptions, plan: Plan) -> None:
        self.lm = lm
        self.options = options
        self.plan = plan
        self.log = options.log
        self.repeat = options.runs
        self.unavailable: dict[str, str] = {}
        self.results: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
        reply_room = max(plan.decode_late_at + plan.decode_window + 1, plan.chat_max_new, 64)
        limit = lm.context_length - 64 - reply_room
        self.histories = [self._history(min(h, limit)) for h in plan.histories if h <= lm.context_length]
        reasons = caches.availability(lm.device)
        longest = max([h.tokens for h in self.histories] + [0])
        specs = strategy_specs(lm, options.caches, longest + reply_room + 128)
        self.specs: dict[str, CacheSpec] = {}
        for name, spec in specs.items():
            reason = reasons.get(name)
            if reason is None and spec.strategy in ("quantized", "sink-quantized"):
                reason = caches.backend_availability().get(spec.backend)
            if reason is not None:
                self.unavailable[name] = reason
            else:
                self.specs[name] = spec
        self.gguf = self._gguf_path()
        self.llama: LlamaCppSystem | None = None

    # ----- inputs ------------------------------------------------------------------------------
    def _render_len(self, messages: Sequence[dict[str, str]]) -> int:
        text = self.lm.tokenizer.apply_chat_template(list(messages), add_generation_prompt=False, tokenize=False)
        return len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokenize(self, text: str) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _detokenize(self, ids: list[int]) -> str:
        return str(self.lm.tokenizer.decode(ids, skip_special_tokens=True))

    def _history(self, target: int) -> workload.History:
        return workload.build_history(target, self._render_len, self._tokenize, self._detokenize)

    def _gguf_path(self) -> str | None:
        if shapes.is_shape(self.options.model):
            return None
        try:
            source = models.resolve(self.options.model)
        except models.ModelLoadError:
            return None
        return source.location if source.kind == "gguf" else None

    # ----- peers -----------------------------------------------------------------------------
    def peers(self) -> list[System]:
        out: list[System] = []
        for peer in self.options.peers:
            if peer == "transformers":
                out.append(TransformersSystem(self.lm))
            elif peer == "llama-cpp":
                llama = self._llama()
                if llama is not None:
                    out.append(llama)
        return out

    def _llama(self) -> LlamaCppSystem | None:
        if self.llama is not None:
            return self.llama
        hint = llama_cpp_available()
        if hint is not None:
            self.unavailable["llama.cpp"] = hint
            return None
        if self.gguf is None:
            self.unavailable["llama.cpp"] = "llama.cpp runs GGUF files; this model is not one."
            return None
        if self.lm.device.type != "cpu":
            self.unavailable["llama.cpp"] = ("llama-cpp-python is compared on the CPU only here (a GPU build of "
                                             "llama.cpp is a different peer).")
            return None
        self.llama = LlamaCppSystem(self.gguf, self.lm.context_length, torch.get_num_threads())
        self.log(f"llama.cpp {self.llama.version}: loaded {Path(self.gguf).name} in {self.llama.load_seconds:.1f} s")
        return self.llama

    # ----- sections --------------------------------------------------------------------------
    def _follow_up(self, history: workload.History, r: int) -> list[dict[str, str]]:
        return workload.as_messages(history, workload.FOLLOW_UPS[r % len(workload.FOLLOW_UPS)])

    def _ttft_row(self, system: System, strategy: str, mode: str, history: workload.History,
                  replies: list[Reply]) -> dict[str, Any]:
        reused = [r.reused_tokens for r in replies if r.reused_tokens is not None]
        return {
            "system": system.name, "label": system.label, "strategy": strategy, "mode": mode,
            "history": history.target, "history_tokens": history.tokens,
            "ms": Figure.of(r.ttft_ms for r in replies).to_dict(),
            "prompt_tokens": replies[-1].prompt_tokens,
            "reused_tokens": int(sorted(reused)[len(reused) // 2]) if reused else None,
        }

    def run_ttft(self, with_memory: bool) -> None:
        if not self.histories:
            return
        first = self.histories[0]
        for name, spec in self.specs.items():
            kept = CachetSystem(self.lm, spec, speculative=self.options.speculative, graphs=self.options.graphs)
            base = _gpu_allocated(self.lm.device)
            kept.prepare(first.messages)
            kept.reply(self._follow_up(first, -1), 1)  # warm-up
            for h in self.histories:
                kept.prepare(h.messages)
                if with_memory:
                    self._memory_row(name, spec, kept, base)
                replies = [kept.reply(self._follow_up(h, r), 1) for r in range(self.repeat)]
                if "ttft" in self.options.only:
                    self.results["ttft"].append(self._ttft_row(kept, name, "kept", h, replies))
                    self.log(f"ttft  {kept.label:<28} {h.tokens:>6,} tokens: {replies[-1].ttft_ms:9.1f} ms "
                             f"({replies[-1].reused_tokens:,} of {replies[-1].prompt_tokens:,} reused)")
            kept.close()
            del kept
            if "ttft" not in self.options.only:
                continue
            again = CachetSystem(self.lm, spec, reuse=False, speculative=self.options.speculative,
                                 graphs=self.options.graphs)
            again.reply(self._follow_up(first, -1), 1)  # warm-up
            for h in self.histories:
                replies = [again.reply(self._follow_up(h, r), 1) for r in range(self.repeat)]
                self.results["ttft"].append(self._ttft_row(again, name, "recompute", h, replies))
                self.log(f"ttft  {again.label:<28} {h.tokens:>6,} tokens: {replies[-1].ttft_ms:9.1f} ms")
            again.close()
        if "ttft" not in self.options.only:
            return
        for peer in self.peers():
            peer.prepare(first.messages)
            peer.reply(self._follow_up(first, -1), 1)  # warm-up
            for h in self.histories:
                peer.prepare(h.messages)
                replies = [peer.reply(self._follow_up(h, r), 1) for r in range(self.repeat)]
                mode = "kept" if peer.name == "llama.cpp" else "recompute"
                self.results["ttft"].append(self._ttft_row(peer, peer.name, mode, h, replies))
                self.log(f"ttft  {peer.label:<28} {h.tokens:>6,} tokens: {replies[-1].ttft_ms:9.1f} ms")

    def _memory_row(self, name: str, spec: CacheSpec, system: CachetSystem, base: int | None) -> None:
        tokens = system.cache_tokens()
        cache = system.session.cache
        row: dict[str, Any] = {
            "strategy": name, "label": f"{name}", "tokens": tokens,
            "stored_tokens": caches.seq_length(cache),
            "measured_bytes": caches.cache_bytes(cache),
            "estimated_bytes": caches.bytes_for(spec, tokens, self.lm.config, self.lm.dtype),
        }
        allocated = _gpu_allocated(self.lm.device)
        if allocated is not None and base is not None:
            row["allocated_bytes"] = allocated - base
        self.results["memory"].append(row)

    def run_decode(self) -> None:
        plan = self.plan
        gen = plan.decode_late_at + plan.decode_window + 1
        histories = [self._history(min(h, self.histories[-1].target if self.histories else h))
                     for h in plan.decode_histories]
        systems: list[tuple[str, System]] = [
            (n, CachetSystem(self.lm, s, speculative=self.options.speculative, graphs=self.options.graphs))
            for n, s in self.specs.items()]
        systems += [(p.name, p) for p in self.peers()]
        for strategy, system in systems:
            system.prepare(histories[0].messages)
            system.reply(workload.as_messages(histories[0], workload.LONG_ANSWER), 8, 8)  # warm-up
            for h in histories:
                system.prepare(h.messages)
                replies = [system.reply(workload.as_messages(h, workload.LONG_ANSWER), gen, gen)
                           for _ in range(self.repeat)]
                for phase, start in (("start", 0), ("late", plan.decode_late_at)):
                    self.results["decode"].append({
                        "system": system.name, "label": system.label, "strategy": strategy, "history": h.target,
                        "history_tokens": h.tokens, "phase": phase, "at_token": start, "window": plan.decode_window,
                        "tok_s": figure_or_none(r.rate(start, plan.decode_window) for r in replies),
                        "graphs": system.graphs_note() if isinstance(system, CachetSystem) else None,
                    })
                speeds = [r.rate(0, plan.decode_window) for r in replies]
                late = [r.rate(plan.decode_late_at, plan.decode_window) for r in replies]
                self.log(f"decode {system.label:<28} {h.tokens:>6,} tokens: start {_fmt(speeds)} tok/s, "
                         f"after {plan.decode_late_at} {_fmt(late)} tok/s")
            system.close()

    def run_fidelity(self) -> None:
        """The strategies' fidelity in plain fp32 arithmetic (bf16 weight copies, if the model has them, are
        switched off: what each strategy costs is measured alone), then the precisions against fp32."""
        from engine import half_weights

        with half_weights.kernel_limit(self.lm.model, 0):
            self._strategy_fidelity()

    def _strategy_fidelity(self) -> None:
        plan = self.plan
        document = workload.fidelity_document(plan.fidelity_doc_tokens, self._tokenize, self._detokenize)
        questions = workload.FIDELITY_QUESTIONS[: plan.fidelity_questions]
        prompts = [workload.fidelity_prompt(document, q) for q in questions]
        stop = sorted(self.lm.stop_token_ids)
        reference = CachetSystem(self.lm, CacheSpec(), speculative="off")
        ref_ids: list[list[int]] = []
        for prompt in prompts:
            reference.reply([{"role": "user", "content": prompt}], plan.fidelity_tokens, plan.fidelity_tokens)
            ids = reference.session.messages[-1].token_ids or []
            ref_ids.append(list(ids))
        reference.close()
        table = _fidelity_table(self.lm) or {}
        reference_ppl: float | None = None
        for name, spec in self.specs.items():
            agree, total = _agreement(self.lm, spec, prompts, ref_ids, stop)
            row = table.get(name)
            if row is None:
                if reference_ppl is None:
                    reference_ppl = _measure_ppl(self.lm, CacheSpec(), plan.ppl_tokens)
                ppl = reference_ppl if name == "dynamic" else _measure_ppl(self.lm, spec, plan.ppl_tokens)
                row = {"ppl": ppl, "ppl_ratio": ppl / reference_ppl, "ppl_source": "measured",
                       "ppl_tokens": plan.ppl_tokens}
            self.results["fidelity"].append({
                "strategy": name, "label": name, **row, "agreement": agree / total if total else None,
                "agreement_tokens": total, "spec": spec.to_dict(), "dtype": _dtype_name(self.lm.dtype),
            })
            self.log(f"fidelity {name:<16} ppl {row['ppl']:.3f} (×{row['ppl_ratio']:.3f}, {row['ppl_source']}); "
                     f"agreement {agree}/{total}")
        self._precision_fidelity(prompts, ref_ids, stop)

    def _precision_fidelity(self, prompts: list[str], ref_ids: list[list[int]], stop: list[int]) -> None:
        """The CPU precisions `--dtype auto` may choose, against fp32: the whole model in bf16, and fp32 with
        bf16 copies of the weights (engine/half_weights.py) measured with *every* product on the copies
        (decoding steps use them; prefill does not, so this bounds what a reply sees). Perplexity of the
        full cache on the long text and greedy agreement with fp32's replies, all measured here."""
        from engine import half_weights

        lm = self.lm
        if lm.device.type != "cpu" or lm.dtype not in (torch.float32, torch.bfloat16) or lm.weights in ("int8", "int4"):
            return  # (int8/int4 weights: scripts/measure_fidelity.py --weights compares the weight precisions)
        base = lm.identity.rsplit("|", 1)[0]
        full = lm if lm.dtype == torch.float32 else replace(
            lm, model=copy.deepcopy(lm.model).to(torch.float32), dtype=torch.float32, identity=base + "|float32")
        tokens = self.plan.ppl_tokens
        with half_weights.kernel_limit(full.model, 0):  # plain fp32, also where the model has bf16 copies
            if full is not lm or half_weights.is_converted(lm.model):  # the replies to agree with are fp32's
                reference = CachetSystem(full, CacheSpec(), speculative="off")
                ref_ids = []
                for prompt in prompts:
                    reference.reply([{"role": "user", "content": prompt}], self.plan.fidelity_tokens,
                                    self.plan.fidelity_tokens)
                    ref_ids.append(list(reference.session.messages[-1].token_ids or []))
                reference.close()
            ppl_full = _measure_ppl(full, CacheSpec(), tokens)
        bf16 = lm if lm.dtype == torch.bfloat16 else replace(
            lm, model=copy.deepcopy(full.model).to(torch.bfloat16), dtype=torch.bfloat16, identity=base + "|bfloat16")
        copies = lm if half_weights.is_converted(lm.model) else None
        if copies is None and half_weights.convertible(full.model):
            copies = replace(full, model=copy.deepcopy(full.model), identity=base + "|bf16-weights")
            half_weights.convert(copies.model, half_weights.NEVER)
        candidates: list[tuple[str, str, LoadedModel]] = [("bfloat16", "dynamic, bf16 (vs fp32)", bf16)]
        if copies is not None:
            candidates.append(("bf16-weights", "dynamic, fp32 + bf16 weight copies (vs fp32)", copies))
        for dtype, label, model in candidates:
            with half_weights.kernel_limit(model.model, half_weights.NEVER):
                ppl = _measure_ppl(model, CacheSpec(), tokens)
                agree, total = _agreement(model, CacheSpec(), prompts, ref_ids, stop)
            self.results["fidelity"].append({
                "strategy": "dynamic", "label": label, "dtype": dtype, "ppl": ppl,
                "ppl_ratio": ppl / ppl_full, "ppl_reference": ppl_full, "ppl_source": "measured",
                "ppl_tokens": tokens, "agreement": agree / total if total else None, "agreement_tokens": total,
                "spec": CacheSpec().to_dict(),
            })
            self.log(f"fidelity {dtype} vs fp32 ppl {ppl:.3f} vs {ppl_full:.3f} (×{ppl / ppl_full:.4f}); "
                     f"agreement {agree}/{total}")

    def run_chat(self) -> None:
        plan = self.plan
        turns = workload.CHAT_TURNS[: plan.chat_turns]
        name = self.options.chat_cache
        spec = strategy_specs(self.lm, (name,), self.lm.context_length).get(name)
        if spec is None or name in self.unavailable:
            self.unavailable["chat"] = f"{name}: {self.unavailable.get(name, 'not available')}"
            return
        # Cachet starts every run with a new session (an empty cache); the peers keep nothing that matters
        # between runs (llama.cpp's prompt cache no longer matches a new conversation's first turn).
        mode = self.options.speculative
        makers: list[Callable[[], System]] = [
            lambda: CachetSystem(self.lm, spec, label=f"Cachet {name}", speculative=mode, graphs=self.options.graphs)]
        if mode != "off":  # the same chat decoded one token per step, to show what speculation gives
            makers.append(lambda: CachetSystem(self.lm, spec, label=f"Cachet {name} (no speculation)",
                                               speculative="off", graphs=self.options.graphs))
        for peer in self.peers():
            makers.append(functools.partial(lambda p: p, peer))
        for make in makers:
            system = make()
            system.reply([{"role": "user", "content": turns[-1]}], 4)  # warm-up
            system.close()
            per_turn: list[list[Reply]] = [[] for _ in turns]
            for _ in range(self.repeat):
                system = make()
                messages: list[dict[str, str]] = []
                for i, turn in enumerate(turns):
                    messages.append({"role": "user", "content": turn})
                    reply = system.reply(messages, plan.chat_max_new)
                    per_turn[i].append(reply)
                    messages.append({"role": "assistant", "content": reply.text})
                system.close()
            for i, turn in enumerate(turns):
                replies = per_turn[i]
                self.results["chat"].append({
                    "system": system.name, "label": system.label, "strategy": name if system.name == "cachet"
                    else system.name, "turn": i + 1, "prompt": turn,
                    "ttft_ms": Figure.of(r.ttft_ms for r in replies).to_dict(),
                    "decode_tok_s": figure_or_none(r.decode_rate() for r in replies),
                    "generated_tokens": replies[-1].generated, "prompt_tokens": replies[-1].prompt_tokens,
                    "reused_tokens": replies[-1].reused_tokens,
                    "tokens_per_step": replies[-1].tokens_per_step,
                    "speculative": system.session.settings.speculative if isinstance(system, CachetSystem) else None,
                })
                self.log(f"chat  {system.label:<28} turn {i + 1}: TTFT {replies[-1].ttft_ms:7.1f} ms, "
                         f"{_fmt([r.decode_rate() for r in replies])} tok/s, {replies[-1].generated} tokens")

    def finish(self) -> None:
        """Free what the peers hold (llama.cpp's model and context)."""
        if self.llama is not None:
            self.llama.shutdown()
            self.llama = None

    # ----- the record ------------------------------------------------------------------------
    def record(self, started: float) -> dict[str, Any]:
        lm = self.lm
        bandwidth = machine.copy_bandwidth(lm.device, mib=1024 if lm.device.type == "cuda" else 256)
        from engine import half_weights

        step_bytes = half_weights.decode_bytes(lm.model)  # with bf16 copies, a step reads those, not the fp32 weights
        limit = bandwidth.median * 1e9 / step_bytes
        params = sum(p.numel() for p in lm.model.parameters())
        record: dict[str, Any] = {
            "schema": SCHEMA,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": self.options.command,
            "quick": self.options.quick,
            "seconds": round(time.perf_counter() - started, 1),
            "machine": machine.machine_info(lm.device),
            "packages": machine.package_versions(),
            "model": {"name": lm.source.display_name, "spec": self.options.model, "identity": lm.identity,
                      "dtype": str(lm.dtype).removeprefix("torch."), "precision": lm.precision_label,
                      "precision_note": lm.precision_note, "device": str(lm.device), "weights": lm.weights,
                      "gpu_layers": lm.gpu_layers, "layers": lm.layers,
                      "parameters": params, "weights_bytes": lm.weights_bytes, "context_length": lm.context_length,
                      "gguf": Path(self.gguf).name if self.gguf else None},
            "settings": {
                "repeat": self.repeat, "threads": torch.get_num_threads(), "sections": list(self.options.only),
                "plan": self.plan.__dict__, "history_tokens": [h.tokens for h in self.histories],
                "strategies": {n: s.to_dict() for n, s in self.specs.items()}, "peers": list(self.options.peers),
                "chat_cache": self.options.chat_cache, "speculative": self.options.speculative,
                "graphs": self.options.graphs,
            },
            "bandwidth": {"copy_gb_s": bandwidth.to_dict(), "weights_bytes": lm.weights_bytes,
                          "decode_step_bytes": step_bytes,
                          "decode_limit_tok_s": limit},
            "unavailable": dict(self.unavailable),
            "results": self.results,
        }
        record["summary"] = summarize(record)
        return record


def _fmt(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    return f"{sorted(vals)[len(vals) // 2]:.1f}" if vals else "—"


def _fidelity_table(lm: LoadedModel) -> dict[str, dict[str, Any]] | None:
    """resources/fidelity.json's rows by strategy, when it was measured with this model on the shipped text."""
    try:
        table = json.loads(fidelity_table.TABLE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if table.get("model") != lm.identity or table.get("text") != workload.LONG_TEXT_PATH.name:
        return None
    out: dict[str, dict[str, Any]] = {}
    q4 = caches.quantization_defaults(4)
    wanted = {"dynamic": CacheSpec(), "sink": CacheSpec(strategy="sink"),
              "quantized": CacheSpec(strategy="quantized", **q4),
              "sink-quantized": CacheSpec(strategy="sink-quantized", **q4)}
    for row in table.get("rows", []):
        spec = CacheSpec.from_dict(row["spec"])
        for name, want in wanted.items():
            if spec == want and name not in out:
                out[name] = {"ppl": float(row["ppl"]), "ppl_ratio": float(row["ppl_ratio"]),
                             "ppl_source": f"resources/fidelity.json ({table['tokens']:,} tokens)",
                             "ppl_tokens": int(table["tokens"])}
    if "dynamic" in out:  # exact strategies: the same logits as the full cache
        for name in ("static", "offloaded"):
            out[name] = dict(out["dynamic"])
    return out


def _measure_ppl(lm: LoadedModel, spec: CacheSpec, tokens: int) -> float:
    from engine.perplexity import perplexity

    if spec.strategy == "static":
        spec = replace(spec, max_cache_len=max(spec.max_cache_len, tokens + 64))
    return perplexity(lm, workload.long_text(), spec, max_tokens=tokens).ppl


def _median(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None or row.get(key) is None:
        return None
    return float(row[key]["median"])


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: per strategy and per peer, and the ratios the README quotes."""
    res = record["results"]
    histories = sorted({r["history"] for r in res["ttft"]})
    longest = histories[-1] if histories else None

    def ttft(system: str, strategy: str, mode: str, history: int | None) -> float | None:
        row = next((r for r in res["ttft"] if r["system"] == system and r["strategy"] == strategy and
                    r["mode"] == mode and r["history"] == history), None)
        return _median(row, "ms")

    def decode(system: str, strategy: str, history: int | None, phase: str) -> float | None:
        row = next((r for r in res["decode"] if r["system"] == system and r["strategy"] == strategy and
                    r["history"] == history and r["phase"] == phase), None)
        return _median(row, "tok_s")

    decode_histories = sorted({r["history"] for r in res["decode"]})
    short = decode_histories[0] if decode_histories else None
    long = decode_histories[-1] if decode_histories else None
    limit = record.get("bandwidth", {}).get("decode_limit_tok_s")
    strategies: dict[str, dict[str, Any]] = {}
    for name in record["settings"]["strategies"]:
        kept = ttft("cachet", name, "kept", longest)
        again = ttft("cachet", name, "recompute", longest)
        mem = [r for r in res["memory"] if r["strategy"] == name]
        mem.sort(key=lambda r: r["tokens"])
        fid = next((r for r in res["fidelity"] if r["strategy"] == name), None)
        strategies[name] = {
            "ttft_kept_ms": kept, "ttft_recompute_ms": again,
            "recompute_over_kept": again / kept if kept and again else None,
            "decode_short_start": decode("cachet", name, short, "start"),
            "decode_short_late": decode("cachet", name, short, "late"),
            "decode_long_start": decode("cachet", name, long, "start"),
            # of what the memory bandwidth allows for one step reading the weights (issue 11's GPU figure)
            "decode_share_of_limit": _ratio(decode("cachet", name, short, "start"), limit),
            "kv_bytes_longest": mem[-1]["measured_bytes"] if mem else None,
            "kv_tokens_longest": mem[-1]["tokens"] if mem else None,
            "ppl_ratio": fid["ppl_ratio"] if fid else None, "agreement": fid["agreement"] if fid else None,
        }
    peers: dict[str, dict[str, Any]] = {}
    for peer in ("llama.cpp", "transformers"):
        mode = "kept" if peer == "llama.cpp" else "recompute"
        chat = [r for r in res["chat"] if r["system"] == peer and r["decode_tok_s"]]
        peers[peer] = {
            "ttft_ms": ttft(peer, peer, mode, longest),
            "decode_short_start": decode(peer, peer, short, "start"),
            "decode_long_start": decode(peer, peer, long, "start"),
            "chat_decode_tok_s": _mean([r["decode_tok_s"]["median"] for r in chat]),
            "chat_ttft_ms": _mean([r["ttft_ms"]["median"] for r in res["chat"] if r["system"] == peer]),
        }
    cachet_chat = [r for r in res["chat"] if r["system"] == "cachet" and r.get("speculative") != "off"]
    plain_chat = [r for r in res["chat"] if r["system"] == "cachet" and r.get("speculative") == "off"]
    if not cachet_chat:  # a run with --speculative off
        cachet_chat, plain_chat = plain_chat, []
    dyn = strategies.get("dynamic", {})
    ratios: dict[str, float | None] = {}
    for peer, p in peers.items():
        key = peer.replace(".", "").replace("-", "")
        ratios[f"decode_vs_{key}"] = _ratio(dyn.get("decode_short_start"), p["decode_short_start"])
        ratios[f"chat_decode_vs_{key}"] = _ratio(
            _mean([r["decode_tok_s"]["median"] for r in cachet_chat if r["decode_tok_s"]]), p["chat_decode_tok_s"])
        ratios[f"ttft_longest_vs_{key}"] = _ratio(dyn.get("ttft_kept_ms"), p["ttft_ms"])
    return {
        "longest_history": longest, "decode_histories": decode_histories, "strategies": strategies, "peers": peers,
        "chat": {"cachet_decode_tok_s": _mean([r["decode_tok_s"]["median"] for r in cachet_chat if r["decode_tok_s"]]),
                 "cachet_ttft_ms": _mean([r["ttft_ms"]["median"] for r in cachet_chat]),
                 "cachet_plain_decode_tok_s": _mean([r["decode_tok_s"]["median"] for r in plain_chat
                                                     if r["decode_tok_s"]]),
                 "tokens_per_step": _mean([r["tokens_per_step"] for r in cachet_chat if r.get("tokens_per_step")])},
        "ratios": ratios,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _agreement(lm: LoadedModel, spec: CacheSpec, prompts: Sequence[str], ref_ids: Sequence[list[int]],
               stop: Sequence[int]) -> tuple[int, int]:
    """How many of the reference replies' tokens `lm` with `spec` predicts greedily (teacher-forced)."""
    session = ChatSession(lm, SessionSettings(cache=spec))
    agree = total = 0
    for prompt, ids in zip(prompts, ref_ids, strict=True):
        if not ids:
            continue
        session.messages = [Message("user", prompt)]
        _, first = session.next_token_logits()
        rest = session.forward_logits(ids[:-1], all_positions=True) if len(ids) > 1 else first[None, :0]
        logits = torch.cat([first[None, :], rest], dim=0).float()
        if stop:
            logits[:, list(stop)] = float("-inf")  # the reference was generated with end-of-turn held back
        predicted = logits.argmax(dim=-1).cpu()
        agree += int((predicted == torch.tensor(ids)).sum())
        total += len(ids)
    session.reset_cache()
    return agree, total


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def table(record: dict[str, Any]) -> str:
    """The printed summary."""
    s = record["summary"]
    longest = s["longest_history"]
    short, long = (s["decode_histories"] + [None, None])[:2] if s["decode_histories"] else (None, None)
    if len(s["decode_histories"]) >= 2:
        short, long = s["decode_histories"][0], s["decode_histories"][-1]
    m = record["model"]
    lines = [f"{m['name']} ({m.get('precision', m['dtype'])}, {m['device']}, {record['settings']['threads']} threads), "
             f"{record['settings']['repeat']} run(s) per figure; medians",
             f"{'strategy':<16}{'TTFT kept':>11}{'recompute':>11}{'×':>6}{'decode':>9}{'@256th':>8}{'decode':>9}"
             f"{'KV MiB':>9}{'ppl ×':>7}{'agree':>7}",
             f"{'':<16}{f'@{longest}':>11}{f'@{longest}':>11}{'':>6}{f'@{short}':>9}{'':>8}{f'@{long}':>9}"
             f"{f'@{longest}':>9}{'':>7}{'':>7}"]
    for name, r in s["strategies"].items():
        lines.append(
            f"{name:<16}{_num(r['ttft_kept_ms'], ' ms'):>11}{_num(r['ttft_recompute_ms'], ' ms'):>11}"
            f"{_num(r['recompute_over_kept'], '', 1):>6}{_num(r['decode_short_start'], '', 1):>9}"
            f"{_num(r['decode_short_late'], '', 1):>8}{_num(r['decode_long_start'], '', 1):>9}"
            f"{_num(r['kv_bytes_longest'] / 2**20 if r['kv_bytes_longest'] else None, '', 1):>9}"
            f"{_num(r['ppl_ratio'], '', 3):>7}"
            f"{_num(r['agreement'] * 100 if r['agreement'] is not None else None, '%', 1):>7}")
    for peer, p in s["peers"].items():
        if any(v is not None for v in p.values()):
            lines.append(f"{peer:<16}{_num(p['ttft_ms'], ' ms'):>11}{'':>11}{'':>6}"
                         f"{_num(p['decode_short_start'], '', 1):>9}{'':>8}{_num(p['decode_long_start'], '', 1):>9}")
    chat = s["chat"]
    if chat["cachet_decode_tok_s"] is not None:
        plain = chat.get("cachet_plain_decode_tok_s")
        lines.append(f"scripted chat: Cachet {_num(chat['cachet_decode_tok_s'], ' tok/s', 1)}"
                     + (f" ({_num(chat.get('tokens_per_step'), ' tokens/step', 2)}; "
                        f"{_num(plain, ' tok/s', 1)} without speculation)" if plain is not None else "") + ", "
                     + ", ".join(f"{peer} {_num(p['chat_decode_tok_s'], ' tok/s', 1)}" for peer, p in s["peers"].items()
                                 if p["chat_decode_tok_s"] is not None))
    shares = {n: r["decode_share_of_limit"] for n, r in s["strategies"].items() if r.get("decode_share_of_limit")}
    if shares:
        limit = record.get("bandwidth", {}).get("decode_limit_tok_s")
        lines.append(f"decode @{short} as a share of the bandwidth limit ({_num(limit, ' tok/s', 1)}; graphs "
                     f"{record['settings'].get('graphs', 'auto')}): "
                     + ", ".join(f"{n} {v * 100:.1f}%" for n, v in shares.items()))
    ratios = {k: v for k, v in s["ratios"].items() if v is not None}
    if ratios:
        lines.append("ratios (Cachet dynamic / peer): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    for what, why in record["unavailable"].items():
        lines.append(f"not measured: {what}: {why}")
    return "\n".join(lines)


def _num(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{unit}"


def load_model(options: BenchOptions) -> LoadedModel:
    if shapes.is_shape(options.model):
        device = models.pick_device(options.device)
        dtype = models.pick_dtype(device, options.dtype if options.dtype != "auto" else None)
        if options.dtype == "auto" and device.type == "cuda":
            dtype = torch.bfloat16
        return shapes.load_shape(options.model, device, dtype)
    return models.load(options.model, device=options.device, dtype=options.dtype, weights=options.weights,
                       gpu_layers=options.gpu_layers, progress=lambda msg: options.log(msg))


def run(options: BenchOptions, lm: LoadedModel | None = None) -> tuple[dict[str, Any], Path]:
    """Run the benchmark; returns the record and the folder it was written to."""
    started = time.perf_counter()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    lm = lm or load_model(options)
    plan = Plan.quick() if options.quick else Plan.full(lm.device.type == "cuda")
    bench = Bench(lm, options, plan)
    out = options.out or default_out_dir(lm.device, options.quick, Path(options.model).stem if options.model not in
                                         ("default",) else "smollm2-135m")
    out.mkdir(parents=True, exist_ok=True)
    sections = options.only
    if "ttft" in sections or "memory" in sections:
        bench.run_ttft(with_memory="memory" in sections)
    if "decode" in sections:
        bench.run_decode()
    if "fidelity" in sections:
        bench.run_fidelity()
    if "chat" in sections:
        bench.run_chat()
    bench.finish()
    record = bench.record(started)
    problems = validate(record)
    if problems:
        raise RuntimeError("the benchmark record is malformed: " + "; ".join(problems))
    (out / "bench.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    summary = table(record)
    (out / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    if options.plots:
        plots.plot_all(record, out)
    return record, out
