"""The app's global settings: one typed, validated dataclass stored as JSON in the data folder.

Per-chat settings (system prompt, sampling, cache) live with each chat in the store; the
`default_*` fields here are what a new chat starts with.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine import paths
from engine.specs import AUTO, CacheSpec, SamplingSettings

log = logging.getLogger(__name__)

CONFIG_NAME = "settings.json"
THEMES = ("system", "light", "dark")
SOURCES = ("local", "remote")  # the model runs here, or an OpenAI-compatible server answers
DEFAULT_SERVE_PORT = 8471
DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHTS = ("auto", "fp32", "bf16", "fp16", "int8", "int4")  # engine.models.WEIGHT_CHOICES, without importing torch
_WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CONVERSIONS = ("once", "every_start")  # a large GGUF: keep a converted copy on disk, or convert it at every start
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A setting has a value it cannot have; the message names it and says why."""


@dataclass(frozen=True)
class AppConfig:
    """Every global setting, with its default.

    model: "default" (the bundled SmolLM2-135M-Instruct), a .gguf file, a model folder or a Hub id.
    kv_budget_mb: how much GPU memory (RAM on a CPU-only machine) the KV caches of all chats may
        hold together; 0 = automatic (what the memory advisor finds free once the model is loaded).
        Beyond it the caches of the least recently used chats move to RAM, then to disk.
    ram_budget_mb: how much host RAM idle chats' caches may hold; None = automatic (a quarter of
        the RAM with a GPU; on a CPU-only machine, where the KV budget already is RAM, a small share).
    disk_budget_mb: how much disk the caches saved as snapshots may take (idle chats beyond the
        RAM budget, and every chat when Cachet quits, so it resumes after a restart); 0 = none.
    engine_source: "local" (the `model` runs here) or "remote" (an OpenAI-compatible server at
        `remote_url` answers with `remote_model`; its API key is kept by engine/api_keys.py, not here).
    serve / serve_port: serve the local model to other apps on 127.0.0.1:serve_port (engine/server.py).
    model_folders: folders the model picker searches besides LM Studio's, Ollama's, GPT4All's and the
        Hugging Face cache (engine/discovery.py), as absolute paths.
    model_hint_dismissed: the "models found on this computer" notice was closed; it is not shown again.
    weights: the weights' precision — auto (the memory advisor's plan), fp32, bf16, fp16, or int8/int4
        (optimum-quanto over the `dtype` base). fp32/bf16/fp16 are a dtype themselves: a different
        explicit `dtype` contradicts them.
    gpu_layers: decoder layers on the CUDA GPU, the others run from RAM (llama.cpp's n_gpu_layers);
        None: as the advisor plans (all of them when they fit).
    gguf_conversion: per GGUF path, the user's answer to converting a large GGUF: "once" (a copy kept on
        disk) or "every_start" (converted into a temporary folder at each start, no disk kept).
    """

    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    online: bool = False  # allow fetching a Hub model that is not in the local cache
    kv_budget_mb: int = 0
    ram_budget_mb: int | None = None
    disk_budget_mb: int = 4096
    theme: str = "system"
    default_system_prompt: str = ""
    default_sampling: dict[str, Any] = field(default_factory=dict)  # overrides of SamplingSettings' defaults
    default_cache: dict[str, Any] = field(default_factory=lambda: {"strategy": "auto"})
    engine_source: str = "local"
    remote_url: str = ""
    remote_model: str = ""
    serve: bool = False
    serve_port: int = DEFAULT_SERVE_PORT
    model_folders: list[str] = field(default_factory=list)
    model_hint_dismissed: bool = False
    weights: str = "auto"
    gpu_layers: int | None = None
    gguf_conversion: dict[str, str] = field(default_factory=dict)

    def validate(self) -> AppConfig:
        for name in ("model", "device", "dtype", "theme", "default_system_prompt", "engine_source", "remote_url",
                     "remote_model"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}: must be text, not {type(getattr(self, name)).__name__}.")
        if not isinstance(self.online, bool):
            raise ConfigError(f"online: must be true or false, not {self.online!r}.")
        if not self.model.strip():
            raise ConfigError("model: choose 'default', a GGUF file, a model folder or a Hub id.")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}.")
        if not _is_int(self.kv_budget_mb) or self.kv_budget_mb < 0:
            raise ConfigError("KV cache budget: must be 0 (automatic) or more megabytes.")
        if self.ram_budget_mb is not None and (not _is_int(self.ram_budget_mb) or self.ram_budget_mb < 0):
            raise ConfigError("RAM budget: must be automatic (null) or 0 or more megabytes.")
        if not _is_int(self.disk_budget_mb) or self.disk_budget_mb < 0:
            raise ConfigError("Disk budget: must be 0 (no snapshots) or more megabytes.")
        if self.engine_source not in SOURCES:
            raise ConfigError(f"engine_source: {self.engine_source!r} is not one of {', '.join(SOURCES)}.")
        if self.engine_source == "remote":
            from engine.remote import Endpoint, RemoteError

            try:
                Endpoint(self.remote_url).validate()
            except RemoteError as exc:
                raise ConfigError(f"Server address: {exc}") from exc
        if not isinstance(self.serve, bool):
            raise ConfigError(f"serve: must be true or false, not {self.serve!r}.")
        if not _is_int(self.serve_port) or not 1024 <= self.serve_port <= 65535:
            raise ConfigError("Server port: must be a number from 1024 to 65535.")
        if not isinstance(self.model_hint_dismissed, bool):
            raise ConfigError(f"model_hint_dismissed: must be true or false, not {self.model_hint_dismissed!r}.")
        _check_folders(self.model_folders)
        if self.weights not in WEIGHTS:
            raise ConfigError(f"weights: {self.weights!r} is not one of {', '.join(WEIGHTS)}.")
        if self.weights in _WEIGHT_DTYPES and self.dtype not in ("auto", _WEIGHT_DTYPES[self.weights]):
            raise ConfigError(f"Weights {self.weights} are {_WEIGHT_DTYPES[self.weights]}, so the precision cannot be "
                              f"{self.dtype}: choose auto, or int8/int4 weights over {self.dtype}.")
        if self.gpu_layers is not None and (not _is_int(self.gpu_layers) or self.gpu_layers < 0):
            raise ConfigError("Layers on the GPU: must be automatic (null) or 0 or more.")
        if self.gpu_layers is not None and self.gpu_layers > 0 and self.device not in ("auto",) \
                and not self.device.startswith("cuda"):
            raise ConfigError(f"Layers on the GPU: the device is {self.device}; layers go on a CUDA GPU only.")
        if not isinstance(self.gguf_conversion, dict) or not all(
                isinstance(k, str) and v in CONVERSIONS for k, v in self.gguf_conversion.items()):
            raise ConfigError(f"gguf_conversion: each GGUF path maps to one of {', '.join(CONVERSIONS)}.")
        if self.theme not in THEMES:
            raise ConfigError(f"theme: {self.theme!r} is not one of {', '.join(THEMES)}.")
        if not isinstance(self.default_sampling, dict) or not isinstance(self.default_cache, dict):
            raise ConfigError("default sampling and cache settings must be objects.")
        try:  # what every new chat starts with: the same typed checks as a chat's own settings
            SamplingSettings.from_dict(self.default_sampling).validate()
            CacheSpec.from_dict({"strategy": AUTO, **self.default_cache}).validate()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"default chat settings: {exc}") from exc
        return self

    def with_changes(self, **changes: Any) -> AppConfig:
        return replace(self, **changes).validate()

    def diff(self, other: AppConfig) -> set[str]:
        """Names of the settings whose values differ between `self` and `other`."""
        return {f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppConfig:
        """Known keys only; a value of the wrong kind falls back to its default (and is logged)."""
        config = cls()
        for f in fields(cls):
            if f.name not in data:
                continue
            try:
                config = replace(config, **{f.name: data[f.name]}).validate()
            except (ConfigError, TypeError, ValueError, AttributeError) as exc:
                log.warning("Ignoring setting %s: %s", f.name, exc)
        return config


def _check_folders(folders: Any) -> None:
    if not isinstance(folders, list):
        raise ConfigError("Model folders: must be a list of folders.")
    for folder in folders:
        if not isinstance(folder, str) or not folder.strip():
            raise ConfigError(f"Model folders: {folder!r} is not a folder path.")
        if not Path(folder).expanduser().is_absolute():
            raise ConfigError(f"Model folders: {folder!r} is not a full path (start it at / or a drive letter).")
    if len(set(folders)) != len(folders):
        raise ConfigError("Model folders: a folder is listed twice.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_path() -> Path:
    return paths.data_dir() / CONFIG_NAME


def load_config(path: Path | None = None) -> AppConfig:
    path = path or config_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return AppConfig()
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested 100k deep
        log.warning("Could not read %s (%s); using default settings.", path, exc)
        return AppConfig()
    return AppConfig.from_dict(data if isinstance(data, dict) else {})


def save_config(config: AppConfig, path: Path | None = None) -> None:
    """Write atomically: a temp file next to the target, then os.replace."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config.validate().to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
