"""The models already on this computer: GGUF files and Hugging Face model folders in the places
LM Studio, Ollama, GPT4All and the Hugging Face hub keep them, and in folders the user adds.

For each model: its name, architecture, parameter count, file quantization, context length,
size on disk, where it was found, and whether Cachet can use it — or why not ("unsupported":
a sound file this transformers cannot run as a chat model; "broken": a damaged, truncated or
incomplete download). Nothing here reads tensor data or imports torch: GGUF files are described
from their header (`engine.gguf_header`), model folders from `config.json` and the safetensors
headers, and the transformers architectures are read from its source. A description is cached
per file (path, size, modification time) in the cache folder, so listing again is instant.

Every location can be injected (`default_locations(platform=, home=, env=)`) so the tests run
against fake LM Studio / Ollama / GPT4All / Hugging Face layouts on any OS.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import plistlib
import re
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from engine import paths
from engine.gguf_header import GGUFHeader, GGUFHeaderError, read_header
from engine.weights import WeightInventory, inventory_from_gguf

SOURCES = {
    "lmstudio": "LM Studio",
    "ollama": "Ollama",
    "gpt4all": "GPT4All",
    "hf-cache": "Hugging Face cache",
    "folder": "added folder",
}
USABLE, UNSUPPORTED, BROKEN = "usable", "unsupported", "broken"
CACHE_FORMAT = 1
WALK_DEPTH = 4  # LM Studio keeps publisher/repo/file.gguf; a user folder may nest a little deeper
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# pre-quantized checkpoints transformers loads only with an extra package: quant_method -> module
_QUANT_PACKAGES = {"gptq": "gptqmodel", "awq": "awq", "bitsandbytes": "bitsandbytes", "aqlm": "aqlm",
                   "eetq": "eetq", "hqq": "hqq", "quanto": "optimum.quanto", "torchao": "torchao",
                   "compressed-tensors": "compressed_tensors", "higgs": "flute", "vptq": "vptq"}


@dataclass(frozen=True)
class Location:
    """A place to look for models and which application keeps it."""

    source: str  # a key of SOURCES
    path: Path


@dataclass(frozen=True)
class ModelShape:
    """What the memory advisor needs about a GGUF model's attention, read from its header."""

    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    context_length: int

    def as_config(self) -> SimpleNamespace:
        """A stand-in for a transformers config with the fields the KV estimates read."""
        return SimpleNamespace(num_hidden_layers=self.layers, num_attention_heads=self.attention_heads,
                               num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                               hidden_size=self.hidden_size, max_position_embeddings=self.context_length)


@dataclass(frozen=True)
class DiscoveredModel:
    """One model found on disk. `path` is what to open: a .gguf file or a model folder."""

    name: str
    path: str
    format: str  # "gguf" | "folder"
    source: str  # a key of SOURCES
    found_in: str  # the location it was found under
    architecture: str | None
    params: int | None
    quantization: str | None
    context_length: int | None
    size_bytes: int
    status: str  # usable | unsupported | broken
    reason: str | None = None
    shape: ModelShape | None = None  # GGUF only: for the advisor without transformers
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()  # GGUF only: names and GGUF shapes

    @property
    def usable(self) -> bool:
        return self.status == USABLE

    @property
    def source_label(self) -> str:
        return SOURCES.get(self.source, self.source)

    def weight_inventory(self) -> WeightInventory | None:
        """The weights by tensor (GGUF: from the header); None for a folder (use its config)."""
        if not self.tensors or self.shape is None:
            return None
        return inventory_from_gguf(list(self.tensors), self.shape.layers)

    def to_dict(self) -> dict[str, Any]:
        """The public description (for `--json` and the UI), without the tensor list."""
        data = asdict(self)
        data.pop("tensors")
        data["source_label"] = self.source_label
        return data

    def _to_cache(self) -> dict[str, Any]:
        data = asdict(self)
        data["tensors"] = [[name, list(shape)] for name, shape in self.tensors]
        return data

    @classmethod
    def _from_cache(cls, data: dict[str, Any]) -> DiscoveredModel:
        data = dict(data)
        shape = data.get("shape")
        data["shape"] = ModelShape(**shape) if shape else None
        data["tensors"] = tuple((name, tuple(dims)) for name, dims in data.get("tensors", ()))
        return cls(**data)


# --- where the applications keep their models -------------------------------------------------------


def default_locations(platform: str | None = None, home: Path | None = None,
                      env: Mapping[str, str] | None = None) -> list[Location]:
    """The usual model folders of LM Studio, Ollama, GPT4All and the Hugging Face hub on this OS.

    Args:
        platform: `sys.platform` ("linux", "darwin", "win32"); injectable for tests.
        home: the user's home folder (default: `Path.home()`).
        env: the environment (default: `os.environ`): OLLAMA_MODELS, HF_HUB_CACHE, HF_HOME,
            XDG_* and LOCALAPPDATA/APPDATA move these folders as they do for the applications.
    """
    plat = platform or sys.platform
    home = Path(home) if home is not None else Path.home()
    env = os.environ if env is None else env
    found: list[Location] = []

    def add(source: str, path: Path | None) -> None:
        if path is not None and not any(loc.path == path and loc.source == source for loc in found):
            found.append(Location(source, path))

    for folder in _lmstudio_folders(home):
        add("lmstudio", folder)

    if env.get("OLLAMA_MODELS"):
        add("ollama", Path(env["OLLAMA_MODELS"]))
    add("ollama", home / ".ollama" / "models")
    if plat.startswith("linux"):
        add("ollama", Path("/usr/share/ollama/.ollama/models"))  # the Linux installer's service user

    gpt4all_data, gpt4all_settings = _gpt4all_places(plat, home, env)
    add("gpt4all", _gpt4all_model_path(gpt4all_settings))
    add("gpt4all", gpt4all_data)

    add("hf-cache", _hf_hub_cache(home, env))
    return found


def _lmstudio_folders(home: Path) -> list[Path]:
    """LM Studio's models folders: the one chosen in its settings, then each home's `models`.

    LM Studio's home is named by `~/.lmstudio-home-pointer` when present, else `~/.cache/lm-studio`
    (older versions) or `~/.lmstudio`; a models folder moved in its settings is `downloadsFolder`
    in the home's settings.json.
    """
    homes: list[Path] = []
    pointer = home / ".lmstudio-home-pointer"
    with contextlib.suppress(OSError, ValueError):
        text = pointer.read_text(encoding="utf-8").strip()
        if text:
            homes.append(Path(text))
    homes += [home / ".lmstudio", home / ".cache" / "lm-studio"]
    folders: list[Path] = []
    for lm_home in homes:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            chosen = json.loads((lm_home / "settings.json").read_text(encoding="utf-8")).get("downloadsFolder")
            if isinstance(chosen, str) and chosen:
                folders.append(Path(chosen).expanduser())
        folders.append(lm_home / "models")
    return list(dict.fromkeys(folders))


def _gpt4all_places(plat: str, home: Path, env: Mapping[str, str]) -> tuple[Path, Path]:
    """(GPT4All's default model folder, its settings file) on `plat`."""
    if plat == "darwin":
        return (home / "Library" / "Application Support" / "nomic.ai" / "GPT4All",
                home / "Library" / "Preferences" / "com.nomic.gpt4all.plist")
    if plat == "win32":
        local = Path(env["LOCALAPPDATA"]) if env.get("LOCALAPPDATA") else home / "AppData" / "Local"
        roaming = Path(env["APPDATA"]) if env.get("APPDATA") else home / "AppData" / "Roaming"
        return local / "nomic.ai" / "GPT4All", roaming / "nomic.ai" / "GPT4All.ini"
    data = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else home / ".local" / "share"
    config = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    return data / "nomic.ai" / "GPT4All", config / "nomic.ai" / "GPT4All.ini"


def _gpt4all_model_path(settings: Path) -> Path | None:
    """The download folder chosen in GPT4All's settings (`modelPath`), if any."""
    value: object = None
    try:
        if settings.suffix == ".plist":
            with settings.open("rb") as fh:
                value = plistlib.load(fh).get("modelPath")
        else:
            for line in settings.read_text(encoding="utf-8", errors="replace").splitlines():
                key, sep, rest = line.partition("=")
                if sep and key.strip() == "modelPath":
                    value = rest.strip().strip('"')
                    break
    except (OSError, ValueError, plistlib.InvalidFileException):
        return None
    return Path(value).expanduser() if isinstance(value, str) and value else None


def _hf_hub_cache(home: Path, env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache, resolved as huggingface_hub does."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else home / ".cache"
    return cache / "huggingface" / "hub"


# --- what the installed transformers can run -------------------------------------------------------


def _transformers_literal(relative: str, name: str) -> Any:
    """A module-level literal of the installed transformers, read from its source without importing it
    (importing transformers' model mappings pulls in torch, seconds the listing does not need)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / relative
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                value = node.value
                if isinstance(value, ast.Call) and value.args:  # OrderedDict([...])
                    value = value.args[0]
                return ast.literal_eval(value)
    except (OSError, SyntaxError, ValueError):
        return None
    return None


@functools.cache
def causal_lm_types() -> frozenset[str]:
    """The model types the installed transformers builds with AutoModelForCausalLM."""
    names = _transformers_literal("models/auto/modeling_auto.py", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if names is None:  # the source moved: ask transformers itself (imports torch)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return frozenset(dict(names))


@functools.cache
def gguf_architectures() -> frozenset[str]:
    """GGUF architectures the installed transformers can convert (keys of its GGUF_CONFIG_MAPPING)."""
    mapping = _transformers_literal("integrations/ggml.py", "GGUF_CONFIG_MAPPING")
    if mapping is None:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        mapping = GGUF_CONFIG_MAPPING
    return frozenset(mapping) - {"general", "tokenizer"}


def gguf_model_type(architecture: str, name: str = "") -> str:
    """The transformers model type a GGUF architecture loads as (as `load_gguf_checkpoint` renames it)."""
    arch = architecture.replace("-", "_")
    if "llama" in arch and name == "mistral":  # transformers tests `"mistral" in [general.name]`: the exact name
        return "mistral"
    arch = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)
    return {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}.get(arch, arch)


@functools.cache
def gguf_knows_architecture(name: str) -> bool:
    """Whether the installed gguf package names this architecture (transformers maps tensor names through it)."""
    from gguf.constants import MODEL_ARCH_NAMES

    return name in MODEL_ARCH_NAMES.values()


@functools.cache
def dequantizable(ggml_type: int) -> bool:
    """Whether the installed gguf package can de-quantize tensors of this GGML type (transformers needs it)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, size = GGML_QUANT_SIZES[qtype]
        dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):
        return False
    except Exception:  # anything else from a kernel we could not run: treat as unusable
        return False
    return True


def _versions() -> str:
    found = []
    for package in ("transformers", "gguf"):
        try:
            found.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package}=none")
    return ",".join(found)


# --- GGUF files -----------------------------------------------------------------------------------


def _file_type_name(header: GGUFHeader) -> str | None:
    """The file's quantization: `general.file_type` (e.g. Q4_K_M), else its commonest tensor type by bytes."""
    from gguf.constants import LlamaFileType

    ftype = header.get("general.file_type")
    if isinstance(ftype, int):
        with contextlib.suppress(ValueError):
            name = LlamaFileType(ftype).name
            return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    weight: dict[str, int] = {}
    for t in header.tensors:
        weight[t.type_name] = weight.get(t.type_name, 0) + (t.nbytes or 0)
    return max(weight, key=lambda k: weight[k]) if weight else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)  # per-layer values (e.g. KV heads): the largest layer sizes the cache
    return None


def _gguf_shape(header: GGUFHeader) -> ModelShape | None:
    layers = _as_int(header.arch_value("block_count"))
    heads = _as_int(header.arch_value("attention.head_count"))
    hidden = _as_int(header.arch_value("embedding_length"))
    if not layers or not heads or not hidden:
        return None
    kv_heads = _as_int(header.arch_value("attention.head_count_kv")) or heads
    head_dim = _as_int(header.arch_value("attention.key_length")) or hidden // heads
    context = _as_int(header.arch_value("context_length")) or 0
    return ModelShape(layers, heads, kv_heads, head_dim, hidden, context)


def _display_name(path: Path) -> str:
    """A GGUF file's name without `.gguf` (and without `-00001-of-00003` for a split model)."""
    match = _SPLIT_NAME.match(path.name)
    if match:
        return match.group("stem")
    return path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name


def describe_gguf(path: Path, source: str = "folder", found_in: str = "", name: str | None = None) -> DiscoveredModel:
    """Describe one GGUF file from its header. Never raises: a damaged file is described as broken."""
    path = Path(path)
    display = name or _display_name(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return DiscoveredModel(display, str(path), "gguf", source, found_in, None, None, None, None, 0, BROKEN,
                               f"cannot read the file: {exc.strerror or exc}")
    try:
        header = read_header(path)
    except GGUFHeaderError as exc:
        return DiscoveredModel(display, str(path), "gguf", source, found_in, None, None, None, None, size, BROKEN,
                               f"not a readable GGUF file: {exc}")
    except OSError as exc:
        return DiscoveredModel(display, str(path), "gguf", source, found_in, None, None, None, None, size, BROKEN,
                               f"cannot read the file: {exc.strerror or exc}")

    arch = header.architecture
    shape = _gguf_shape(header)
    context = shape.context_length if shape and shape.context_length else None
    params = sum(t.n_elements for t in header.tensors)
    tensors = tuple((t.name, t.dims) for t in header.tensors)
    base = DiscoveredModel(display, str(path), "gguf", source, found_in, arch, params, _file_type_name(header),
                           context, size, USABLE, None, shape, tensors)
    status, reason = _gguf_status(header, path)
    if status == USABLE and shape is None:
        status, reason = BROKEN, "the header lacks the layer count, heads or width of the model"
    split = _split_info(header, path)
    if split is not None:
        total_size, total_params, problem = split
        base = replace(base, size_bytes=total_size, params=total_params)
        if problem:
            status, reason = BROKEN, problem
        elif status == USABLE:
            count = header.get("split.count")
            status, reason = UNSUPPORTED, (f"split into {count} files; transformers reads single-file GGUF models "
                                           "only (join them with llama.cpp's `llama-gguf-split --merge`)")
    if status != USABLE:
        base = replace(base, status=status, reason=reason)
    return base


def _gguf_status(header: GGUFHeader, path: Path) -> tuple[str, str | None]:
    """(status, reason) of a GGUF file whose header was read."""
    kind = header.get("general.type")
    arch = header.architecture
    if kind == "mmproj" or arch == "clip":
        return UNSUPPORTED, "a vision projector (mmproj) that goes with a language model, not a model by itself"
    if kind == "adapter":
        return UNSUPPORTED, "a LoRA adapter, not a model by itself"
    expected = header.expected_size
    if expected is None:
        unknown = sorted({t.type_name for t in header.tensors if t.nbytes is None})
        return BROKEN, f"tensor types unknown to the installed gguf package: {', '.join(unknown)}"
    if header.get("split.count", 1) in (0, 1) and header.file_size < expected:
        return BROKEN, (f"truncated: the file has {header.file_size:,} of the {expected:,} bytes its tensors need "
                        "(an interrupted download? download it again)")
    if not arch:
        return BROKEN, "the header names no architecture (general.architecture)"
    model_type = gguf_model_type(arch, str(header.get("general.name") or ""))
    if arch.replace("-", "_") not in gguf_architectures() and model_type not in gguf_architectures():
        return UNSUPPORTED, f"transformers {_package_version('transformers')} cannot load {arch} GGUF files"
    if model_type not in causal_lm_types():
        return UNSUPPORTED, f"{arch} is not a text-generation architecture of this transformers"
    if model_type == "mistral" and not gguf_knows_architecture("mistral"):
        return UNSUPPORTED, (f"named exactly \"mistral\", so transformers {_package_version('transformers')} reads it "
                             f"as a Mistral model, and the installed gguf package {_package_version('gguf')} has no "
                             "Mistral tensor names to read it with (\"Unknown gguf model_type: mistral in gguf-py\")")
    bad = sorted({t.type_name for t in header.tensors if not dequantizable(t.ggml_type)})
    if bad:
        return UNSUPPORTED, f"the installed gguf package cannot de-quantize its {', '.join(bad)} tensors"
    if not isinstance(header.get("tokenizer.chat_template"), str):
        return UNSUPPORTED, "no chat template in the file, so it cannot be used for chat"
    return USABLE, None


def _split_info(header: GGUFHeader, path: Path) -> tuple[int, int, str | None] | None:
    """(size, params, problem) over all files of a split GGUF model named by its first file; None if not split."""
    count = header.get("split.count")
    if not isinstance(count, int) or count <= 1:
        return None
    match = _SPLIT_NAME.match(path.name)
    if match is None:
        return header.file_size, sum(t.n_elements for t in header.tensors), "a split file whose name does not " \
            "follow the NAME-00001-of-0000N.gguf pattern, so its other parts cannot be found"
    size, params = 0, 0
    for no in range(1, count + 1):
        part = path.with_name(f"{match.group('stem')}-{no:05d}-of-{count:05d}.gguf")
        try:
            part_header = header if no == 1 else read_header(part)
        except OSError:
            return size, params, f"part {no} of {count} ({part.name}) is missing"
        except GGUFHeaderError as exc:
            return size, params, f"part {no} of {count} ({part.name}) is not readable: {exc}"
        expected = part_header.expected_size
        if expected is not None and part_header.file_size < expected:
            return size, params, f"part {no} of {count} ({part.name}) is truncated"
        size += part_header.file_size
        params += sum(t.n_elements for t in part_header.tensors)
    return size, params, None


def _is_later_split_part(path: Path) -> bool:
    match = _SPLIT_NAME.match(path.name)
    return match is not None and int(match.group("no")) > 1


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# --- Hugging Face model folders -------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensors, bytes the file needs) from a safetensors file's JSON header; raises ValueError when damaged."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError("the file is empty or truncated")
        (length,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if length > size - 8 or length > 100 * 2**20:
            raise ValueError("its header is cut off or damaged")
        header = json.loads(fh.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a table of tensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    end = max((int(v.get("data_offsets", [0, 0])[1]) for v in tensors.values()), default=0)
    return tensors, 8 + length + end


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), dict):
            return {**config[key], **{k: v for k, v in config.items() if k not in config[key]}}
    return config


def describe_folder(folder: Path, source: str = "folder", found_in: str = "",
                    name: str | None = None) -> DiscoveredModel:
    """Describe a Hugging Face model folder (config.json + weights). Never raises."""
    folder = Path(folder)
    display = name or folder.name
    size = _folder_size(folder)

    def entry(status: str, reason: str | None, **facts: Any) -> DiscoveredModel:
        values: dict[str, Any] = {"architecture": None, "params": None, "quantization": None, "context_length": None}
        values.update(facts)
        return DiscoveredModel(display, str(folder), "folder", source, found_in, values["architecture"],
                               values["params"], values["quantization"], values["context_length"], size, status,
                               reason)

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return entry(BROKEN, f"config.json cannot be read ({exc})")
    text = _text_config(config)
    model_type = config.get("model_type")
    context = text.get("max_position_embeddings")
    facts: dict[str, Any] = {"architecture": model_type if isinstance(model_type, str) else None,
                             "context_length": context if isinstance(context, int) else None}
    quant = config.get("quantization_config")
    mlx = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    if isinstance(quant, dict):
        bits = quant.get("bits") or quant.get("weights")
        facts["quantization"] = f"{quant.get('quant_method', 'quantized')}" + (f" {bits}-bit" if bits else "")
    elif mlx is not None:
        facts["quantization"] = f"mlx {mlx.get('bits', '?')}-bit"

    weights, problem = _weight_files(folder)
    if problem:
        return entry(BROKEN, problem, **facts)
    params = 0
    dtypes: dict[str, int] = {}
    for shard in weights:
        if shard.suffix != ".safetensors":
            continue
        try:
            tensors, needed = _safetensors_header(shard)
        except (OSError, ValueError) as exc:
            return entry(BROKEN, f"{shard.name} is damaged: {exc}", **facts)
        if shard.stat().st_size < needed:
            return entry(BROKEN, f"{shard.name} is truncated (an interrupted download?)", **facts)
        for info in tensors.values():
            n = math.prod(int(d) for d in info.get("shape", []))
            params += n
            dtypes[str(info.get("dtype"))] = dtypes.get(str(info.get("dtype")), 0) + n
    facts["params"] = params or None
    if "quantization" not in facts and dtypes:
        facts["quantization"] = max(dtypes, key=lambda k: dtypes[k])

    if not isinstance(model_type, str):
        return entry(BROKEN, "config.json names no model_type", **facts)
    if model_type not in causal_lm_types():
        return entry(UNSUPPORTED, f"model type {model_type!r} is not a text-generation architecture that "
                                  f"transformers {_package_version('transformers')} supports", **facts)
    if mlx is not None and not isinstance(quant, dict):
        return entry(UNSUPPORTED, "weights quantized for Apple's MLX, which transformers cannot load", **facts)
    if isinstance(quant, dict):
        method = str(quant.get("quant_method", ""))
        package = _QUANT_PACKAGES.get(method)
        if package is not None and importlib.util.find_spec(package.split(".")[0]) is None:
            return entry(UNSUPPORTED, f"weights pre-quantized with {method}, which needs the {package} package",
                         **facts)
    if all(w.suffix == ".bin" for w in weights):
        return entry(UNSUPPORTED, "only pickle .bin weights, which can run code when loaded (allowed only with "
                                  "--allow-pickle)", **facts)
    if not _has_chat_template(folder):
        return entry(UNSUPPORTED, "no chat template, so it cannot be used for chat", **facts)
    return entry(USABLE, None, **facts)


def _weight_files(folder: Path) -> tuple[list[Path], str | None]:
    """The folder's weight files and, when they are incomplete, why."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                return [], f"{index_name} cannot be read ({exc})"
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                return [], (f"{len(missing)} of {len(shards)} weight files are missing ({missing[0]}…): the download "
                            "is incomplete")
            return [folder / s for s in shards], None
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    broken_links = [p.name for p in folder.glob("*.safetensors") if not p.exists()]
    if broken_links:
        return [], f"{broken_links[0]} is missing from the cache (its file was deleted): the download is incomplete"
    if not files:
        return [], "a config.json but no weight files: the download is incomplete"
    return files, None


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))


def _folder_size(folder: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                if entry.is_file():  # follows the hub cache's symlinks to the blobs
                    total += entry.stat().st_size
    return total


# --- scanning each kind of location ----------------------------------------------------------------


def _walk(root: Path, depth: int = WALK_DEPTH) -> Iterator[tuple[str, Path]]:
    """("gguf", file) and ("folder", model folder) under `root`, at most `depth` folders deep."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    names = {e.name for e in entries}
    if "config.json" in names:
        yield "folder", root
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_file() and entry.name.lower().endswith(".gguf"):
                yield "gguf", Path(entry.path)
            elif entry.is_dir() and depth > 0 and "config.json" not in names:
                yield from _walk(Path(entry.path), depth - 1)
        except OSError:
            continue


def _scan_files(location: Location, cache: _Cache) -> Iterator[DiscoveredModel]:
    root = location.path
    if root.is_file() and root.name.lower().endswith(".gguf"):
        found: Iterable[tuple[str, Path]] = [("gguf", root)]
    else:
        found = _walk(root, 0 if location.source == "gpt4all" else WALK_DEPTH)
    for kind, path in found:
        if kind == "gguf":
            if _is_later_split_part(path):
                continue
            yield cache.gguf(path, location.source, str(root))
        else:
            name = str(path.relative_to(root)) if path != root and location.source == "lmstudio" else path.name
            yield cache.folder(path, location.source, str(root), name.replace(os.sep, "/"))


def _scan_ollama(location: Location, cache: _Cache) -> Iterator[DiscoveredModel]:
    """Each Ollama tag: its manifest resolved to the GGUF blob, named `model:tag` as `ollama list` shows it."""
    root = location.path
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
        parts = manifest.relative_to(manifests).parts
        if len(parts) < 4 or any(p.startswith(".") for p in parts):
            continue
        host, *namespace, model, tag = parts
        ns = "/".join(namespace)
        if host == OLLAMA_REGISTRY:
            name = f"{model}:{tag}" if ns == "library" else f"{ns}/{model}:{tag}"
        else:
            name = f"{host}/{ns}/{model}:{tag}"
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
            digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
        except StopIteration:
            yield _broken(name, manifest, "ollama", root, "its Ollama manifest has no model layer")
            continue
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
            yield _broken(name, manifest, "ollama", root, f"its Ollama manifest cannot be read ({exc})")
            continue
        blob = _ollama_blob(root, str(digest))
        if blob is None:
            expected = root / "blobs" / str(digest).replace(":", "-")
            yield _broken(name, expected, "ollama", root, f"the model blob {expected.name} is missing (removed, or "
                                                        f"the download is incomplete: `ollama pull {name}` again)")
            continue
        yield cache.gguf(blob, "ollama", str(root), name=name)


def _ollama_blob(root: Path, digest: str) -> Path | None:
    for candidate in (digest.replace(":", "-"), digest):  # sha256-<hex> today, sha256:<hex> in old versions
        path = root / "blobs" / candidate
        if path.is_file():
            return path
    return None


def _scan_hf_cache(location: Location, cache: _Cache) -> Iterator[DiscoveredModel]:
    """Each cached model repo: the snapshot `refs/main` names (else the newest), as a folder or its GGUF files."""
    root = location.path
    try:
        repos = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("models--"))
    except OSError:
        return
    for repo in repos:
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        snapshot = _hf_snapshot(repo)
        if snapshot is None:
            continue
        if (snapshot / "config.json").is_file():
            yield cache.folder(snapshot, "hf-cache", str(root), repo_id)
        for kind, path in _walk(snapshot, 2):
            if kind == "gguf" and not _is_later_split_part(path):
                yield cache.gguf(path, "hf-cache", str(root), name=f"{repo_id}/{_display_name(path)}")


def _hf_snapshot(repo: Path) -> Path | None:
    snapshots = repo / "snapshots"
    with contextlib.suppress(OSError):
        ref = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        if ref and (snapshots / ref).is_dir():
            return snapshots / ref
    try:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def _broken(name: str, path: Path, source: str, root: Path, reason: str) -> DiscoveredModel:
    return DiscoveredModel(name, str(path), "gguf", source, str(root), None, None, None, None, 0, BROKEN, reason)


# --- the cache of descriptions ---------------------------------------------------------------------


class _Cache:
    """Descriptions by (path, size, mtime) — and the installed transformers/gguf versions, which decide
    what is usable — kept in `discovery.json` in the cache folder."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.versions = _versions()
        self.entries: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()
        if file is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                data = json.loads(file.read_text(encoding="utf-8"))
                if data.get("format") == CACHE_FORMAT and isinstance(data.get("entries"), dict):
                    self.entries = data["entries"]

    def _key(self, kind: str, path: Path, stamp: str) -> str:
        return f"{kind}|{path}|{stamp}|{self.versions}"

    def _lookup(self, key: str) -> DiscoveredModel | None:
        data = self.entries.get(key)
        if data is None:
            return None
        try:
            model = DiscoveredModel._from_cache(data)
        except (TypeError, ValueError):
            return None
        self.used.add(key)
        return model

    def _store(self, key: str, model: DiscoveredModel) -> None:
        self.entries[key] = model._to_cache()
        self.used.add(key)

    def gguf(self, path: Path, source: str, found_in: str, name: str | None = None) -> DiscoveredModel:
        try:
            st = path.stat()
        except OSError:
            return describe_gguf(path, source, found_in, name)
        key = self._key("gguf", path.resolve(), f"{st.st_size}|{st.st_mtime_ns}")
        model = self._lookup(key)
        if model is None:
            model = describe_gguf(path, source, found_in)
            if model.status != BROKEN or model.size_bytes:  # a missing file is not worth remembering
                self._store(key, model)
        return replace(model, source=source, found_in=found_in, path=str(path),
                       name=name or _display_name(path))

    def folder(self, folder: Path, source: str, found_in: str, name: str) -> DiscoveredModel:
        stamp = []
        with contextlib.suppress(OSError):
            for entry in sorted(folder.iterdir()):
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    stamp.append(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}")
        key = self._key("folder", folder.resolve(), ";".join(stamp))
        model = self._lookup(key)
        if model is None:
            model = describe_folder(folder, source, found_in, name)
            self._store(key, model)
        return replace(model, source=source, found_in=found_in, path=str(folder), name=name)

    def save(self) -> None:
        """Write the descriptions used in this scan (entries of files gone or changed are dropped)."""
        if self.file is None:
            return
        kept = {k: v for k, v in self.entries.items() if k in self.used}
        with contextlib.suppress(OSError):
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": kept}), encoding="utf-8")
            os.replace(tmp, self.file)


def cache_file() -> Path:
    return paths.cache_dir() / "discovery.json"


def scan(locations: Iterable[Location], *, cache: Path | None = None) -> list[DiscoveredModel]:
    """Every model under `locations`, each once (the first location that has it names it).

    Usable models come first, then unsupported, then broken; by name within each.
    `cache`: the descriptions file (None: describe every file again).
    """
    store = _Cache(cache)
    seen: set[tuple[str, str]] = set()
    found: list[DiscoveredModel] = []
    for location in locations:
        if location.source == "ollama":
            models: Iterable[DiscoveredModel] = _scan_ollama(location, store)
        elif location.source == "hf-cache":
            models = _scan_hf_cache(location, store)
        else:
            models = _scan_files(location, store)
        for model in models:
            real = os.path.realpath(model.path)
            if (real, model.name) in seen or (model.source != "ollama" and any(r == real for r, _ in seen)):
                continue
            seen.add((real, model.name))
            found.append(model)
    store.save()
    order = {USABLE: 0, UNSUPPORTED: 1, BROKEN: 2}
    return sorted(found, key=lambda m: (order.get(m.status, 3), m.name.lower()))


def discover(extra_folders: Iterable[Path] = (), *, locations: list[Location] | None = None,
             use_cache: bool = True) -> list[DiscoveredModel]:
    """The models in the usual places (`default_locations()`) and in `extra_folders`."""
    places = list(default_locations() if locations is None else locations)
    places += [Location("folder", Path(folder).expanduser()) for folder in extra_folders]
    return scan(places, cache=cache_file() if use_cache else None)
