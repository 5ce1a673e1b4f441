#!/usr/bin/env python3
"""Render the README's screenshots offscreen into docs/screenshots/*.png.

    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/screenshots.py [--tiny] [--out DIR]

Chats are written by the bundled model (greedy decoding, so the pictures are reproducible) in
a throwaway data folder; converted model weights are reused from the usual cache folder.
`--tiny` uses the tiny random test model instead (no real text; the code-block reply is then
injected through the store, and the captions say so). `--only NAME ...` renders only those
pictures (e.g. `--only settings-dialog model-picker`, which needs no chats).

The model picker is shown on a fake home folder written here: LM Studio, Ollama, GPT4All and
Hugging Face cache layouts whose files have real GGUF (and safetensors) headers with the tensor
shapes of well-known models, and sparse holes in place of the tensor data (so a "4.7 GiB" file
takes no disk); one is cut short and one Ollama blob is missing, as happens after an interrupted
download.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

CODE_QUESTION = "Write a Python function that checks whether a word is a palindrome."
INJECTED_REPLY = '''Here is a small function that ignores case:

```python
def is_palindrome(word: str) -> bool:
    """True when `word` reads the same backwards."""
    cleaned = word.lower()
    return cleaned == cleaned[::-1]
```

For example, `is_palindrome("Level")` returns `True`.'''
CHAT_SHOTS = ("main-light", "main-dark", "chat-settings", "streaming")
SHOTS = (*CHAT_SHOTS, "settings-dialog", "model-picker")
STAND_IN_VOCAB = [f"t{i}" for i in range(256)]  # the fake GGUF files' vocabulary; their tensors have the real size


def write_safetensors_folder(folder: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, ff: int,
                             vocab: int, context: int) -> Path:
    """A Hugging Face model folder (config, tokenizer config with a chat template, bf16 safetensors header
    with the real shapes, a sparse hole for the data)."""
    import json
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": context,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": [heads * head_dim, hidden],
                   p + "self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
                   p + "self_attn.v_proj.weight": [kv_heads * head_dim, hidden],
                   p + "self_attn.o_proj.weight": [hidden, heads * head_dim],
                   p + "mlp.gate_proj.weight": [ff, hidden], p + "mlp.up_proj.weight": [ff, hidden],
                   p + "mlp.down_proj.weight": [hidden, ff], p + "input_layernorm.weight": [hidden],
                   p + "post_attention_layernorm.weight": [hidden]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    weights = folder / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with weights.open("r+b") as fh:
        fh.truncate(8 + len(raw) + offset)
    return folder


def write_demo_disk(root: Path) -> Path:
    """A home folder where LM Studio, Ollama, GPT4All and the Hugging Face hub downloaded models."""
    import hashlib
    import json

    from tests.gguf_files import write_gguf

    home = root / "home"
    llama8b = dict(layers=32, hidden=4096, heads=32, kv_heads=8, ff=14336, vocab=128256)
    lms = home / ".lmstudio" / "models"
    write_gguf(lms / "lmstudio-community" / "Qwen2.5-7B-Instruct-GGUF" / "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
               arch="qwen2", name="Qwen2.5 7B Instruct", layers=28, hidden=3584, heads=28, kv_heads=4, ff=18944,
               vocab=152064, context=32768, quant="Q4_K_M", tokens=STAND_IN_VOCAB)
    write_gguf(lms / "bartowski" / "Llama-3.2-3B-Instruct-GGUF" / "Llama-3.2-3B-Instruct-Q8_0.gguf",
               name="Llama 3.2 3B Instruct", layers=28, hidden=3072, heads=24, kv_heads=8, ff=8192, vocab=128256,
               context=131072, quant="Q8_0", tied=True, tokens=STAND_IN_VOCAB)
    mistral = lms / "bartowski" / "Mistral-7B-Instruct-v0.3-GGUF" / "Mistral-7B-Instruct-v0.3-Q4_K_M.gguf"
    cut = write_gguf(mistral, name="Mistral 7B Instruct v0.3", layers=32, hidden=4096, heads=32, kv_heads=8,
                     ff=14336, vocab=32768, context=32768, quant="Q4_K_M", tokens=STAND_IN_VOCAB)
    with cut.open("r+b") as fh:  # an interrupted download
        fh.truncate(cut.stat().st_size * 2 // 5)
    ollama = home / ".ollama" / "models"
    blob = write_gguf(root / "blob.gguf", name="Meta Llama 3.1 8B Instruct", context=131072, quant="Q4_K_M",
                      tokens=STAND_IN_VOCAB, **llama8b)
    for name, tag, path in (("llama3.1", "8b", blob), ("mistral-nemo", "12b", None)):
        if path is not None:
            with path.open("rb") as fh:  # (a stand-in digest: Ollama's is of the whole file)
                digest = "sha256:" + hashlib.sha256(fh.read(1 << 20)).hexdigest()
            (ollama / "blobs").mkdir(parents=True, exist_ok=True)
            path.replace(ollama / "blobs" / digest.replace(":", "-"))
        else:
            digest = "sha256:" + "7" * 64
        manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / name / tag
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 1}]}))
    write_gguf(home / ".local" / "share" / "nomic.ai" / "GPT4All" / "Meta-Llama-3-8B-Instruct.Q4_0.gguf",
               name="Meta Llama 3 8B Instruct", context=8192, quant="Q4_0", tokens=STAND_IN_VOCAB, **llama8b)
    write_safetensors_folder(home / ".cache" / "huggingface" / "hub" / "models--HuggingFaceTB--SmolLM2-360M-Instruct"
                             / "snapshots" / "a1b2c3", layers=32, hidden=960, heads=15, kv_heads=5, ff=2560,
                             vocab=49152, context=8192)
    # a folder of the user's own, added in the picker (ADDED_FOLDER)
    write_gguf(home / ADDED_FOLDER / "gemma-2-2b-it-Q8_0.gguf", arch="gemma2", name="Gemma 2 2B IT", layers=26,
               hidden=2304, heads=8, kv_heads=4, ff=9216, vocab=256000, context=8192, quant="Q8_0", tied=True,
               head_dim=256, sliding_window=4096, tokens=STAND_IN_VOCAB)
    return home


ADDED_FOLDER = "Models"  # under the demo home: listed above the picker's table with its Remove link


def use_throwaway_folders(data: Path, name: str) -> None:
    """A throwaway data folder `data/name` chosen as a user would (so the settings show it as changeable),
    with the choice itself kept in a throwaway config folder, never the user's."""
    os.environ.pop("CACHET_DATA_DIR", None)
    os.environ["CACHET_CONFIG_DIR"] = str(data / "config")
    from engine import paths

    paths.set_data_dir(data / name)


def wait(done: Callable[[], bool], timeout: float = 300.0) -> None:
    """Run the event loop (sleeping between events, as the app does) until `done()`."""
    from PySide6.QtCore import QEventLoop, QTimer

    end = time.monotonic() + timeout
    loop = QEventLoop()
    timer = QTimer()
    timer.timeout.connect(lambda: loop.quit() if done() or time.monotonic() > end else None)
    timer.start(50)
    if not done():
        loop.exec()
    timer.stop()
    if not done():
        raise TimeoutError("the window did not get there in time")


def settle() -> None:
    """A few rounds of layout: word-wrapped labels settle their height after their width."""
    deadline = time.monotonic() + 0.4
    wait(lambda: time.monotonic() > deadline)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use the tiny random test model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--only", nargs="+", choices=SHOTS, default=list(SHOTS), metavar="NAME",
                        help=f"render only these ({', '.join(SHOTS)})")
    args = parser.parse_args()
    wanted = set(args.only)
    data = Path(tempfile.mkdtemp(prefix="cachet-shots-"))
    use_throwaway_folders(data, "data")

    from PySide6.QtWidgets import QApplication

    from app.config import AppConfig
    from app.main_window import MainWindow
    from app.settings_dialog import SettingsDialog
    from engine.store import ChatStore

    app = QApplication([])
    app.setStyle("Fusion")
    store = ChatStore()
    if args.tiny:
        from tests.tiny import tiny_loaded_model

        loader: Callable[..., object] = tiny_loaded_model
    else:
        from app.__main__ import default_loader

        loader = default_loader(AppConfig(device="cpu"))
    sampling: dict[str, object] = {"temperature": 0.0, "max_new_tokens": 160, "repetition_penalty": 1.0}
    # (the first-run hint is off: the chat pictures show the window as it is used every day)
    win = MainWindow(store, AppConfig(theme="light", default_sampling=sampling, model_hint_dismissed=True), loader,
                     save_settings=False)
    win.resize(1280, 800)
    win.show()

    def idle(chat_id: int) -> bool:
        return not win.controller.runtime(chat_id).busy

    def shot(name: str, widget: object = None) -> None:
        settle()
        target = widget or win
        path = args.out / f"{name}.png"
        target.grab().save(str(path))  # type: ignore[attr-defined]
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

    args.out.mkdir(parents=True, exist_ok=True)
    # The picker and the window's first-run hint look in a fake home folder, never the user's.
    from engine import discovery

    real_locations = discovery.default_locations
    fake_home = write_demo_disk(data / "disk")
    discovery.default_locations = lambda *a, **k: real_locations(platform="linux", home=fake_home, env={})
    discovery.cache_file = lambda: data / "discovery.json"
    if wanted & set(CHAT_SHOTS):
        win.start_engine()
        wait(lambda: win.engine.ready or win.engine.load_error is not None)
        if win.engine.load_error:
            print(f"error: {win.engine.load_error}", file=sys.stderr)
            return 1
        take_chat_shots(win, store, sampling, wanted, wait, idle, shot)

    if "settings-dialog" in wanted:
        dialog = SettingsDialog(win.config, win)
        dialog.show()
        shot("settings-dialog", dialog)
        dialog.close()

    if "model-picker" in wanted:
        from app.model_picker import ModelPicker

        picker = ModelPicker(win.config.with_changes(model_folders=[str(fake_home / ADDED_FOLDER)]), win)
        picker.show()
        wait(lambda: not picker.scanning)
        picker.select_name("Qwen2.5-7B-Instruct-Q4_K_M")
        shot("model-picker", picker)
        picker.close()

    win.close()
    store.close()
    return 0


def take_chat_shots(win: Any, store: Any, sampling: dict[str, object], wanted: set[str],
                    wait: Callable[..., None], idle: Callable[[int], bool], shot: Callable[..., None]) -> None:
    """The main window with a few chats, in both themes, its settings dock, and a reply streaming."""
    from PySide6.QtCore import Qt

    from engine.specs import CacheSpec, SamplingSettings
    from engine.store import ChatSettings

    # A few chats for the sidebar, the last one with a lossy strategy.
    for question in ("What is the capital of France?", "Give me three tips for a good night's sleep."):
        chat = win.new_chat()
        win.send(question)
        wait(lambda c=chat: idle(c))
    sink_chat = win.new_chat()
    store.set_settings(sink_chat, ChatSettings(sampling=SamplingSettings.from_dict(sampling),
                                               cache=CacheSpec("sink", window=512)))
    win.send("Let's keep a very long conversation going.")
    wait(lambda: idle(sink_chat))

    code_chat = win.new_chat()
    win.send(CODE_QUESTION)
    wait(lambda: idle(code_chat))
    reply = store.messages(code_chat)[-1]
    injected = "```" not in reply.content
    if injected:  # the model wrote no code block: show one written by hand, and say so
        store.update_message(reply.id, content=INJECTED_REPLY)
        win.current_chat = None
        win.select_chat(code_chat)
    print(f"code block reply: {'injected through the store' if injected else 'written by the model'}")

    if "main-light" in wanted:
        shot("main-light")
    if "main-dark" in wanted:
        win.set_theme("dark")
        shot("main-dark")
        win.set_theme("light")

    win.dock.show()
    win.resizeDocks([win.dock], [400], Qt.Orientation.Horizontal)
    win.settings_panel.verticalScrollBar().setValue(0)
    if "chat-settings" in wanted:
        shot("chat-settings")
    win.dock.hide()

    # A reply caught while it streams (the Stop button is up).
    win.send("Now make it ignore spaces too.")
    wait(lambda: len(win.controller.runtime(code_chat).text) > 120 or idle(code_chat))
    if "streaming" in wanted:
        shot("streaming")
    win.stop()
    wait(lambda: idle(code_chat))


if __name__ == "__main__":
    sys.exit(main())
