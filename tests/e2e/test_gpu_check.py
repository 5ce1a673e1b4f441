"""scripts/gpu_check.py, the one command for a CUDA machine (issue 23 §10), as far as it can be checked without
one: on a CPU it records every CUDA step as skipped with the command it would run, and runs nothing long; the
wheels it installs there are chosen from what that machine has; no CUDA-only test is left out of it; the
shapes get the bundled model's tokenizer from the carried folder where the model cannot travel."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_STEPS = ("install", "cuda-tests", "1b-graphs-on", "1b-graphs-off", "split", "8b-graphs-on", "8b-graphs-off",
              "1b-caches", "flash")


def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # its dataclasses look their module up there
    spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def test_without_cuda_every_cuda_step_is_recorded_as_skipped_with_its_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out), "--work", str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=280,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, even on a machine with one
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((out / "gpu-check.json").read_text(encoding="utf-8"))
    assert record["schema"] == "cachet-gpu-check/1" and record["budget_s"] == 480
    assert record["machine"]["cuda_available"] is False and record["machine"]["torch"]
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == ["machine", "install", "environment", *CUDA_STEPS[1:]]
    assert steps["machine"]["status"] == steps["environment"]["status"] == "passed"
    assert steps["environment"]["figures"]["import_problems"] == {}
    for name in CUDA_STEPS:
        assert steps[name]["status"] == "skipped: no CUDA", name
        assert steps[name]["seconds"] == 0 and steps[name]["command"], name
    commands = {name: steps[name]["command"] for name in CUDA_STEPS}
    for shape in ("1b", "8b"):
        model = "shape:llama-3.2-1b" if shape == "1b" else "shape:llama-3.1-8b"
        for graphs in ("on", "off"):
            command = commands[f"{shape}-graphs-{graphs}"]
            assert f"--model {model} --dtype bfloat16" in command and f"--graphs {graphs}" in command
    assert "--cache dynamic --cache quantized --cache offloaded" in commands["1b-caches"]
    assert "--gpu-layers 8" in commands["split"] and "-k 'cuda or offloaded'" in commands["cuda-tests"]
    install = steps["install"]["figures"]
    assert "would_install" in install or "--prepare-wheels" in install["problem"]
    assert record["seconds"] < 120  # nothing long ran (a generous bound: the machine may be busy)
    table = (out / "gpu-check.md").read_text(encoding="utf-8")
    assert "| 8b-graphs-off | skipped: no CUDA |" in table and "no CUDA GPU" in table.splitlines()[0]
    assert (out / "gpu-check.log").is_file()


def manifest(*wheels: tuple[str, str, list[str], bool, list[str]]) -> dict[str, object]:
    return {"wheels": [{"name": n, "version": v, "file": f"{n}-{v}-py3-none-any.whl", "specifiers": s, "pinned": p,
                        "required_by": r} for n, v, s, p, r in wheels]}


def test_the_device_installs_only_the_wheels_it_needs_and_what_those_need() -> None:
    g = gpu_check()
    carried = manifest(
        ("transformers", "5.25.0", ["==5.25.0"], True, ["pyproject.toml"]),  # pinned: another version there
        ("huggingface-hub", "2.5.0", [">=2.4.0,<3.0"], False, ["transformers"]),  # too old there for it
        ("gguf", "0.19.0", ["==0.19.0"], True, ["pyproject.toml"]),  # missing there
        ("psutil", "7.2.2", [">=5.9"], False, ["pyproject.toml"]),  # there, new enough: left alone
        ("pydantic", "2.14.4", [">=2.5.3"], False, ["typer"]),  # only for a package not installed: left alone
        ("typer", "0.29.3", [], False, ["transformers"]),  # there: left alone
        ("kernels", "0.19.1", ["<0.20,>=0.19.1"], False, ["transformers"]),  # missing, needed by what is installed
    )
    there = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "psutil": "7.0.0", "typer": "0.20.0"}
    chosen = g.wheels_to_install(carried, there.get)
    assert chosen == [
        ("transformers-5.25.0-py3-none-any.whl", "5.17.0 here; the tests run 5.25.0"),
        ("huggingface-hub-2.5.0-py3-none-any.whl", "1.33.0 here does not satisfy >=2.4.0,<3.0"),
        ("gguf-0.19.0-py3-none-any.whl", "missing here"),
        ("kernels-0.19.1-py3-none-any.whl", "missing here"),
    ]
    assert g.wheels_to_install(carried, {**there, "transformers": "5.25.0", "gguf": "0.19.0"}.get) == []


def test_every_file_with_a_cuda_only_test_is_in_the_check_and_its_tests_are_selected() -> None:
    g = gpu_check()
    cuda_only = re.compile(r"not\s+torch\.cuda\.is_available\(\)")
    with_cuda_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                             if cuda_only.search(p.read_text(encoding="utf-8")))
    assert with_cuda_tests and set(with_cuda_tests) <= set(g.CUDA_TEST_FILES)
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *g.CUDA_TEST_FILES, "-k", g.CUDA_TEST_SELECTION], cwd=ROOT, capture_output=True,
                               text=True, timeout=280)
    ids = {line.split("[")[0] for line in collected.stdout.splitlines() if "::" in line}
    for path in with_cuda_tests:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
            decorated = " ".join(ast.unparse(d) for d in fn.decorator_list)
            if ("cuda" in decorated and "not" in decorated) or decorated == "cuda":
                assert f"{path}::{fn.name}" in ids, fn.name
    assert any("offloaded" in line for line in collected.stdout.splitlines() if "test_architectures" in line)


def test_a_bench_step_with_graphs_fails_when_the_dynamic_steps_were_not_captured(tmp_path: Path) -> None:
    g = gpu_check()
    row = {"system": "cachet", "strategy": "dynamic", "history": 256, "history_tokens": 255, "phase": "start",
           "tok_s": {"median": 200.0, "min": 200.0, "max": 200.0, "runs": [200.0]}, "graphs": "captured"}
    record = {"command": "python -m engine bench", "seconds": 9.0, "unavailable": {},
              "model": {"name": "llama-3.2-1b shape", "dtype": "bfloat16", "weights_bytes": 2},
              "bandwidth": {"copy_gb_s": {"median": 3000.0}, "decode_limit_tok_s": 1000.0},
              "settings": {"graphs": "on"}, "results": {"decode": [row]},
              "summary": {"strategies": {"dynamic": {"decode_short_start": 200.0, "decode_share_of_limit": 0.2}}}}
    step = g.Step("1b-graphs-on", "t", 10, ("x",), bench_out=tmp_path, target=0.5, expect_capture=True)
    (tmp_path / "bench.json").write_text(json.dumps(record))
    status, figures = g.judge_bench(step, 0)
    assert status == "passed" and figures["target"] == {"share_of_limit": 0.2, "wanted": 0.5, "met": False}
    row["graphs"] = "eager: the capture failed"
    (tmp_path / "bench.json").write_text(json.dumps(record))
    status, figures = g.judge_bench(step, 0)
    assert status == "failed" and "not captured: eager: the capture failed" in figures["problems"][0]
    assert g.judge_bench(step, 1)[0] == "failed"


@pytest.mark.real_model
def test_shapes_read_the_same_tokenizer_from_the_carried_folder(real_lm, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import torch

    from engine import models
    from engine.bench import shapes, workload

    g = gpu_check()
    real_lm.tokenizer.save_pretrained(tmp_path / "tokenizer")  # what --prepare-wheels carries
    monkeypatch.setattr(shapes, "models", shapes.models)  # undone after the test
    g.use_tokenizer_folder(tmp_path / "tokenizer")
    # as on the device machine: the bundled model cannot be loaded there
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the bundled model was loaded"))
    carried = shapes.load_shape("shape:tiny", torch.device("cpu"), torch.float32).tokenizer
    text = workload.long_text()[:20_000]
    assert carried(text)["input_ids"] == real_lm.tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    assert carried.apply_chat_template(chat, tokenize=False) == real_lm.tokenizer.apply_chat_template(chat,
                                                                                                     tokenize=False)
    assert (carried.bos_token_id, carried.eos_token_id) == (real_lm.tokenizer.bos_token_id,
                                                            real_lm.tokenizer.eos_token_id)
