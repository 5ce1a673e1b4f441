"""int8 / int4 weights with optimum-quanto, quantized once and kept on disk.

The model is quantized as transformers' quanto integration would (`QuantoConfig(weights=...)`):
every `nn.Linear` becomes a quanto `QLinear` except those `get_keys_to_not_convert` names (the
output head and anything tied to it); embeddings, norms, biases and quanto's scales stay in the base
dtype. That is exactly what `engine.weights` counts, so the advisor's bytes are the loaded tensors'.

transformers cannot save such a model (`QuantoHfQuantizer.is_serializable()` is False), so the first
load writes the quantized state itself, next to the converted GGUF copies in the cache folder:
`model.safetensors` (quanto's flattened `weight._data` / `weight._scale` / ... tensors, everything
else as it is, tied tensors once, and the non-persistent buffers such as RoPE's `inv_freq`, which a
model built on the meta device would otherwise hold as garbage), `quanto-qmap.json` (which module got
which qtype), the config and the generation config. Every file's size and SHA-256 go into
`cachet-quantized.json`, checked as the converted copy's are (`engine.models.verify_recorded`); a
damaged copy is quantized again. Later loads build the model on the meta device and
`optimum.quanto.requantize` it from that file: no float weights are read, nothing is quantized again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from engine import paths
from engine.weights import QUANTIZED_BITS

QUANTIZED_FORMAT = 1  # bump when the layout of quantized copies changes
RECORD = "cachet-quantized.json"
WEIGHTS_FILE = "model.safetensors"
QMAP_FILE = "quanto-qmap.json"
BUFFER_PREFIX = "cachet.buffer."  # non-persistent buffers, stored under this prefix


def quantized_dir(source_key: str, precision: str, base: str) -> Path:
    """The cache folder of `source_key`'s weights in `precision` over a `base` dtype (next to converted GGUFs)."""
    return paths.cache_dir() / "models" / f"{source_key[:32]}-{precision}-{base}-q{QUANTIZED_FORMAT}"


def _qtype(precision: str) -> Any:
    from optimum.quanto import qint4, qint8

    return {8: qint8, 4: qint4}[QUANTIZED_BITS[precision]]


@torch.no_grad()
def quantize(model: Any, precision: str) -> Any:
    """Replace `model`'s Linears (all but the head and what is tied to it) by frozen quanto int8/int4
    `QLinear`s, in place, as transformers' `QuantoConfig(weights=precision)` would."""
    from optimum.quanto import freeze
    from optimum.quanto import quantize as quanto_quantize
    from transformers.quantizers.base import get_keys_to_not_convert

    quanto_quantize(model, weights=_qtype(precision), exclude=get_keys_to_not_convert(model))
    freeze(model)
    return allow_inference_mode(model)


def allow_inference_mode(model: Any) -> Any:
    """Let quanto's 4-bit linears run inside `torch.inference_mode()` (the engine's forward passes do).

    quanto 0.2.7's int4 weight transposes itself in a custom autograd function, and under inference mode
    torch refuses that view ("Cannot set version_counter for inference tensor"). Those layers run in plain
    `no_grad` instead; their inputs may be inference tensors, their outputs are ordinary ones. int8 is not
    affected.
    """
    from optimum.quanto import QModuleMixin

    for module in model.modules():
        qtype = getattr(module, "weight_qtype", None)
        if isinstance(module, QModuleMixin) and qtype is not None and qtype.bits == 4 \
                and not getattr(module, "_cachet_outside_inference_mode", False):
            module.forward = functools.partial(_outside_inference_mode, module.forward)
            module._cachet_outside_inference_mode = True
    return model


@contextlib.contextmanager
def _plain_int4_kept(dtype: torch.dtype, *, always: bool = False) -> Iterator[None]:
    """Skip quanto's re-layout of int4 weights read back when it would give the layout they already have.

    quanto 0.2.7 `WeightQBitsTensor.optimize` unpacks every int4 weight read from a state dict and packs it again
    for the kernel of its device — tinygemm for a bf16 base, AWQ for fp16 on CUDA, else the same plain packing it
    was saved in. Over an fp32 base that round trip changes nothing and took most of the load in a profile, so it
    is skipped there.
    """
    if dtype != torch.float32 and not always:
        yield
        return
    from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor

    original = WeightQBitsTensor.optimize
    WeightQBitsTensor.optimize = lambda self: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightQBitsTensor.optimize = original  # type: ignore[method-assign]


def to_plain(model: Any) -> Any:
    """int4 weights back in quanto's device-independent packing (a tinygemm layout made for the CPU is not the one a
    CUDA GPU's kernel reads), before a layer split moves them; `relayout` after."""
    from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor

    for module in _qbits_modules(model):
        if type(module.weight) is not WeightQBitsTensor:  # a kernel's subclass (tinygemm, AWQ, Marlin)
            module.weight = torch.nn.Parameter(module.weight.weight_qbits_tensor(), requires_grad=False)
    return model


def relayout(model: Any) -> Any:
    """int4 weights in the layout of the kernel on the device each now lives on (quanto's `optimize`)."""
    for module in _qbits_modules(model):
        module.weight = torch.nn.Parameter(module.weight.optimize(), requires_grad=False)
    return model


def _qbits_modules(model: Any) -> list[Any]:
    from optimum.quanto import QModuleMixin
    from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor

    return [m for m in model.modules() if isinstance(m, QModuleMixin) and isinstance(m.weight, WeightQBitsTensor)]


def _outside_inference_mode(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_inference_mode_enabled():
        return forward(*args, **kwargs)
    with torch.inference_mode(False), torch.no_grad():
        return forward(*args, **kwargs)


def is_quantized(model: Any) -> bool:
    from optimum.quanto import QModuleMixin

    return any(isinstance(m, QModuleMixin) for m in model.modules())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds, through quanto's wrapper subclasses down to their storage."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model: Any, *, off_cpu: bool = False) -> int:
    """Every parameter (tied ones once) and buffer of `model`, quantized ones at their real size; with `off_cpu`,
    only those on another device than the CPU (a model split between GPU and CPU: what the GPU holds)."""
    tensors = [p.data if type(p) is torch.nn.Parameter else p for p in model.parameters()] + list(model.buffers())
    return sum(tensor_bytes(t) for t in tensors if not off_cpu or t.device.type != "cpu")


def _state_to_save(model: Any) -> dict[str, torch.Tensor]:
    """quanto's state dict with tied tensors once, plus the non-persistent buffers."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:  # a tied tensor (the head sharing the embedding): tie_weights restores it
            continue
        seen.add(key)
        state[name] = t.detach().contiguous()
    for name, b in model.named_non_persistent_buffers():
        state[BUFFER_PREFIX + name] = b.detach().contiguous()
    return state


def save(model: Any, target: Path, facts: dict[str, Any], record_files: Callable[[Path], dict[str, Any]]) -> None:
    """Write a quantized model's copy to `target` (atomically: a temporary folder, then a rename)."""
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state_to_save(model), str(tmp / WEIGHTS_FILE))
    (tmp / QMAP_FILE).write_text(json.dumps(quantization_map(model)))
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / RECORD).write_text(json.dumps({**facts, "format": QUANTIZED_FORMAT, "files": record_files(tmp)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def load(folder: Path, dtype: torch.dtype, device: torch.device | None = None, *, plain: bool = False,
         trust_remote_code: bool = False) -> Any:
    """The quantized model kept in `folder`, on `device` (default the CPU), without reading float weights or
    quantizing. `plain`: int4 weights stay in quanto's device-independent packing (to be moved to their devices,
    then `relayout`), instead of the layout of `device`'s kernel."""
    from optimum.quanto import requantize
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    # Copied out of the file's memory map: torch's int8 CPU kernel crashed (segfault) on some tensors read
    # straight from it.
    stored = {name: t.clone() for name, t in load_file(str(folder / WEIGHTS_FILE)).items()}
    buffers = {name.removeprefix(BUFFER_PREFIX): stored.pop(name) for name in list(stored)
               if name.startswith(BUFFER_PREFIX)}
    qmap = json.loads((folder / QMAP_FILE).read_text())
    with _plain_int4_kept(dtype, always=plain):
        requantize(model, stored, qmap, device=device or torch.device("cpu"))
    for name, _ in list(model.named_non_persistent_buffers()):
        if name not in buffers:
            raise ValueError(f"the copy lacks the buffer {name}")
        module, _, attr = name.rpartition(".")
        model.get_submodule(module).register_buffer(attr, buffers[name], persistent=False)
    model.tie_weights()
    state = model.state_dict()
    present = {state[name].data_ptr() for name in state if name in stored}
    missing = [name for name, t in state.items() if name not in stored and t.data_ptr() not in present]
    if missing:  # requantize loads leniently (strict=False): a key the file lacks would stay uninitialised
        raise ValueError(f"the copy lacks {', '.join(missing[:3])}")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return allow_inference_mode(model).eval()
