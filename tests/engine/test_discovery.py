"""Finding the models already on disk: fake LM Studio, Ollama, GPT4All and Hugging Face cache layouts in
tmp_path, with real GGUF headers (tests/gguf_files.py) and real safetensors files; damaged files are
listed as broken with the reason and never raise."""

from __future__ import annotations

import hashlib
import json
import os
import plistlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine import cli, discovery, memory
from engine.discovery import BROKEN, UNSUPPORTED, USABLE, Location
from engine.gguf_header import GGUFHeaderError, read_header
from tests.gguf_files import CHAT_TEMPLATE, write_gguf, write_mmproj, write_split_gguf

GIB = 1024**3


def tiny_params(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, ff: int = 128, vocab: int = 32,
                tied: bool = False) -> int:
    head_dim = hidden // heads
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    per_layer = attn + 3 * hidden * ff + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def write_hf_folder(folder: Path, *, model_type: str = "llama", template: bool = True,
                    shards: int = 1, drop_shard: bool = False, config_extra: dict | None = None) -> Path:
    """A Hugging Face model folder: config.json, safetensors weights (sharded with an index), tokenizer config."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": model_type, "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 32, "max_position_embeddings": 4096, "torch_dtype": "bfloat16", **(config_extra or {})}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {"model.embed_tokens.weight": np.zeros((32, 64), np.float16),
               "model.layers.0.mlp.up_proj.weight": np.zeros((128, 64), np.float16),
               "model.norm.weight": np.zeros((64,), np.float16)}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            weight_map.update(dict.fromkeys(part, shard))
            if not (drop_shard and i == shards - 1):
                save_file(part, str(folder / shard))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tokenizer = {"chat_template": CHAT_TEMPLATE} if template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


def write_ollama_model(root: Path, name: str, tag: str, gguf: Path | None, *, host: str = "registry.ollama.ai",
                       namespace: str = "library") -> str:
    """An Ollama manifest for `gguf` (moved into the blob store under its digest); returns the digest."""
    if gguf is not None:
        digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
        blobs = root / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        gguf.replace(blobs / digest.replace(":", "-"))
    else:
        digest = "sha256:" + "0" * 64
    manifest = root / "manifests" / host / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "1" * 64},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 1},
                   {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "2" * 64}],
    }))
    return digest


def by_name(models: list[discovery.DiscoveredModel]) -> dict[str, discovery.DiscoveredModel]:
    return {m.name: m for m in models}


# --- the GGUF header ------------------------------------------------------------------------------

def test_header_gives_metadata_and_tensor_shapes_without_reading_the_data(tmp_path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", layers=3, context=8192)
    header = read_header(path)
    assert header.architecture == "llama" and header.get("general.name") == "Tiny Llama"
    assert header.arch_value("context_length") == 8192 and header.arch_value("block_count") == 3
    assert header.get("tokenizer.chat_template") == CHAT_TEMPLATE
    q = next(t for t in header.tensors if t.name == "blk.0.attn_q.weight")
    assert q.dims == (64, 64) and q.type_name == "F32" and q.nbytes == 64 * 64 * 4
    down = next(t for t in header.tensors if t.name == "blk.2.ffn_down.weight")
    assert down.dims == (128, 64)  # GGUF order: in_features first
    assert header.expected_size == path.stat().st_size
    assert sum(t.n_elements for t in header.tensors) == tiny_params(layers=3)


def test_a_multi_gigabyte_file_is_listed_from_its_first_megabyte(tmp_path) -> None:
    """The tensor data of a 6 GiB (sparse) file is never read: the header reader stops where the data starts."""
    path = write_gguf(tmp_path / "big.gguf")
    data_offset = read_header(path).data_offset
    with path.open("r+b") as fh:
        fh.truncate(6 * GIB)
    header = read_header(path)
    assert header.file_size == 6 * GIB and header.data_offset == data_offset
    assert header.bytes_read <= data_offset + 2**20
    model = discovery.describe_gguf(path)
    assert model.status == USABLE and model.size_bytes == 6 * GIB


def test_a_header_only_gguf_is_described_as_the_real_model_of_its_shape(tmp_path) -> None:
    """The tests' writer with `quant` (what scripts/screenshots.py and bench_discovery.py use): a Qwen2.5-7B-shaped
    Q4_K_M header with a stand-in vocabulary reads as that model, its file as long as the real one."""
    path = write_gguf(tmp_path / "Qwen2.5-7B-Instruct-Q4_K_M.gguf", arch="qwen2", name="Qwen2.5 7B Instruct",
                      layers=28, hidden=3584, heads=28, kv_heads=4, ff=18944, vocab=152064, context=32768,
                      quant="Q4_K_M", tokens=[f"t{i}" for i in range(256)])
    header = read_header(path)
    assert header.expected_size == path.stat().st_size
    assert {t.type_name for t in header.tensors} == {"Q4_K", "F32"}  # matrices quantized, vectors (biases) not
    model = discovery.describe_gguf(path)
    assert (model.architecture, model.quantization, model.context_length, model.status) == \
        ("qwen2", "Q4_K_M", 32768, USABLE)
    assert model.params is not None and round(model.params / 1e9, 2) == 7.62  # as Qwen2.5 7B's model card says
    assert 3.9 * GIB < model.size_bytes < 4.1 * GIB
    if hasattr(os.stat_result, "st_blocks"):  # (not on Windows) the data is a hole: nearly no disk is used
        assert path.stat().st_blocks * 512 < 2**20


def test_a_long_vocabulary_is_skipped_by_length(tmp_path) -> None:
    path = write_gguf(tmp_path / "vocab.gguf", vocab=50_000)
    header = read_header(path)
    tokens = header.get("tokenizer.ggml.tokens")
    assert tokens.length == 50_000  # kept as its length, never decoded
    assert next(t for t in header.tensors if t.name == "token_embd.weight").dims == (64, 50_000)


@pytest.mark.parametrize("cut, reason", [
    (0.5, "ends inside its header"),  # half the header: in the metadata or tensor list
    (100, "truncated"),  # too short for the counts the header starts with
    (10, "truncated"),
])
def test_a_file_cut_inside_its_header_is_broken_with_the_reason(tmp_path, cut, reason) -> None:
    path = write_gguf(tmp_path / "cut.gguf")
    if isinstance(cut, float):
        cut = int(read_header(path).data_offset * cut)
    with path.open("r+b") as fh:
        fh.truncate(cut)
    with pytest.raises(GGUFHeaderError):
        read_header(path)
    model = discovery.describe_gguf(path)
    assert model.status == BROKEN and reason in model.reason and model.size_bytes == cut


def test_a_file_cut_in_its_tensor_data_is_broken_as_truncated(tmp_path) -> None:
    path = write_gguf(tmp_path / "partial.gguf")
    full = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(full - 1000)
    model = discovery.describe_gguf(path)
    assert model.status == BROKEN
    assert "truncated" in model.reason and f"{full - 1000:,}" in model.reason and f"{full:,}" in model.reason
    assert model.architecture == "llama" and model.params == tiny_params()  # what the header says is still shown


def test_files_that_are_not_gguf_are_broken_never_raised(tmp_path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(200))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "not a GGUF file" in discovery.describe_gguf(junk).reason
    assert discovery.describe_gguf(empty).status == BROKEN
    bad_version = tmp_path / "v9.gguf"
    bad_version.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(40))
    assert "version 9" in discovery.describe_gguf(bad_version).reason


# --- each application's layout ----------------------------------------------------------------------

def test_lm_studio_layout(tmp_path) -> None:
    home = tmp_path / "home"
    models = home / ".lmstudio" / "models"
    write_gguf(models / "lmstudio-community" / "Tiny-GGUF" / "Tiny-Q8_0.gguf", name="Tiny", tied=True)
    write_gguf(models / "bartowski" / "Other-GGUF" / "Other-F32.gguf", arch="llama", name="Other",
               chat_template=False)
    write_mmproj(models / "lmstudio-community" / "Tiny-GGUF" / "mmproj-Tiny-F16.gguf")
    write_hf_folder(models / "mlx-community" / "Tiny-4bit",
                    config_extra={"quantization": {"group_size": 64, "bits": 4}})
    locations = discovery.default_locations(platform="linux", home=home, env={})
    assert Location("lmstudio", models) in locations
    found = by_name(discovery.scan(locations))
    tiny = found["Tiny-Q8_0"]
    assert (tiny.status, tiny.source_label, tiny.architecture) == (USABLE, "LM Studio", "llama")
    assert tiny.params == tiny_params(tied=True) and tiny.context_length == 2048 and tiny.quantization == "F32"
    assert found["Other-F32"].status == UNSUPPORTED and "chat template" in found["Other-F32"].reason
    assert "vision projector" in found["mmproj-Tiny-F16"].reason
    mlx = found["mlx-community/Tiny-4bit"]
    assert mlx.status == UNSUPPORTED and "MLX" in mlx.reason and mlx.quantization == "mlx 4-bit"


def test_lm_studio_home_pointer_and_moved_models_folder(tmp_path) -> None:
    home, lm_home, moved = tmp_path / "home", tmp_path / "lms", tmp_path / "elsewhere"
    home.mkdir()
    (home / ".lmstudio-home-pointer").write_text(str(lm_home))
    lm_home.mkdir()
    (lm_home / "settings.json").write_text(json.dumps({"downloadsFolder": str(moved)}))
    paths = [loc.path for loc in discovery.default_locations(platform="darwin", home=home, env={})
             if loc.source == "lmstudio"]
    assert paths[:2] == [moved, lm_home / "models"]


def test_ollama_manifests_resolve_to_blobs_and_names(tmp_path) -> None:
    home = tmp_path / "home"
    root = home / ".ollama" / "models"
    write_ollama_model(root, "tiny", "latest", write_gguf(tmp_path / "a.gguf", name="Tiny"))
    write_ollama_model(root, "coder", "1b-q8", write_gguf(tmp_path / "b.gguf", layers=1),
                       namespace="someone")
    write_ollama_model(root, "bartowski/Tiny-GGUF", "Q4_K_M", write_gguf(tmp_path / "c.gguf", layers=3),
                       host="hf.co", namespace="")
    missing = write_ollama_model(root, "gone", "7b", None)
    (root / "manifests" / "registry.ollama.ai" / "library" / "garbled").mkdir(parents=True)
    (root / "manifests" / "registry.ollama.ai" / "library" / "garbled" / "latest").write_text("{not json")
    found = by_name(discovery.scan(discovery.default_locations(platform="win32", home=home, env={})))
    tiny = found["tiny:latest"]
    assert tiny.status == USABLE and tiny.source == "ollama"
    assert Path(tiny.path).parent == root / "blobs" and Path(tiny.path).name.startswith("sha256-")
    assert found["someone/coder:1b-q8"].params == tiny_params(layers=1)
    assert found["hf.co/bartowski/Tiny-GGUF:Q4_K_M"].params == tiny_params(layers=3)
    gone = found["gone:7b"]
    assert gone.status == BROKEN and missing.replace(":", "-") in gone.reason and "ollama pull gone:7b" in gone.reason
    assert found["garbled:latest"].status == BROKEN and "manifest" in found["garbled:latest"].reason


def test_ollama_models_env_moves_the_store(tmp_path) -> None:
    store = tmp_path / "store"
    write_ollama_model(store, "tiny", "latest", write_gguf(tmp_path / "a.gguf"))
    locations = discovery.default_locations(platform="linux", home=tmp_path / "home",
                                            env={"OLLAMA_MODELS": str(store)})
    assert locations[[loc.source for loc in locations].index("ollama")] == Location("ollama", store)
    assert "tiny:latest" in by_name(discovery.scan(locations))


@pytest.mark.parametrize("platform, folder", [
    ("linux", ".local/share/nomic.ai/GPT4All"),
    ("darwin", "Library/Application Support/nomic.ai/GPT4All"),
    ("win32", "AppData/Local/nomic.ai/GPT4All"),
])
def test_gpt4all_folder_on_each_os(tmp_path, platform, folder) -> None:
    home = tmp_path / "home"
    write_gguf(home / folder / "tiny-chat.Q4_0.gguf", name="tiny")
    write_gguf(home / folder / "nested" / "ignored.gguf")  # GPT4All keeps its models at the top level
    found = by_name(discovery.scan(discovery.default_locations(platform=platform, home=home, env={})))
    assert found["tiny-chat.Q4_0"].source_label == "GPT4All" and found["tiny-chat.Q4_0"].status == USABLE
    assert "ignored" not in found


def test_gpt4all_download_folder_from_its_settings(tmp_path) -> None:
    home, chosen = tmp_path / "home", tmp_path / "gpt4all-models"
    ini = home / ".config" / "nomic.ai" / "GPT4All.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text(f"[General]\nmodelPath={chosen}\n")
    assert Location("gpt4all", chosen) in discovery.default_locations(platform="linux", home=home, env={})
    plist = home / "Library" / "Preferences" / "com.nomic.gpt4all.plist"
    plist.parent.mkdir(parents=True)
    plist.write_bytes(plistlib.dumps({"modelPath": str(chosen)}))
    assert Location("gpt4all", chosen) in discovery.default_locations(platform="darwin", home=home, env={})


def test_hugging_face_cache_snapshots(tmp_path) -> None:
    hub = tmp_path / "hf" / "hub"
    good = hub / "models--org--tiny-chat"
    write_hf_folder(good / "snapshots" / "abc123")
    write_hf_folder(good / "snapshots" / "old999", template=False)
    (good / "refs").mkdir()
    (good / "refs" / "main").write_text("abc123")
    write_hf_folder(hub / "models--org--sharded" / "snapshots" / "r1", shards=2)
    write_hf_folder(hub / "models--org--half-downloaded" / "snapshots" / "r1", shards=2, drop_shard=True)
    write_hf_folder(hub / "models--openai--clip-vit" / "snapshots" / "r1", model_type="clip")
    write_gguf(hub / "models--someone--Tiny-GGUF" / "snapshots" / "r1" / "tiny-q8_0.gguf")
    (hub / "datasets--org--data" / "snapshots" / "r1").mkdir(parents=True)
    locations = discovery.default_locations(platform="linux", home=tmp_path / "home", env={"HF_HOME": str(hub.parent)})
    assert Location("hf-cache", hub) in locations
    found = by_name(discovery.scan(locations))
    tiny = found["org/tiny-chat"]
    assert tiny.status == USABLE and tiny.path.endswith("abc123")  # the snapshot refs/main names
    assert tiny.architecture == "llama" and tiny.context_length == 4096 and tiny.quantization == "F16"
    assert tiny.params == 32 * 64 + 128 * 64 + 64
    assert found["org/sharded"].status == USABLE and found["org/sharded"].params == tiny.params
    half = found["org/half-downloaded"]
    assert half.status == BROKEN and "1 of 2 weight files are missing" in half.reason
    assert found["openai/clip-vit"].status == UNSUPPORTED and "'clip'" in found["openai/clip-vit"].reason
    assert found["someone/Tiny-GGUF/tiny-q8_0"].format == "gguf"
    assert not any("data" in name for name in found)


def test_hf_cache_symlinks_to_deleted_blobs_are_broken(tmp_path) -> None:
    snapshot = write_hf_folder(tmp_path / "hub" / "models--org--m" / "snapshots" / "r")
    blob = tmp_path / "hub" / "models--org--m" / "blobs" / "deadbeef"
    blob.parent.mkdir(parents=True)
    (snapshot / "model.safetensors").replace(blob)
    os.symlink(blob, snapshot / "model.safetensors")
    ok = by_name(discovery.scan([Location("hf-cache", tmp_path / "hub")]))["org/m"]
    assert ok.status == USABLE and ok.size_bytes >= blob.stat().st_size
    blob.unlink()
    gone = by_name(discovery.scan([Location("hf-cache", tmp_path / "hub")]))["org/m"]
    assert gone.status == BROKEN and "missing" in gone.reason


def test_a_truncated_safetensors_file_is_broken(tmp_path) -> None:
    folder = write_hf_folder(tmp_path / "m")
    weights = folder / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.truncate(weights.stat().st_size - 100)
    model = discovery.describe_folder(folder)
    assert model.status == BROKEN and "truncated" in model.reason


def test_split_gguf_is_one_entry_and_a_missing_part_is_broken(tmp_path) -> None:
    parts = write_split_gguf(tmp_path / "models", "Big-Q4_K_M", 3)
    found = discovery.scan([Location("folder", tmp_path / "models")])
    assert [m.name for m in found] == ["Big-Q4_K_M"]
    assert found[0].status == UNSUPPORTED and "split into 3 files" in found[0].reason
    assert found[0].size_bytes == sum(p.stat().st_size for p in parts) and found[0].params == 3 * tiny_params()
    parts[1].unlink()
    again = discovery.scan([Location("folder", tmp_path / "models")])
    assert again[0].status == BROKEN and "part 2 of 3" in again[0].reason


def test_user_folders_and_duplicates(tmp_path, monkeypatch) -> None:
    shared = write_gguf(tmp_path / "lms" / "pub" / "repo" / "Tiny.gguf")
    write_hf_folder(tmp_path / "mine" / "a" / "b" / "my-model")
    monkeypatch.setattr(discovery, "default_locations", lambda: [Location("lmstudio", tmp_path / "lms")])
    found = discovery.discover([tmp_path / "mine", tmp_path / "lms", shared], use_cache=False)
    assert [(m.name, m.source) for m in found] == [("my-model", "folder"), ("Tiny", "lmstudio")]


def test_descriptions_are_cached_per_path_size_and_mtime(tmp_path, monkeypatch) -> None:
    path = write_gguf(tmp_path / "models" / "Tiny.gguf")
    cache = tmp_path / "discovery.json"
    locations = [Location("folder", tmp_path / "models")]
    first = discovery.scan(locations, cache=cache)

    def no_reading(_path):
        raise AssertionError("the cached description should have been used")

    monkeypatch.setattr(discovery, "read_header", no_reading)
    assert discovery.scan(locations, cache=cache) == first
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="cached description"):
        discovery.scan(locations, cache=cache)


def test_gguf_inventory_matches_the_model_transformers_builds_from_it(tmp_path) -> None:
    """The advisor's GGUF path (tensor names) and config path (a meta model) count the same bytes."""
    from transformers import AutoConfig

    for tied in (False, True):
        path = write_gguf(tmp_path / f"m{tied}.gguf", tied=tied, hidden=256, ff=384, heads=4, kv_heads=2)
        model = discovery.describe_gguf(path)
        config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
        from_gguf, from_config = model.weight_inventory(), memory.inventory_of(config)
        assert from_gguf is not None and from_gguf.params == from_config.params == model.params
        for precision in ("bf16", "fp32", "int8", "int4"):
            assert from_gguf.bytes(precision) == from_config.bytes(precision)
        kv = memory.KVShape.of(model.shape.as_config())
        assert kv == memory.KVShape.of(config)


def test_listing_does_not_import_torch(tmp_path) -> None:
    """The settings dialog can list models without the seconds torch takes to import."""
    write_gguf(tmp_path / "models" / "Tiny.gguf")
    write_hf_folder(tmp_path / "models" / "folder-model")
    code = ("import sys; from pathlib import Path; from engine import discovery; "
            f"found = discovery.scan([discovery.Location('folder', Path({str(tmp_path / 'models')!r}))]); "
            "assert [m.status for m in found] == ['usable', 'usable'], found; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_default_locations_follow_the_environment(tmp_path) -> None:
    home = tmp_path / "home"
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "LOCALAPPDATA": str(tmp_path / "local")}
    linux = discovery.default_locations(platform="linux", home=home, env=env)
    assert Location("hf-cache", tmp_path / "hub") in linux
    assert Location("gpt4all", tmp_path / "data" / "nomic.ai" / "GPT4All") in linux
    assert Location("ollama", Path("/usr/share/ollama/.ollama/models")) in linux
    windows = discovery.default_locations(platform="win32", home=home, env=env)
    assert Location("gpt4all", tmp_path / "local" / "nomic.ai" / "GPT4All") in windows
    assert Location("ollama", home / ".ollama" / "models") in windows
    plain = discovery.default_locations(platform="darwin", home=home, env={})
    assert Location("hf-cache", home / ".cache" / "huggingface" / "hub") in plain
    assert Location("lmstudio", home / ".lmstudio" / "models") in plain
    assert Location("lmstudio", home / ".cache" / "lm-studio" / "models") in plain


# --- the command ---------------------------------------------------------------------------------------

def test_models_command_lists_with_fits(tmp_path, monkeypatch, capsys) -> None:
    write_gguf(tmp_path / "lms" / "pub" / "repo" / "Tiny-F32.gguf")
    write_gguf(tmp_path / "lms" / "pub" / "repo" / "Cut.gguf")
    with (tmp_path / "lms" / "pub" / "repo" / "Cut.gguf").open("r+b") as fh:
        fh.truncate(300)
    write_hf_folder(tmp_path / "mine" / "my-model")
    monkeypatch.setattr(discovery, "default_locations", lambda: [Location("lmstudio", tmp_path / "lms")])
    assert cli.main(["models", "--add-folder", str(tmp_path / "mine"), "--vram-gib", "8", "--ram-gib", "16",
                     "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"Tiny-F32", "Cut", "my-model"}
    tiny = listed["Tiny-F32"]
    assert tiny["status"] == USABLE and "tensors" not in tiny
    assert {p: f["cell"] for p, f in tiny["fits"].items()} == {"bf16": "yes", "int8": "yes", "int4": "yes"}
    assert tiny["fits"]["int4"]["plan"]["precision"] == "int4" and tiny["fits"]["bf16"]["kv"] == "dynamic"
    assert listed["my-model"]["fits"]["bf16"]["cell"] == "yes"
    assert listed["Cut"]["status"] == BROKEN and listed["Cut"]["fits"] == {}

    assert cli.main(["models", "--add-folder", str(tmp_path / "mine"), "--vram-gib", "8", "--ram-gib", "16"]) == 0
    out = capsys.readouterr().out
    assert "3 models found" in out and "Tiny-F32" in out and "broken: not a readable GGUF file" in out
    assert str(tmp_path / "mine" / "my-model") in out
