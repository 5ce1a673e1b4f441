"""The systems the benchmark compares, behind one small interface.

* `CachetSystem`: Cachet's engine (`ChatSession`) with one cache strategy, keeping its cache
  between turns — or, with `reuse=False`, recomputing the conversation every turn.
* `TransformersSystem`: what a chat loop around `model.generate()` does — the whole conversation
  is rendered and prefilled on every turn (same model object, same dtype, transformers' own
  `DynamicCache` inside `generate`).
* `LlamaCppSystem`: llama.cpp through `llama-cpp-python` on the same GGUF file, streaming
  `create_chat_completion` with its own prompt cache (a `Llama` object re-evaluates only what
  follows the longest prefix it already holds). An optional extra: `pip install "cachet[peer]"`.

Every system answers `reply(messages, max_new, min_new)` with the time to the first token and a
timestamp per generated token, so decode speed can be read over any window of the reply.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine.caches import CacheSpec
from engine.graphs import graphs_wanted
from engine.models import LoadedModel
from engine.sampling import SamplingSettings
from engine.session import ChatSession, Message, SessionSettings

LLAMA_CPP_HINT = ('llama.cpp is not installed: `pip install "cachet[peer]"` (llama-cpp-python builds from source, '
                  "about 10 minutes on 2 cores) adds its columns.")


@dataclass
class Reply:
    """One generated reply's timings."""

    ttft_ms: float
    token_times: list[float] = field(default_factory=list)  # perf_counter() at each generated token
    prompt_tokens: int = 0
    reused_tokens: int | None = None  # None when the system does not say
    text: str = ""
    tokens_per_step: float | None = None  # Cachet with speculative decoding: tokens per decoding pass

    @property
    def generated(self) -> int:
        return len(self.token_times)

    def rate(self, start: int, window: int) -> float | None:
        """Tokens per second from generated token `start` to `start + window` (0-based), or None if too short."""
        end = start + window
        if start < 0 or end >= len(self.token_times):
            return None
        took = self.token_times[end] - self.token_times[start]
        return window / took if took > 0 else None

    def decode_rate(self) -> float | None:
        """Tokens per second after the first token, over the whole reply."""
        return self.rate(0, len(self.token_times) - 1) if len(self.token_times) > 1 else None


class System(Protocol):
    name: str  # "cachet", "transformers", "llama.cpp"
    label: str

    def prepare(self, messages: Sequence[dict[str, str]]) -> None:
        """Bring this system's cache up to `messages` (untimed); a system without a cache does nothing."""

    def reply(self, messages: Sequence[dict[str, str]], max_new: int, min_new: int = 0) -> Reply:
        """Answer the last (user) message of `messages`, greedily."""

    def close(self) -> None: ...


def _greedy(max_new: int, min_new: int) -> SamplingSettings:
    return SamplingSettings(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=max_new,
                            min_new_tokens=min(min_new, max_new)).validate()


class CachetSystem:
    """Cachet's engine with one cache strategy; the session (and its cache) lives across replies."""

    name = "cachet"

    def __init__(self, lm: LoadedModel, spec: CacheSpec, *, reuse: bool = True, label: str | None = None,
                 speculative: str = "auto", graphs: str = "auto") -> None:
        self.lm = lm
        self.spec = spec
        self.reuse = reuse
        self.label = label or f"Cachet {spec.strategy}" + ("" if reuse else " (recompute)")
        self.session = ChatSession(lm, SessionSettings(cache=spec, sampling=_greedy(1, 0), reuse=reuse,
                                                       speculative=speculative, graphs=graphs))

    def _set(self, messages: Sequence[dict[str, str]]) -> None:
        """Make `messages` the conversation, keeping the session's own messages where they agree (their
        generated token ids are what the app keeps too, so the cache stays a prefix of the next prompt)."""
        kept: list[Message] = []
        for own, new in zip(self.session.messages, messages, strict=False):
            if own.role != new["role"] or own.content != new["content"]:
                break
            kept.append(own)
        self.session.messages = kept + [Message(m["role"], m["content"]) for m in messages[len(kept):]]

    def prepare(self, messages: Sequence[dict[str, str]]) -> None:
        if self.reuse:
            self._set(messages)
            self.session.warm()

    def reply(self, messages: Sequence[dict[str, str]], max_new: int, min_new: int = 0) -> Reply:
        self._set(messages)
        self.session.set_sampling(_greedy(max_new, min_new))
        times: list[float] = []
        result = self.session.generate(on_token=lambda _t: times.append(time.perf_counter()))
        if result.stats.finish_reason == "error":
            raise RuntimeError(f"{self.label}: {result.stats.error}")
        return Reply(result.stats.ttft_ms, times, result.stats.prompt_tokens, result.stats.reused_tokens,
                     result.reply, result.stats.tokens_per_step)

    def graphs_note(self) -> str:
        """How the last reply's one-token steps ran: "off", "captured", "uncaptured" (CPU), or why eagerly."""
        session = self.session
        if session.graph_fallback:
            return session.graph_fallback
        if not graphs_wanted(session.settings.graphs, self.lm.device):
            return "off"
        return "captured" if self.lm.device.type == "cuda" else "uncaptured"

    def cache_tokens(self) -> int:
        """Conversation tokens the cache stands for now."""
        return len(self.session.cached_ids)

    def close(self) -> None:
        self.session.reset_cache()


class _TimingStreamer:
    """A `generate()` streamer that only notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class TransformersSystem:
    """A chat loop around `model.generate()`: the whole conversation is prefilled on every turn."""

    name = "transformers"

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.label = "transformers generate()"

    def prepare(self, messages: Sequence[dict[str, str]]) -> None:
        pass  # nothing is kept between turns

    def reply(self, messages: Sequence[dict[str, str]], max_new: int, min_new: int = 0) -> Reply:
        tok = self.lm.tokenizer
        text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.lm.device)
        streamer = _TimingStreamer()
        eos = sorted(self.lm.stop_token_ids)
        started = time.perf_counter()
        with torch.inference_mode():
            self.lm.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                min_new_tokens=min(min_new, max_new) or None, do_sample=False, temperature=None, top_p=None,
                top_k=None, streamer=streamer, eos_token_id=eos, pad_token_id=eos[0] if eos else None,
            )
        ttft = (streamer.times[0] - started) * 1000.0 if streamer.times else float("nan")
        return Reply(ttft, streamer.times, int(ids.shape[-1]), 0, tok.decode(streamer.tokens, skip_special_tokens=True))

    def close(self) -> None:
        pass


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python can be imported, else how to get it."""
    return None if importlib.util.find_spec("llama_cpp") is not None else LLAMA_CPP_HINT


class LlamaCppSystem:
    """llama.cpp (llama-cpp-python) on a GGUF file, with its own prompt cache, `threads` threads."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str, context: int, threads: int) -> None:
        from llama_cpp import Llama

        started = time.perf_counter()
        self.llm: Any = Llama(model_path=gguf_path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                              n_batch=512, verbose=False)
        self.load_seconds = time.perf_counter() - started
        self.label = "llama.cpp"
        import llama_cpp

        self.version = getattr(llama_cpp, "__version__", "?")
        self._eos = int(self.llm.token_eos())

    def prepare(self, messages: Sequence[dict[str, str]]) -> None:
        # Evaluates the conversation; the next request re-evaluates only what follows the shared prefix.
        self.llm.create_chat_completion(messages=list(messages), max_tokens=1, temperature=0.0)

    def reply(self, messages: Sequence[dict[str, str]], max_new: int, min_new: int = 0) -> Reply:
        kwargs: dict[str, Any] = {}
        if min_new > 0:
            # llama-cpp-python has no min_tokens: keep end-of-turn out of reach instead.
            kwargs["logit_bias"] = {self._eos: -1e9}
        started = time.perf_counter()
        times: list[float] = []
        pieces: list[str] = []
        stream = self.llm.create_chat_completion(messages=list(messages), max_tokens=max_new, temperature=0.0,
                                                 top_k=1, top_p=1.0, repeat_penalty=1.0, stream=True, **kwargs)
        for chunk in stream:
            delta = chunk["choices"][0].get("delta", {})
            if "content" in delta and delta["content"] is not None:
                times.append(time.perf_counter())
                pieces.append(delta["content"])
        ttft = (times[0] - started) * 1000.0 if times else float("nan")
        # n_tokens: what the context holds now, i.e. the prompt and the reply (but its last token)
        prompt = int(self.llm.n_tokens) - max(len(times) - 1, 0)
        return Reply(ttft, times, prompt, None, "".join(pieces))

    def close(self) -> None:
        pass  # the model stays loaded for the next section; see shutdown()

    def shutdown(self) -> None:
        if hasattr(self.llm, "close"):
            self.llm.close()
