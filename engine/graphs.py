"""One-token decode steps replayed as captured CUDA graphs over KV buffers that grow in buckets.

On a GPU a decoding step of a small batch is bound by launching kernels from Python, not by the
GPU: transformers' eager loop reached ~6% (1B) to ~15% (8B) of the memory-bandwidth limit on an
H100 (issue 11). A captured graph replays every kernel of the step with one launch.

How it works (`DecodeRunner`, one per conversation):

* The chat's own cache holds its keys and values in static-shaped buffers of a *bucket* of tokens
  (1k, 2k, 4k, … up to the model's context; `bucket_for`): the full cache's and the sink window's
  layers grow in place (`GrowingLayer`), and here they grow by buckets, moving to the next bucket
  once when full. A static cache is one bucket of its own length. Nothing pre-allocates the whole
  context.
* The step reads the write position from a device tensor (`index_copy_` into the buffers, a causal
  mask over the whole bucket from the same tensor as the query's offset, the rotary position), so a
  replayed graph is right at every step; the host only fills the token and the position in.
* It is captured once per bucket of a chat's buffers (a warm-up on a side stream, then
  `torch.cuda.CUDAGraph` capture) and replayed until the buffers change: a move to the next bucket,
  the pool moving the cache off the device (its buffers are freed: the graph holds only weak
  references to them), a new cache. The first capture of a bucket for a model is reported as
  progress. Cropping (an edit, rejected speculative guesses) and snapshots keep the buffers.
* Prefill, passes that check speculative guesses, and a sink's evicting steps stay eager.

Why `torch.cuda.CUDAGraph` rather than `torch.compile(mode="reduce-overhead")`: the graph is
captured directly over each chat's buffers in well under a second, where inductor compiles each new
bucket shape for tens of seconds (68 s for the default model's first step on the 2-core CPU); the
buffers belong to the chat, not to a compiled function's guards; and the very same step function
runs eagerly on a CPU (the capture step skipped), which is how the tests check it without a GPU.
Launch overhead, which capture removes, is the waste at batch 1; kernel fusion would come on top.

Strategies: dynamic (full layers), sink (its non-evicting steps) and static. The others decode
eagerly and say why (`unsupported_reason`): quantized caches de-quantize their history with the
quantization library at every step, offloading moves each layer to the CPU between uses, sliding
window and state-space layers change shape or hold states outside the buffers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engine.caches.base import KVCache, cache_kwargs
from engine.caches.dynamic import FullLayer, GrowingLayer
from engine.caches.quantized import QuantizedKVLayer
from engine.caches.sink import QuantizedSinkLayer, SinkLayer
from engine.caches.state import StateLayer
from engine.caches.static import CroppableStaticLayer

GRAPH_MODES = ("auto", "on", "off")
FIRST_BUCKET = 1024  # the smallest bucket, in tokens; each next one is twice as large
GRAPH_ATTENTION = ("sdpa", "cachet_sdpa", "eager")  # attention implementations whose decode step is capturable

ProgressFn = Callable[[str], None]


class GraphSettingError(ValueError):
    pass


class CaptureError(RuntimeError):
    """Capturing the decode step failed (an operation in the model's step that a graph cannot hold); the
    cache is as it was, and the step can run eagerly."""


def validate_graphs(mode: str) -> str:
    if mode not in GRAPH_MODES:
        raise GraphSettingError(f"Graph-captured decoding {mode!r}: choose auto, on or off.")
    return mode


def graphs_wanted(mode: str, device: torch.device) -> bool:
    """auto: on for CUDA, off elsewhere; on: everywhere (without CUDA the step runs eagerly, uncaptured)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def bucket_for(tokens: int, limit: int, first: int | None = None) -> int:
    """The smallest bucket (first, 2·first, 4·first, …) holding `tokens`, at most `limit` (the model's
    context) unless `tokens` itself is more."""
    size = first if first is not None else FIRST_BUCKET
    while size < tokens and size < limit:
        size *= 2
    return max(min(size, limit), tokens)


def bucket_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else f"{tokens:,}"


QUANTIZED_REASON = ("the quantized cache de-quantizes its history with the quantization library at every step, "
                    "which a captured graph cannot replay")


def unsupported_reason(cache: KVCache, model: Any) -> str | None:
    """Why this cache's one-token steps cannot run as a captured graph (None: they can)."""
    if getattr(cache, "offloading", False):
        return "the offloaded strategy moves each layer's keys and values to the CPU between uses"
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in GRAPH_ATTENTION:
        return f"the model's attention ({attention}) is not one whose decode step can be captured"
    for layer in cache.layers:
        if isinstance(layer, QuantizedSinkLayer | QuantizedKVLayer):
            return QUANTIZED_REASON
        if isinstance(layer, FullLayer | SinkLayer | CroppableStaticLayer):
            continue
        if isinstance(layer, StateLayer):
            return "this model's state-space layers keep states outside the KV buffers"
        if getattr(layer, "sliding", False):
            return "this model's sliding-window layers change shape until their window is full"
        return f"its {type(layer).__name__} layers are not static-shaped buffers"
    return None


def _held(cache: KVCache) -> int:
    """Tokens the cache holds (read once: a static cache's count lives on the device)."""
    layer = cache.kv_layers[0]
    return layer.get_length() if isinstance(layer, CroppableStaticLayer) else int(layer.get_seq_length())


class _BucketLayer(CacheLayerMixin):
    """One layer as the captured step sees it: the chat's buffers, written at a position held on the device."""

    is_compileable = True  # masks are materialised for one query (not skipped for `is_causal`)
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.position = keys, values, position
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("the buffers exist before the step")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        self.keys.index_copy_(2, self.position, key_states)
        self.values.index_copy_(2, self.position, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        assert self.keys is not None
        return self.keys.shape[-2], 0  # attention over the whole bucket; the mask hides what is past the position

    def get_seq_length(self) -> Any:
        return self.position[0]  # a 0-d tensor: the query's offset, read on the device

    def get_max_length(self) -> int:
        assert self.keys is not None
        return self.keys.shape[-2]


# The buckets already captured for each model, so that the first capture of each is reported as progress.
_captured: weakref.WeakKeyDictionary[torch.nn.Module, set[int]] = weakref.WeakKeyDictionary()


class DecodeRunner:
    """A conversation's one-token decode step over bucketed static KV buffers, captured once per bucket.

    Args:
        model: the loaded model (its forward pass is what is captured).
        context_length: the largest bucket.
        capture: capture and replay a CUDA graph (False: run the same static-shaped step eagerly, which
            is what a CPU does and what the tests compare with the plain path).
        on_progress: told "Capturing the decode step for 2k tokens…" the first time a model captures a bucket.
    """

    def __init__(self, model: Any, context_length: int, capture: bool, on_progress: ProgressFn | None = None,
                 first_bucket: int | None = None) -> None:
        self.model = model
        self.context_length = context_length
        self.capture = capture
        self.on_progress = on_progress
        self.first_bucket = first_bucket if first_bucket is not None else FIRST_BUCKET
        self.steps = 0  # steps run by the runner (replayed, or the static step run eagerly)
        self.captures = 0
        self.buckets: list[int] = []  # the bucket of every capture (or first eager step) in order
        self._device: torch.device | None = None
        self._ids: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: torch.Tensor | None = None
        self._bound: list[weakref.ref[torch.Tensor]] = []  # the buffers the graph (or step) was set up on
        self._bucket = 0

    # ----- what a step needs ------------------------------------------------------------------------
    def grow_policy(self, needed: int, current: int) -> int:
        return bucket_for(needed, self.context_length, self.first_bucket)

    def adopt(self, cache: KVCache) -> None:
        """Make the cache's growing layers grow in buckets from now on (prefill included)."""
        for layer in cache.layers:
            if isinstance(layer, GrowingLayer):
                layer.capacity_for = self.grow_policy

    def eager_reason(self, cache: KVCache) -> str | None:
        """Why the next one-token step cannot be run by the runner; None when it can."""
        layers = cache.kv_layers
        if len(layers) != len(cache.layers) or not layers or not all(layer.is_initialized for layer in layers):
            return "the cache is empty"
        # (static layers move together, and reading their count waits for the device)
        if (not isinstance(layers[0], CroppableStaticLayer)
                and len({int(layer.get_seq_length()) for layer in layers}) != 1):
            return "the cache's layers hold different lengths"
        if not cache.rewindable(1):  # a sink about to evict, a full static cache
            return "this step evicts or overflows"
        return None

    def release(self) -> None:
        """Drop the captured graph and its memory (the cache is gone or moved)."""
        self._graph = None
        self._out = None
        self._bound = []
        self._bucket = 0

    # ----- the step --------------------------------------------------------------------------------
    def _buffers(self, cache: KVCache, held: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Every layer's (keys, values) buffers of one bucket that holds `held + 1` tokens."""
        static = [layer for layer in cache.layers if isinstance(layer, CroppableStaticLayer)]
        if static:
            bucket = static[0].max_cache_len
        else:
            # The next bucket when full; never a smaller one while the buffers are there (after an edit, a sink's
            # eviction): going down and up again would copy and capture each time.
            bucket = bucket_for(held + 1, self.context_length, self.first_bucket)
            for layer in cache.layers:
                if not isinstance(layer, GrowingLayer):
                    continue
                buf = layer._kbuf
                if buf is not None and layer.keys is not None and layer._fits(buf, layer.keys, held + 1):
                    bucket = max(bucket, buf.shape[-2])
        buffers = []
        for layer in cache.layers:
            if isinstance(layer, GrowingLayer):
                layer.capacity_for = self.grow_policy
                buffers.append(layer.reserve(bucket))
            else:
                assert isinstance(layer, CroppableStaticLayer) and layer.keys is not None and layer.values is not None
                buffers.append((layer.keys, layer.values))
        return buffers, bucket

    def _forward(self, view: Cache) -> torch.Tensor:
        assert self._ids is not None and self._pos is not None
        out = self.model(input_ids=self._ids, **cache_kwargs(self.model, view), position_ids=self._pos,
                         use_cache=True, logits_to_keep=1)
        return out.logits

    def _bind(self, buffers: list[tuple[torch.Tensor, torch.Tensor]], bucket: int, device: torch.device) -> Cache:
        """Static inputs and the view of the buffers; captures the graph when capturing."""
        self.release()
        if self._device != device or self._ids is None or self._pos is None:
            self._ids = torch.zeros((1, 1), dtype=torch.long, device=device)
            self._pos = torch.zeros((1, 1), dtype=torch.long, device=device)
            self._device = device
        position = self._pos[0]  # [1]: the slot written, and (as a 0-d view) the query's offset
        view = Cache(layers=[_BucketLayer(k, v, position) for k, v in buffers])
        self._bound = [weakref.ref(t) for kv in buffers for t in kv]
        self._bucket = bucket
        self.buckets.append(bucket)
        return view

    def _is_bound(self, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        flat = [t for kv in buffers for t in kv]
        return len(flat) == len(self._bound) and all(ref() is t for ref, t in zip(self._bound, flat, strict=True))

    def _capture(self, view: Cache, bucket: int) -> None:
        seen = _captured.setdefault(self.model, set())
        if bucket not in seen and self.on_progress is not None:
            self.on_progress(f"Capturing the decode step for {bucket_label(bucket)} tokens…")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuBLAS handles, workspaces, lazy inits outside the capture
                self._forward(view)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(view)
        self._graph, self._out = graph, out
        self.captures += 1
        seen.add(bucket)

    @torch.inference_mode()
    def step(self, cache: KVCache, token: int) -> torch.Tensor:
        """Feed `token` after the cache's content; return the next token's logits. Only when
        `eager_reason(cache)` is None. The warm-up and capture write this same token at this same slot, so
        they leave nothing behind; a failure leaves the cache's count unchanged."""
        held = _held(cache)
        buffers, bucket = self._buffers(cache, held)
        device = buffers[0][0].device
        view: Cache | None = None
        if not self._is_bound(buffers) or self._bucket != bucket or self._device != device:
            view = self._bind(buffers, bucket, device)
        assert self._ids is not None and self._pos is not None
        self._ids.fill_(token)
        self._pos.fill_(held)
        if self.capture:
            if self._graph is None:
                assert view is not None
                try:
                    self._capture(view, bucket)
                except Exception as exc:
                    self.release()
                    raise CaptureError(f"{type(exc).__name__}: {exc}") from exc
            assert self._graph is not None and self._out is not None
            self._graph.replay()
            logits = self._out[0, -1].clone()
        else:
            if view is None:
                view = Cache(layers=[_BucketLayer(k, v, self._pos[0]) for k, v in buffers])
            logits = self._forward(view)[0, -1]
        for layer in cache.layers:
            if isinstance(layer, GrowingLayer):
                layer.advance(1)
            else:
                assert isinstance(layer, CroppableStaticLayer)
                layer.cumulative_length.add_(1)
        self.steps += 1
        return logits
