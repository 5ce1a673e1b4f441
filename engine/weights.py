"""A model's weights by precision: what they take in bf16/fp16/fp32, int8 and int4, per decoder layer.

int8 and int4 follow optimum-quanto's weight quantization as transformers applies it
(`QuantoConfig(weights=...)` → `replace_with_quanto_layers`): every `nn.Linear` becomes a
`QLinear` except the output head (and anything tied to it); embeddings, norms and biases keep
the base dtype. For each converted Linear of `out × in` weights in a base dtype of `s` bytes,
quanto 0.2.7 stores (read from `optimum/quanto/nn/qmodule.py` and `tensor/weights/`):

- int8 (`WeightQBytesTensor`): `out × in` int8 values and one scale per output row
  (`AbsmaxOptimizer`, axis 0): `out·in + out·s` bytes.
- int4 (`WeightQBitsTensor`, `MaxOptimizer`): the input dimension is grouped — 128 values per
  group, or 96/64/32 when 128 does not divide `in`, or per row when `in ≤ 128` or none divides
  (`QModuleMixin.__init__`). Each group has a scale and a float shift in the base dtype; the
  4-bit values are packed two per byte along the first axis of the grouped tensor
  (`PackedTensor`, `ceil(rows / 2) × columns`). The layouts quanto switches to for groups of 128
  hold the same bytes — `N·K/2` of data, a scale and a shift per group: tinygemm (bf16, CPU and
  recent CUDA GPUs; checked against real tensors on the CPU in the tests) and AWQ (fp16 on CUDA,
  read from its packing code).
- both: the `QLinear` module's `input_scale` and `output_scale` buffers, one scalar each in `s`.

No torch here: discovery computes these figures from a GGUF header; `engine.memory` builds
the same inventory from a transformers config on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRECISIONS = ("bf16", "fp16", "fp32", "int8", "int4")
FLOAT_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTIZED_BITS = {"int8": 8, "int4": 4}
QUANTO_QLINEAR_BUFFERS = 2  # input_scale and output_scale, one scalar each in the base dtype


class PrecisionError(ValueError):
    """An unknown weight precision; the message lists the known ones."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise PrecisionError(f"Unknown weight precision {precision!r}; choose one of auto, {', '.join(PRECISIONS)}.")
    return precision


def quanto_group_size(in_features: int) -> int | None:
    """The int4 group size quanto picks for a Linear with `in_features` inputs (None: one group per row)."""
    group = 128
    if in_features <= group:
        return None
    while in_features % group != 0 and group > 32:
        group -= 32
    return group if in_features % group == 0 else None


def quantized_linear_bytes(out_features: int, in_features: int, bits: int, base_size: int) -> int:
    """Bytes of one quanto QLinear's weight (and its two scalar buffers) at `bits` bits."""
    buffers = QUANTO_QLINEAR_BUFFERS * base_size
    if bits == 8:
        return out_features * in_features + out_features * base_size + buffers
    if bits != 4:
        raise ValueError(f"quanto weights are 8 or 4 bits here, not {bits}")
    group = quanto_group_size(in_features)
    if group is None:
        rows, columns, scales = out_features, in_features, out_features
    else:
        rows, columns = out_features * in_features // group, group
        scales = rows
    return math.ceil(rows / 2) * columns + 2 * scales * base_size + buffers


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor of a model, as the advisor needs it.

    shape: torch order (a Linear weight is `(out_features, in_features)`).
    layer: the decoder layer it belongs to; None outside the layers (embeddings, head, final norm,
        a vision tower).
    linear: the weight of an `nn.Linear` that quanto converts (never the output head).
    embedding: the input token embedding, which a GPU/CPU split keeps in RAM unless tied to the head.
    """

    name: str
    shape: tuple[int, ...]
    layer: int | None = None
    linear: bool = False
    embedding: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, precision: str, base_size: int) -> int:
        """Bytes this tensor takes with the weights in `precision` (base dtype of `base_size` bytes)."""
        if precision in FLOAT_SIZES:
            return self.numel * FLOAT_SIZES[precision]
        if self.linear and len(self.shape) == 2:
            return quantized_linear_bytes(self.shape[0], self.shape[1], QUANTIZED_BITS[precision], base_size)
        return self.numel * base_size


@dataclass(frozen=True)
class WeightBytes:
    """A model's weights in one precision, split the way a GPU/CPU layer split needs them."""

    precision: str
    per_layer: tuple[int, ...]  # decoder layer i's bytes
    outside: int  # everything outside the decoder layers, the input embedding excepted
    embedding: int  # the input token embedding when it is not tied to the head (else counted in `outside`)

    @property
    def total(self) -> int:
        return sum(self.per_layer) + self.outside + self.embedding

    def split(self, gpu_layers: int) -> tuple[int, int]:
        """(GPU bytes, RAM bytes) with the last `gpu_layers` decoder layers on the GPU.

        As llama.cpp's `n_gpu_layers`: the layers next to the output head go to the GPU first; the
        head, final norm and everything else outside the layers stay on the GPU, and the input
        embedding (a lookup, no matrix product) stays in RAM while any layer does. With every
        layer on the GPU, everything is there.
        """
        layers = len(self.per_layer)
        gpu_layers = max(0, min(gpu_layers, layers))
        on_gpu = sum(self.per_layer[layers - gpu_layers:]) + self.outside
        if gpu_layers == layers:
            return on_gpu + self.embedding, 0
        return on_gpu, self.total - on_gpu


@dataclass(frozen=True)
class WeightInventory:
    """Every weight tensor of a model (tied tensors once), with its decoder layer and role."""

    tensors: tuple[TensorInfo, ...]
    layers: int

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def bytes(self, precision: str, base_size: int | None = None) -> WeightBytes:
        """The weights in `precision`; int8/int4 keep unconverted tensors and scales in a base dtype of
        `base_size` bytes (default 2: bf16, what the loader picks on a GPU)."""
        check_precision(precision)
        size = FLOAT_SIZES.get(precision, base_size or 2)
        per_layer = [0] * self.layers
        outside = embedding = 0
        for t in self.tensors:
            n = t.nbytes(precision, size)
            if t.layer is not None and 0 <= t.layer < self.layers:
                per_layer[t.layer] += n
            elif t.embedding:
                embedding += n
            else:
                outside += n
        return WeightBytes(precision, tuple(per_layer), outside, embedding)


# --- GGUF tensor names (llama.cpp's naming) -------------------------------------------------------

GGUF_EMBEDDING = "token_embd.weight"
GGUF_HEAD = "output.weight"


def inventory_from_gguf(tensors: list[tuple[str, tuple[int, ...]]], layers: int) -> WeightInventory:
    """The inventory of a GGUF model from its tensor names and GGUF shapes (`ne0` first).

    llama.cpp names decoder-layer tensors `blk.N.*`; their 2-D `.weight` tensors are the Linear
    weights transformers rebuilds (3-D expert stacks are not `nn.Linear` there and stay in the base
    dtype). `token_embd.weight` is the input embedding; without an `output.weight` the head is tied
    to it, and stays with it on the GPU.
    """
    names = {name for name, _ in tensors}
    tied = GGUF_HEAD not in names
    infos = []
    for name, gguf_shape in tensors:
        shape = tuple(reversed(gguf_shape))  # GGUF lists the fastest-varying dimension first
        layer = None
        if name.startswith("blk."):
            part = name.split(".", 2)[1]
            layer = int(part) if part.isdigit() else None
        linear = layer is not None and len(shape) == 2 and name.endswith(".weight")
        infos.append(TensorInfo(name, shape, layer, linear, embedding=(name == GGUF_EMBEDDING and not tied)))
    return WeightInventory(tuple(infos), layers)
