"""A model's decoder layers split between a CUDA GPU and the CPU (llama.cpp's `n_gpu_layers`), with accelerate.

`device_map_for` is where the advisor's `WeightPlan` puts each module (`engine.weights.WeightBytes.split`):
the last `gpu_layers` decoder layers on the GPU, the first ones in RAM; everything outside the layers
(final norm, output head, rotary embedding, a vision tower) on the GPU; the input embedding — a lookup,
no matrix product — in RAM, unless it is tied to the head (then it stays with it on the GPU).

`dispatch` hands that map to `accelerate.dispatch_model` with the CPU as the main device. That matters:
with a GPU as main device (what `from_pretrained(device_map=...)` does), accelerate *offloads* the
"cpu" modules — their weights stay in RAM but are copied to the GPU for every forward pass, so
every layer runs, and keeps its KV cache, on the GPU. With the CPU as main device nothing is
offloaded: a RAM layer runs on the CPU, a GPU layer on the GPU, and accelerate's hooks move the
hidden states between them; the model takes its inputs and returns its logits on the CPU.

The KV cache follows: transformers' `DynamicLayer.lazy_initialization` (and Cachet's layers, which
derive from it) allocate a layer's keys and values on the device of the key states that layer's
attention hands it — where the layer runs. `engine.caches.base.KVCache.update` moves a layer's
tensors back there if the pool or a snapshot put them elsewhere, so each layer's KV lives where its
layer runs. The hooks are told not to move the cache (`skip_keys`): moving it whole to one layer's
device would break the others.
"""

from __future__ import annotations

from typing import Any

import torch

CPU = "cpu"
SKIP_KEYS = ("past_key_values", "cache")  # transformers 5.25 renamed the first to the second


class SplitError(ValueError):
    """A layer split this machine or model cannot do; the message says why."""


def _meta_model(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def decoder_layers_name(model: Any, layers: int) -> str:
    """The module name of the ModuleList holding the `layers` decoder blocks (as `memory.inventory_of` finds it)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    names = {id(m): n for n, m in model.named_modules()}
    for m in decoder.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == layers:
            return names[id(m)]
    raise SplitError(f"{type(model).__name__} has no list of {layers} decoder layers to split.")


def device_map_for(config: Any, gpu_layers: int, gpu: str = "cuda:0", *, model: Any = None) -> dict[str, str]:
    """Module name → device for `gpu_layers` of the model's decoder layers on `gpu` (see the module docstring).

    Args:
        config: the model's config (a meta-device model is built from it, nothing allocated).
        gpu_layers: decoder layers on the GPU, 0 to all of them.
        gpu: the GPU's torch device name.
        model: the model itself, when already built (its module names are read instead).
    """
    from engine.caches.shape import text_config

    layers = int(text_config(config).num_hidden_layers)
    if not 0 <= gpu_layers <= layers:
        raise SplitError(f"{gpu_layers} GPU layers asked for; the model has {layers} (choose 0 to {layers}).")
    model = model if model is not None else _meta_model(config)
    blocks = decoder_layers_name(model, layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embed is not None and head is not None and getattr(head, "weight", None) is embed.weight
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names.get(id(embed)) if embed is not None else None
    first_gpu = layers - gpu_layers
    device_map: dict[str, str] = {}

    def place(name: str, module: torch.nn.Module) -> None:
        if name == blocks:
            for i in range(layers):
                device_map[f"{name}.{i}"] = gpu if i >= first_gpu else CPU
            return
        if name == embed_name:
            device_map[name] = gpu if tied or gpu_layers == layers else CPU
            return
        holds = name == "" or blocks.startswith(name + ".") or (embed_name or "").startswith(name + ".")
        if not holds:
            device_map[name] = gpu
            return
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise SplitError(f"{name or type(model).__name__} holds tensors of its own next to the decoder layers; "
                             "Cachet cannot split this architecture.")
        for child_name, child in module.named_children():
            place(f"{name}.{child_name}" if name else child_name, child)

    place("", model)
    return device_map


def devices_of_layers(device_map: dict[str, str], layers_name: str, layers: int) -> list[str]:
    """Each decoder layer's device, in order."""
    return [device_map[f"{layers_name}.{i}"] for i in range(layers)]


def dispatch(model: Any, device_map: dict[str, str]) -> Any:
    """Place `model`'s modules as `device_map` says and run each where it is placed (CPU as the main device:
    nothing offloaded; inputs and logits on the CPU)."""
    import logging

    from accelerate import dispatch_model

    own = getattr(model, "_skip_keys_device_placement", None) or []
    skip = list(dict.fromkeys([*([own] if isinstance(own, str) else own), *SKIP_KEYS]))
    logger = logging.getLogger("accelerate.big_modeling")
    level = logger.level
    logger.setLevel("ERROR")  # "Some parameters are on the meta device because they were offloaded to the cpu": not so
    try:
        return dispatch_model(model, device_map=device_map, main_device=CPU, skip_keys=skip, force_hooks=True)
    finally:
        logger.setLevel(level)


def gpu_placement(model: Any, layers: int) -> tuple[str, frozenset[int]]:
    """For a split model: the GPU's device name and the indices of the decoder layers that run there (and keep
    their KV cache there); ("", empty) when no layer is on a GPU."""
    try:
        blocks = model.get_submodule(decoder_layers_name(model, layers))
    except SplitError:
        return "", frozenset()
    on_gpu: dict[int, str] = {}
    for i, block in enumerate(blocks):
        device = next((p.device for p in block.parameters()), torch.device(CPU))
        if device.type != CPU:
            on_gpu[i] = str(device)
    return (next(iter(on_gpu.values()), ""), frozenset(on_gpu))


def bytes_on_gpu(cache: Any, gpu_layers: frozenset[int]) -> int:
    """Bytes of `cache` held by the layers in `gpu_layers` (where a split model runs them: on the GPU)."""
    if cache is None or not gpu_layers:
        return 0
    return sum(layer.nbytes() for i, layer in enumerate(cache.layers) if i in gpu_layers)
