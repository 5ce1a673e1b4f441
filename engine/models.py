"""Finding and loading models: the bundled default, a local folder, a GGUF file or a Hub id.

A GGUF file is de-quantized by `transformers` on load, which takes ~20 s for the bundled
135M model on a laptop CPU. The first load therefore writes a safetensors copy (weights,
config, tokenizer) into the user cache folder, keyed by the GGUF file's SHA-256, and every
later load reads that copy instead (well under a second).

The weights can be loaded in another precision than the model's (`weights`: fp32, bf16, fp16, or
optimum-quanto's int8/int4 over a float base dtype, engine/quantized_weights.py — quantized once and
kept next to the converted copies) and split between a CUDA GPU and the CPU (`gpu_layers`,
engine/layer_split.py). `auto` follows the advisor's plan (`engine.memory.recommend_weights`): the
most faithful precision whose weights and KV cache fit, and the layers on the GPU that fit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import conversion, paths  # noqa: F401  (paths: scripts/bench_weights.py reads models.paths)
from engine.caches.shape import text_config
from engine.conversion import (  # noqa: F401  (re-exported: engine.models is where callers look)
    CONVERTED_FORMAT,
    atomic_write_text,
    converted_dir,
    converted_from,
    file_sha256,
    verify_converted,
    verify_recorded,
)
from engine.sources import (  # noqa: F401  (re-exported: engine.models is where callers look)
    BUNDLED_GGUF,
    BUNDLED_PACKAGE,
    DEFAULT_MODEL,
    ModelLoadError,
    ModelSource,
    bundled_model_path,
    resolve,
)
from engine.weights import FLOAT_SIZES, PRECISIONS, QUANTIZED_BITS

ProgressFn = Callable[[str], None]


@dataclass
class LoadedModel:
    """A model ready for generation, with the facts the engine needs about it."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    source: ModelSource
    identity: str  # stable id of the weights: file hash or hub revision, plus dtype
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    weights_bytes: int
    precision_note: str = ""  # why this dtype (auto on a CPU: measured fastest here)
    # The weights' precision (fp32 | bf16 | fp16 | int8 | int4; int8/int4 over `dtype`), and the decoder layers on
    # the GPU when they are split between GPU and CPU (None: every layer on `device`), of `layers`.
    weights: str = ""
    gpu_layers: int | None = None
    layers: int = 0
    weights_note: str = ""  # why this precision and split (the advisor's plan, or chosen)
    # A decoding step of n tokens relative to a step of one (engine/precision.py; CPU only): what
    # speculative decoding's auto mode weighs guesses against. Empty when not measured.
    step_costs: dict[int, float] = field(default_factory=dict)
    # The attention kernel (transformers' name: cachet_sdpa, flash_attention_2, ...) and why (engine/kernels.py).
    attention: str = ""
    attention_note: str = ""

    @property
    def precision_label(self) -> str:
        """The precision in words: the dtype, or "float32 + bf16 weights" for fp32 with bf16 copies of the
        weights for decoding steps (engine/half_weights.py)."""
        if self.identity.endswith("|bf16-weights"):
            return "float32 + bf16 weights"
        if self.weights in QUANTIZED_BITS:
            return f"{self.weights} weights over {str(self.dtype).removeprefix('torch.')}"
        return str(self.dtype).removeprefix("torch.")

    @property
    def split_label(self) -> str:
        """Where the layers are: "" when all on `device`, else "N of L layers on cuda:0, the rest in RAM"."""
        if self.gpu_layers is None:
            return ""
        gpu = next((str(p.device) for p in self.model.parameters() if p.device.type == "cuda"), "the GPU")
        return f"{self.gpu_layers} of {self.layers} layers on {gpu}, {self.layers - self.gpu_layers} in RAM"

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def context_length(self) -> int:
        return int(getattr(text_config(self.config), "max_position_embeddings", 0) or 2048)

    @property
    def stop_token_ids(self) -> set[int]:
        """Token ids that end an assistant turn: the generation config's EOS ids and the tokenizer's."""
        ids: set[int] = set()
        for eos in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list | tuple):
                ids.update(int(e) for e in eos)
        return ids


def pick_device(device: str | None = None) -> torch.device:
    """`auto` (or None): CUDA when present, else Apple's MPS, else the CPU."""
    if device and device != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("CUDA was requested but this torch build sees no CUDA GPU.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """The dtype to load in. `auto`: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on the CPU
    (where `load` then measures whether bf16 is faster on this machine: engine/precision.py)."""
    if dtype and dtype != "auto":
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise ModelLoadError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}.") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


WEIGHT_CHOICES = ("auto", *PRECISIONS)
_PRECISION_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_weights(weights: str | None, dtype: str | None = None, gpu_layers: int | None = None) -> None:
    """Refuse a weight precision, dtype and GPU-layer count that cannot go together, before anything is loaded.

    `weights` fp32/bf16/fp16 is the float dtype itself, so a different explicit `dtype` contradicts it;
    int8/int4 quantize the linear layers over the `dtype` base (auto: the device's, fp32 on a CPU).
    """
    if weights not in (None, *WEIGHT_CHOICES):
        raise ModelLoadError(f"Unknown weight precision {weights!r}; choose one of {', '.join(WEIGHT_CHOICES)}.")
    if dtype not in (None, "auto") and dtype not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}.")
    if weights in _PRECISION_DTYPE_NAMES and dtype not in (None, "auto") and _DTYPES[dtype] != _DTYPES[weights]:
        raise ModelLoadError(
            f"--weights {weights} and --dtype {dtype} disagree: {weights} weights are "
            f"{_PRECISION_DTYPE_NAMES[weights]}. Give one of them (--dtype is the base under --weights int8/int4)."
        )
    if gpu_layers is not None and gpu_layers < 0:
        raise ModelLoadError(f"--gpu-layers must be 0 or more, not {gpu_layers}.")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Keep transformers' progress bars and info logs out of the user's terminal."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_architecture(config: Any, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{where}: model type {model_type!r} is not a text-generation architecture that this "
            "version of transformers supports."
        )


def ensure_converted(gguf: Path, progress: ProgressFn | None = None, *, rebuild: str | None = None) -> tuple[str, Path]:
    """(SHA-256 of `gguf`, its safetensors copy in the cache folder), converting it first if needed.

    The copy is checked against the size and SHA-256 of every file recorded when it was written
    (hashes are remembered per size and modification time, so this costs a hash only after a
    file changed); a damaged copy is converted again from the GGUF, and `progress` says so.
    `rebuild` (a reason) forces that, e.g. after the copy failed to load. Leftover temporary
    folders of an interrupted conversion are removed first.
    """
    report = progress or (lambda _msg: None)
    report(f"Checking {gguf.name}…")
    digest = file_sha256(gguf)
    folder = converted_dir(digest)
    remove_interrupted_conversions(folder.parent)
    damage = rebuild or (verify_converted(folder) if (folder / "model.safetensors").is_file() else None)
    if damage is not None:
        report(f"The converted copy of {gguf.name} is damaged ({damage}); converting it again from the GGUF file…")
        shutil.rmtree(folder, ignore_errors=True)
    if not (folder / "model.safetensors").is_file():
        with _quiet_transformers():
            _convert_gguf(gguf, folder, report, digest)
    elif converted_from(folder) != digest:  # converted before copies recorded their source's hash
        atomic_write_text(folder / "cachet-source.json",
                          json.dumps({"gguf": gguf.name, "sha256": digest, "format": CONVERTED_FORMAT}))
    return digest, folder


def remove_interrupted_conversions(models_dir: Path) -> list[Path]:
    """Delete the hidden temporary folders of conversions whose process is gone (a kill during a
    first start left a 301 MB one behind)."""
    removed = []
    for tmp in models_dir.glob(".*.tmp") if models_dir.is_dir() else ():
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid == os.getpid() or _process_alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # no cheap check without extra packages: keep it (removed once its pid is ours)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record_files(folder: Path, record_name: str = "cachet-source.json") -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of a converted (or quantized) copy, for `verify_recorded`."""
    record = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != record_name:
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
            record[path.name] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return record


def _convert_gguf(gguf: Path, target: Path, progress: ProgressFn, digest: str, *, every_start: bool = False) -> None:
    """De-quantize a GGUF file once and store it as safetensors + config + tokenizer (`every_start`: a copy
    for this start only, as the user chose to save the disk)."""
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    when = "at every start, nothing kept on disk" if every_start else "first start only"
    progress(f"Converting {gguf.name} ({when})…")
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf raises many kinds of errors on a damaged file
        raise ModelLoadError(f"{gguf} is not a readable GGUF model ({type(exc).__name__}: {exc}).") from exc
    _check_architecture(config, str(gguf))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"Could not load {gguf}: {type(exc).__name__}: {exc}") from exc
    progress("Saving a fast-loading copy…")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_pretrained refuses GGUF-loaded models; safetensors' save_model handles tied weights.
    save_model(model, str(tmp / "model.safetensors"))
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "cachet-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest,
                                                       "format": CONVERTED_FORMAT, "files": _record_files(tmp)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _convert_temporarily(gguf: Path, progress: ProgressFn) -> tuple[str, Path]:
    """(SHA-256 of `gguf`, a converted copy in a hidden folder of engine.conversion.temporary_dir() that the
    caller removes).
    Named as an interrupted conversion is (`.NAME.PID.tmp`), so a copy left by a killed process is
    removed at the next start."""
    progress(f"Checking {gguf.name}…")
    digest = file_sha256(gguf)
    temporary = conversion.temporary_dir()
    remove_interrupted_conversions(temporary)
    folder = temporary / f".{digest[:32]}-this-start.{os.getpid()}.tmp"
    shutil.rmtree(folder, ignore_errors=True)
    with _quiet_transformers():
        _convert_gguf(gguf, folder, progress, digest, every_start=True)
    return digest, folder


def load(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    weights: str | None = "auto",
    gpu_layers: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offline: bool = True,
    progress: ProgressFn | None = None,
    rebuilt: bool = False,
    keep_converted: bool = True,
) -> LoadedModel:
    """Load a model for chat.

    Args:
        spec: "default", a path to a .gguf file or a Hugging Face folder, or a Hub id.
        device: "auto", "cpu", "cuda", "cuda:1", "mps".
        dtype: "auto", "float32", "float16", "bfloat16": the model's dtype, or the base dtype under int8/int4
            weights (what embeddings, norms, activations and the KV cache are in).
        weights: the weights' precision — "auto" (the advisor's plan: the most faithful that fits with a chat of
            the model's context), "fp32", "bf16", "fp16", or optimum-quanto's "int8"/"int4" over `dtype`.
            None: as `dtype` says, nothing planned.
        gpu_layers: decoder layers on the CUDA GPU, the others run from RAM on the CPU (llama.cpp's
            `n_gpu_layers`); None: as the advisor plans (all of them when they fit).
        trust_remote_code: run Python code shipped with the model (off by default).
        allow_pickle: accept pickle `.bin` weights, which can run code when loaded.
        offline: never contact the Hub (a Hub id must then be in the local HF cache).
        progress: called with short human-readable status lines.
        rebuilt: a GGUF's converted copy (or a quantized copy) was just made again (it is not rebuilt twice).
        keep_converted: a GGUF's converted copy stays in the cache folder for the next start (False: it is
            converted into a temporary folder, removed once the model is loaded; engine.conversion says
            how much disk a copy takes).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_weights(weights, dtype, gpu_layers)
    report = progress or (lambda _msg: None)
    started = time.perf_counter()
    source = resolve(spec)
    dev = pick_device(device)
    if gpu_layers and dev.type != "cuda":
        raise ModelLoadError(
            f"--gpu-layers {gpu_layers} puts layers on a CUDA GPU, but the model runs on {dev} "
            f"({'this torch build sees no CUDA GPU' if not torch.cuda.is_available() else 'asked for'}). "
            "Leave --gpu-layers out (or 0) to run every layer there."
        )
    dt = pick_dtype(dev, dtype)
    again: dict[str, Any] = {"device": device, "dtype": dtype, "weights": weights, "gpu_layers": gpu_layers,
             "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle, "offline": offline,
             "progress": progress, "rebuilt": True, "keep_converted": keep_converted}

    temporary: Path | None = None
    try:
        with _quiet_transformers():
            if source.kind == "gguf":
                if keep_converted:
                    digest, folder = ensure_converted(Path(source.location), report)
                else:  # converted into a folder removed once the model is loaded
                    digest, folder = _convert_temporarily(Path(source.location), report)
                    temporary = folder
                identity = f"gguf-sha256:{digest}"
                load_from = str(folder)
                extra: dict[str, Any] = {"use_safetensors": True}
            elif source.kind == "folder":
                folder = Path(source.location)
                has_safetensors = any(folder.glob("*.safetensors"))
                if not has_safetensors and any(folder.glob("*.bin")) and not allow_pickle:
                    raise ModelLoadError(
                        f"{folder} only has pickle .bin weights, which can run code when loaded. "
                        "Convert them to safetensors, or allow pickle weights explicitly if you trust the source."
                    )
                if not has_safetensors and not any(folder.glob("*.bin")):
                    raise ModelLoadError(f"{folder} has a config.json but no weight files.")
                digest_of_gguf = converted_from(folder)
                identity = (f"gguf-sha256:{digest_of_gguf}" if digest_of_gguf
                            else f"folder:{folder}:{_folder_fingerprint(folder)}")
                load_from, extra = str(folder), {"use_safetensors": has_safetensors}
            else:
                identity = f"hub:{source.location}"
                load_from, extra = source.location, {"use_safetensors": None if allow_pickle else True}
                if offline:
                    extra["local_files_only"] = True

            report(f"Loading {source.display_name}…")
            try:
                config = AutoConfig.from_pretrained(load_from, trust_remote_code=trust_remote_code,
                                                    **({"local_files_only": True} if offline else {}))
            except Exception as exc:
                if source.kind != "gguf" or rebuilt:
                    raise ModelLoadError(_explain(source, exc)) from exc
                config = None
                failure: Exception | None = exc
            else:
                failure = None
            if config is not None and not trust_remote_code:
                _check_architecture(config, source.display_name)
            plan = None if config is None else plan_weights(config, dev, dt, dtype, weights, gpu_layers)
            if plan is not None:
                dt = plan.dtype
            try:
                if failure is not None:
                    raise failure
                tokenizer = AutoTokenizer.from_pretrained(load_from, trust_remote_code=trust_remote_code,
                                                          **({"local_files_only": True} if offline else {}))
                if plan is not None and plan.precision in QUANTIZED_BITS:
                    model: Any = _load_quantized(load_from, identity, plan, trust_remote_code, extra, report, dev)
                else:
                    model = AutoModelForCausalLM.from_pretrained(
                        load_from, dtype=dt, trust_remote_code=trust_remote_code, **extra
                    )
            except ModelLoadError:
                raise
            except _QuantizedCopyError as exc:  # our quantized copy passed its checks but failed to load: once more
                if rebuilt:
                    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
                    raise ModelLoadError(_explain(source, cause)) from exc
                report(f"The quantized copy of the weights could not be loaded ({exc}); quantizing them again…")
                shutil.rmtree(exc.folder, ignore_errors=True)
                return load(spec, **again)
            except Exception as exc:
                if source.kind != "gguf" or rebuilt or temporary is not None:
                    raise ModelLoadError(_explain(source, exc)) from exc
                # Our own converted copy failed to load: rebuild it from the GGUF once, then try again.
                ensure_converted(Path(source.location), report, rebuild=f"{type(exc).__name__}: {exc}"[:200])
                return load(spec, **again)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(f"{source.display_name} has no chat template, so it cannot be used for chat.")
    layers = int(getattr(text_config(model.config), "num_hidden_layers", 0) or 0)
    split = plan is not None and plan.gpu_layers is not None
    if split:
        from engine import layer_split

        assert plan is not None and plan.gpu_layers is not None
        try:
            device_map = layer_split.device_map_for(model.config, plan.gpu_layers, _cuda_name(dev), model=model)
        except layer_split.SplitError as exc:
            raise ModelLoadError(f"{source.display_name}: {exc}") from exc
        model = layer_split.dispatch(model, device_map)
        if plan.precision in QUANTIZED_BITS:
            from engine.quantized_weights import relayout

            relayout(model)  # int4: each weight in the layout of the kernel on its own device
        dev = torch.device("cpu")  # inputs and logits: the embedding and the first layers run from RAM
    else:
        model.to(dev)
    model.eval()
    attention_note = _choose_attention(model, dev, dt)
    note, costs = "", {}
    precision_name = str(dt).removeprefix("torch.")  # names the weights' precision in the identity (snapshots)
    if plan is not None and plan.precision in QUANTIZED_BITS:
        precision_name = f"{plan.precision}-{precision_name}"
        note = plan.reason
    elif dev.type == "cpu" and not split:
        from engine import precision

        if dtype in (None, "auto") and (plan is None or plan.probe):
            choice = precision.choose_cpu_precision(model, identity, report)
            if choice.half_weights:
                from engine import half_weights

                half_weights.convert(model, choice.kernel_max_tokens)  # decoding steps read a bf16 copy
            elif choice.dtype != dt:
                model.to(choice.dtype)
                dt = choice.dtype
            precision_name = choice.name
            note, costs = choice.reason, choice.step_costs
        else:
            costs = precision.step_costs_for(model, identity, dt)
            note = "chosen" if dtype not in (None, "auto") or plan is None or plan.chosen else plan.reason
    elif split:
        assert plan is not None
        note = plan.reason
    else:
        note = "chosen" if dtype not in (None, "auto") else f"the GPU's fastest supported ({dt})"
    from engine.quantized_weights import model_bytes

    weight_precision = plan.precision if plan is not None else _FLOAT_PRECISION.get(dt, str(dt))
    if plan is None or plan.precision not in QUANTIZED_BITS:
        weight_precision = _FLOAT_PRECISION.get(dt, weight_precision)  # the CPU probe may have chosen another
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        identity=f"{identity}|{precision_name}",
        device=dev,
        dtype=dt,
        load_seconds=time.perf_counter() - started,
        weights_bytes=model_bytes(model),
        precision_note=note,
        step_costs=costs,
        weights=weight_precision,
        gpu_layers=plan.gpu_layers if split and plan is not None else None,
        layers=layers,
        weights_note="" if plan is None else plan.reason,
        attention=str(getattr(model.config, "_attn_implementation", "") or ""),
        attention_note=attention_note,
    )


def _choose_attention(model: Any, dev: torch.device, dt: torch.dtype) -> str:
    """Set `model`'s attention kernel (engine/kernels.py: FlashAttention 2 where installed, supported and safe
    for every cache strategy a chat can use here; else Cachet's SDPA path); returns the reason."""
    from engine import caches
    from engine.attention import use_packed_attention
    from engine.kernels import FLASH, choose_attention

    choice = choose_attention(
        device_type=dev.type, capability=torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None,
        dtype=str(dt), strategies=[s for s, why in caches.availability(dev).items() if why is None])
    if choice.kernel == FLASH:
        try:
            model.set_attn_implementation(FLASH)
            return choice.reason
        except (ValueError, ImportError, AttributeError) as exc:  # a model or a flash-attn build transformers refuses
            reason = f"SDPA: transformers would not run this model with FlashAttention 2 ({exc})"
    else:
        reason = choice.reason
    use_packed_attention(model)  # a few queries over a long cache without copying it (engine/attention.py)
    return reason


_FLOAT_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class LoadPlan:
    """How `load` stores and places the weights.

    precision: fp32 | bf16 | fp16 | int8 | int4. dtype: the float dtype (the base under int8/int4).
    gpu_layers: decoder layers on the CUDA GPU when split (None: every layer on the device).
    probe: on a CPU, let engine/precision.py measure fp32 vs bf16 (the plan kept the loader's dtype).
    chosen: the user fixed the precision (not the advisor). reason: why, in words.
    """

    precision: str
    dtype: torch.dtype
    gpu_layers: int | None
    reason: str
    probe: bool = False
    chosen: bool = False


def plan_weights(config: Any, device: torch.device, dt: torch.dtype, dtype: str | None, weights: str | None,
                 gpu_layers: int | None, hardware: Any = None) -> LoadPlan | None:
    """What `load` does with the weights of the model `config` describes (None: as `dt`, nothing planned).

    `weights` auto, or `gpu_layers` left to the advisor on a CUDA GPU, ask `engine.memory.recommend_weights`
    (for a chat of the model's full context on this machine's free memory, or `hardware`); a precision given is
    kept, and so is a number of GPU layers given.
    """
    if weights is None and gpu_layers is None:
        return None
    from engine import memory

    layers = int(text_config(config).num_hidden_layers)
    explicit_dtype = dtype not in (None, "auto")
    if weights in _PRECISION_DTYPE_NAMES:
        dt = _DTYPES[weights]
    base = _FLOAT_PRECISION.get(dt, "fp32")
    needs_advice = weights == "auto" or (weights is not None and gpu_layers is None and device.type == "cuda")
    precision = weights if weights not in (None, "auto") else base
    reason = f"{precision} weights: chosen" if weights not in (None, "auto") else ""
    planned_layers: int | None = None
    if needs_advice:
        hw = hardware if hardware is not None else memory.read_hardware(device)
        ask = "auto" if weights in (None, "auto") else weights
        try:
            advice = memory.recommend_weights(config, hw, ask, dtype=dt)
        except Exception:  # an architecture the advisor cannot build on the meta device (remote code): no plan
            if weights in (None, "auto") and gpu_layers is None:
                return None
            advice = None
        plan = advice.weight_plan if advice is not None else None
        if plan is not None:
            if weights in (None, "auto"):
                precision = plan.precision
                if plan.precision in FLOAT_SIZES:
                    dt = memory.PRECISION_DTYPE[plan.precision]
            if plan.split:
                planned_layers = plan.gpu_layers
            assert advice is not None
            reason = f"the advisor's plan: {advice.explanation}" if advice.recommended is not None else (
                f"the advisor found nothing that fits ({advice.explanation}); loading {plan.describe()}")
    if gpu_layers is not None:  # as llama.cpp's -ngl, a count beyond the layers means all of them
        planned_layers = gpu_layers if gpu_layers < layers else None
        reason = f"{reason}; {min(gpu_layers, layers)} of {layers} layers on the GPU: chosen".lstrip("; ")
    if device.type != "cuda":
        planned_layers = None
    probe = (device.type == "cpu" and weights in (None, "auto") and not explicit_dtype and precision == "fp32")
    return LoadPlan(precision, dt, planned_layers, reason, probe=probe, chosen=weights not in (None, "auto"))


def _cuda_name(dev: torch.device) -> str:
    return f"cuda:{dev.index or 0}"


def _quantized_folder(identity: str, plan: LoadPlan) -> Path:
    from engine.quantized_weights import quantized_dir

    key = identity.removeprefix("gguf-sha256:") if identity.startswith("gguf-sha256:") else (
        hashlib.sha256(identity.encode()).hexdigest())
    return quantized_dir(key, plan.precision, _FLOAT_PRECISION[plan.dtype])


class _QuantizedCopyError(Exception):
    """A quantized copy that passed its checks did not load (`folder`: the copy)."""

    def __init__(self, folder: Path, exc: Exception) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}"[:200])
        self.folder = folder


def _load_quantized(load_from: str, identity: str, plan: LoadPlan, trust_remote_code: bool, extra: dict[str, Any],
                    report: ProgressFn, device: torch.device) -> Any:
    """The model with int8/int4 weights: from its quantized copy when that is sound, else quantized now and kept.

    On `device`, in the layout of its kernels; with a layer split (`plan.gpu_layers`), on the CPU in quanto's
    device-independent packing, for `quantized_weights.relayout` once each layer is where it runs.

    The first time, the float model is quantized in RAM, never on the GPU: int8/int4 are planned exactly when
    the float weights do not fit there (an 8B model is 16 GB in bf16, against 8–12 GB of VRAM); the quantized
    weights then move to the GPU in quanto's portable packing and are laid out for its kernels there."""
    split = plan.gpu_layers is not None
    target = torch.device("cpu") if split else device
    from transformers import AutoModelForCausalLM

    from engine import quantized_weights as qw

    folder = _quantized_folder(identity, plan)
    remove_interrupted_conversions(folder.parent)
    damage = verify_recorded(folder, qw.RECORD) if folder.is_dir() else None
    if damage is not None:
        report(f"The {plan.precision} copy of the weights is damaged ({damage}); quantizing them again…")
        shutil.rmtree(folder, ignore_errors=True)
    if folder.is_dir():
        try:
            return qw.load(folder, plan.dtype, target, plain=split, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise _QuantizedCopyError(folder, exc) from exc
    model = AutoModelForCausalLM.from_pretrained(load_from, dtype=plan.dtype, trust_remote_code=trust_remote_code,
                                                 **extra)
    report(f"Quantizing the weights to {plan.precision} (first load only)…")
    qw.quantize(model.to("cpu"), plan.precision)  # type: ignore[arg-type]  # in RAM (see above)
    report(f"Saving the {plan.precision} copy…")
    try:
        qw.save(model, folder, {"source": identity, "precision": plan.precision,
                                "base_dtype": _FLOAT_PRECISION[plan.dtype]},
                lambda tmp: _record_files(tmp, qw.RECORD))
    except OSError as exc:  # a full disk: run with what was quantized, quantize again next time
        report(f"Could not keep the {plan.precision} copy ({exc}); it will be quantized again next time.")
    if split:
        return qw.to_plain(model)
    if target.type != "cpu":
        report(f"Moving the {plan.precision} weights to {target}…")
        return qw.relayout(qw.to_plain(model).to(target))
    return model


def _folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _explain(source: ModelSource, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if source.kind == "hub" and ("local_files_only" in text or "offline" in text.lower() or "connect" in text.lower()):
        return (f"{source.location} is not in the local Hugging Face cache and Cachet is offline. "
                "Download it once while online, or choose a local folder or GGUF file.")
    return f"Could not load {source.display_name}: {text}"


def load_config(spec: str = DEFAULT_MODEL, *, offline: bool = True, trust_remote_code: bool = False) -> Any:
    """Only a model's config (for the memory advisor): no weights are read."""
    from transformers import AutoConfig

    source = resolve(spec)
    with _quiet_transformers():
        try:
            if source.kind == "gguf":
                gguf = Path(source.location)
                folder = converted_dir(file_sha256(gguf))
                if (folder / "config.json").is_file():
                    return AutoConfig.from_pretrained(folder)
                return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                              **({"local_files_only": True} if offline else {}))
        except Exception as exc:
            raise ModelLoadError(_explain(source, exc)) from exc
