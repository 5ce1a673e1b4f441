"""The weights' precision and the GPU/CPU layer split as window settings: validated, edited in the
settings dialog, handed to engine.models.load, a change reloads the model, and the status bar says
what was loaded and why."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from app.config import AppConfig, ConfigError, load_config, save_config
from tests.tiny import tiny_loaded_model

LOAD_MS = 60_000
pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen


def test_weights_and_gpu_layers_are_validated_and_saved(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    assert (AppConfig().weights, AppConfig().gpu_layers) == ("auto", None)
    config = AppConfig(weights="int4", gpu_layers=12, dtype="bfloat16",
                       gguf_conversion={"/models/big.gguf": "every_start"}).validate()
    save_config(config, path)
    assert load_config(path) == config
    assert AppConfig(weights="bf16", dtype="bfloat16").validate().weights == "bf16"  # the same dtype: fine
    bad: list[tuple[dict[str, Any], str]] = [
        ({"weights": "int3"}, "weights: 'int3' is not one of auto, fp32, bf16, fp16, int8, int4"),
        ({"weights": "fp16", "dtype": "float32"}, "Weights fp16 are float16, so the precision cannot be float32"),
        ({"gpu_layers": -1}, "Layers on the GPU: must be automatic (null) or 0 or more"),
        ({"gpu_layers": True}, "Layers on the GPU"),
        ({"gpu_layers": 3, "device": "cpu"}, "layers go on a CUDA GPU only"),
        ({"gguf_conversion": {"/m.gguf": "sometimes"}}, "gguf_conversion"),
        ({"gguf_conversion": ["/m.gguf"]}, "gguf_conversion"),
    ]
    for changes, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            AppConfig(**changes).validate()
    assert AppConfig(gpu_layers=0, device="cpu").validate().gpu_layers == 0  # nothing on a GPU: fine anywhere
    path.write_text('{"weights": "int2", "gpu_layers": -4, "dtype": "float16"}')
    assert load_config(path) == AppConfig(dtype="float16")  # bad values fall back to their defaults


def test_the_dialog_edits_weights_and_layers_and_shows_the_split(
        qtbot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.settings_dialog as sd
    from app.protocol import ModelInfo

    monkeypatch.setattr(sd, "cuda_available", lambda: True)
    model = ModelInfo(name="tiny", device="cpu", dtype="int4 weights over bfloat16", context_length=2048,
                      weights_bytes=1, load_seconds=0.1, availability={}, backend_availability={},
                      auto_cache=None, auto_reason="", config=None, torch_dtype=None, weights="int4",
                      weights_note="int4 weights: 20 of 30 layers fit", gpu_layers=20, layers=30,
                      split="20 of 30 layers on cuda:0, 10 in RAM")
    dialog = sd.SettingsDialog(AppConfig(weights="int8", gpu_layers=7), model=model)
    qtbot.addWidget(dialog)
    assert dialog.weights.currentData() == "int8" and dialog.gpu_layers.value() == 7
    assert dialog.gpu_layers.maximum() == 30 and dialog.gpu_layers.isEnabled()
    assert dialog.weights_now.text() == ("Now: int4 weights over bfloat16 · 20 of 30 layers on cuda:0, 10 in RAM "
                                         "(int4 weights: 20 of 30 layers fit)")
    dialog.weights.setCurrentIndex(dialog.weights.findData("int4"))
    dialog.gpu_layers.setValue(-1)
    assert dialog.gpu_layers.text() == "auto"
    assert (dialog.result_config().weights, dialog.result_config().gpu_layers) == ("int4", None)
    dialog.gpu_layers.setValue(30)
    assert dialog.result_config().gpu_layers == 30
    dialog.weights.setCurrentIndex(dialog.weights.findData("fp16"))
    dialog.dtype.setCurrentText("float32")
    dialog.accept()  # a contradiction is said in the dialog, which stays open
    assert dialog.error.isVisibleTo(dialog) and "Weights fp16 are float16" in dialog.error.text()

    monkeypatch.setattr(sd, "cuda_available", lambda: False)
    no_gpu = sd.SettingsDialog(AppConfig(weights="bf16"))
    qtbot.addWidget(no_gpu)
    assert not no_gpu.gpu_layers.isEnabled() and no_gpu.gpu_layers.toolTip() == sd.NO_CUDA_TIP
    assert no_gpu.weights_now.text() == "" and no_gpu.result_config() == AppConfig(weights="bf16")
    elsewhere = sd.SettingsDialog(AppConfig(gpu_layers=12))  # from a machine with a GPU: cannot apply here
    qtbot.addWidget(elsewhere)
    elsewhere.device.setCurrentText("cpu")
    assert elsewhere.result_config().gpu_layers is None  # not an error the disabled spin could not fix


def test_the_loader_receives_the_weight_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.__main__ import default_loader
    from engine import models

    calls: list[dict[str, Any]] = []

    def fake_load(spec: str, **kwargs: Any) -> Any:
        calls.append({"spec": spec, **kwargs})
        return tiny_loaded_model()

    monkeypatch.setattr(models, "load", fake_load)
    config = AppConfig(model="/m/x.gguf", device="cuda", dtype="float16", weights="int4", gpu_layers=3)
    lm = default_loader(config)(lambda _msg: None)
    assert lm.tokenizer is not None
    assert {k: calls[0][k] for k in ("spec", "device", "dtype", "weights", "gpu_layers")} == {
        "spec": "/m/x.gguf", "device": "cuda", "dtype": "float16", "weights": "int4", "gpu_layers": 3}


def test_a_weight_change_reloads_and_the_status_bar_shows_the_split(
        qtbot: Any, monkeypatch: pytest.MonkeyPatch, make_window: Any) -> None:
    import app.__main__

    asked: list[tuple[str, int | None]] = []

    def split_model() -> Any:  # as models.load reports a split (the tiny model stays on the CPU)
        return replace(tiny_loaded_model(), weights="bf16", gpu_layers=1, layers=2,
                       weights_note="bf16 weights: 1 of 2 layers fit on the GPU", attention="cachet_sdpa",
                       attention_note="SDPA: flash-attn is not installed")

    def loader_for(config: AppConfig) -> Any:
        asked.append((config.weights, config.gpu_layers))
        return lambda progress=None: split_model()

    monkeypatch.setattr(app.__main__, "default_loader", loader_for)
    win = make_window()
    with qtbot.waitSignal(win.engine.model_ready, timeout=LOAD_MS):
        win.apply_config(win.config.with_changes(weights="bf16", dtype="auto", gpu_layers=1))
    assert asked == [("bf16", 1)]
    label = win.meters.model_label
    assert label.text().endswith(" · 1/2 layers on GPU")
    assert "weights: bf16 (bf16 weights: 1 of 2 layers fit on the GPU)" in label.toolTip()
    assert "layers: 1 of 2 layers on the GPU, 1 in RAM" in label.toolTip()
    assert "attention: SDPA: flash-attn is not installed" in label.toolTip()
    assert "Exact: a kept cache gives the same reply" in label.toolTip()  # the tiny model runs in float32
    win.apply_config(win.config.with_changes(theme="dark"))  # not a model setting: no reload
    assert asked == [("bf16", 1)]


def test_the_dialog_says_what_auto_chose_and_that_only_float32_is_exact(qtbot: Any) -> None:
    """On a CPU with native bf16, auto may choose bf16: the settings say so, and that a kept cache and a
    recompute (and float32) can then give other replies; in float32 they say the replies are exact."""
    import app.settings_dialog as sd
    from app.protocol import ModelInfo

    def info(dtype: str, note: str) -> ModelInfo:
        return ModelInfo(name="tiny", device="cpu", dtype=dtype, context_length=2048, weights_bytes=1,
                         load_seconds=0.1, availability={}, backend_availability={}, auto_cache=None, auto_reason="",
                         config=None, torch_dtype=None, precision_note=note, weights="fp32")

    bf16 = info("bfloat16", "bfloat16: measured fastest on this CPU (a typical turn 1.87× float32's speed; "
                            "decoding 2.10×, prefill 1.20×)")
    dialog = sd.SettingsDialog(AppConfig(), model=bf16)
    qtbot.addWidget(dialog)
    text = dialog.precision_now.text()
    assert text.startswith("Now: bfloat16, measured fastest on this CPU (a typical turn 1.87× float32's")
    assert "Not exact: replies can differ slightly from float32's, and a kept cache's from a recompute's" in text
    assert "Choose float32 where every reply must be reproducible exactly" in text
    assert not bf16.exact and not info("float32 + bf16 weights", "").exact

    fp32 = sd.SettingsDialog(AppConfig(dtype="float32"), model=info("float32", "chosen"))
    qtbot.addWidget(fp32)
    assert fp32.precision_now.text() == ("Now: float32. Exact: a kept cache gives the same reply, token for token, "
                                         "as recomputing the chat.")
    none = sd.SettingsDialog(AppConfig())
    qtbot.addWidget(none)
    assert none.precision_now.text() == "" and not none.precision_now.isVisibleTo(none)
