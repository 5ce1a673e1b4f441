"""The benchmark harness: `--quick` produces a well-formed record, the plots and the table.

Nothing here asserts a timing: only that every section measured what it says, with the shape
other tools (and the README) rely on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import caches
from engine.bench import record as bench_record
from engine.bench import runner, shapes, workload
from engine.bench.systems import CachetSystem, Reply
from engine.caches import CacheSpec
from engine.cli import build_parser
from engine.cli import main as cli_main
from engine.session import ChatSession, Message, SessionSettings

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.real_model
@pytest.mark.timeout(1800)  # ~1 min on a quiet 2-core machine, 7 min under load; a safety net, not a timing assertion
def test_quick_bench_writes_a_record_plots_and_a_table(real_lm, tmp_path: Path) -> None:
    options = runner.BenchOptions(quick=True, out=tmp_path / "out", peers=("transformers",), log=lambda _m: None)
    record, out = runner.run(options, lm=real_lm)

    assert out == tmp_path / "out"
    on_disk = json.loads((out / "bench.json").read_text())
    assert bench_record.validate(on_disk) == []
    assert on_disk["schema"] == bench_record.SCHEMA
    assert on_disk["model"]["identity"] == real_lm.identity
    assert on_disk["machine"]["cores_logical"] >= 1
    assert on_disk["packages"]["torch"] == torch.__version__

    usable = [s for s, why in caches.availability(real_lm.device).items() if why is None]
    assert "offloaded" in on_disk["unavailable"]  # no CUDA here: said, not silently skipped
    histories = on_disk["settings"]["history_tokens"]
    ttft = on_disk["results"]["ttft"]
    for strategy in usable:
        for mode in ("kept", "recompute"):
            rows = [r for r in ttft if r["system"] == "cachet" and r["strategy"] == strategy and r["mode"] == mode]
            assert sorted(r["history_tokens"] for r in rows) == sorted(histories), (strategy, mode)
    # The kept cache really is kept: every follow-up reuses at least the whole history.
    for row in ttft:
        if row["system"] == "cachet" and row["mode"] == "kept" and row["strategy"] in ("dynamic", "quantized",
                                                                                       "static"):
            assert row["reused_tokens"] >= row["history_tokens"], row
        if row["mode"] == "recompute" and row["system"] == "cachet":
            assert row["reused_tokens"] == 0, row
    assert any(r["system"] == "transformers" for r in ttft)

    memory = on_disk["results"]["memory"]
    assert {r["strategy"] for r in memory} == set(usable)
    for row in memory:
        if row["strategy"] in ("dynamic", "quantized", "sink", "sink-quantized", "static"):
            assert row["measured_bytes"] == row["estimated_bytes"], row  # the advisor's estimate is exact

    decode = on_disk["results"]["decode"]
    assert {(r["strategy"], r["phase"]) for r in decode if r["system"] == "cachet"} == {
        (s, p) for s in usable for p in ("start", "late")}
    assert all(r["tok_s"] is not None and r["tok_s"]["median"] > 0 for r in decode)

    rows = on_disk["results"]["fidelity"]
    fidelity = {r["strategy"]: r for r in rows if "ppl_reference" not in r}
    assert set(fidelity) == set(usable)
    precisions = {r["dtype"]: r for r in rows if "ppl_reference" in r}  # against fp32, all measured in the run
    assert set(precisions) == {"bfloat16", "bf16-weights"}
    for precision in precisions.values():
        assert precision["ppl_ratio"] > 0 and precision["agreement_tokens"] > 0
    assert fidelity["dynamic"]["ppl_ratio"] == pytest.approx(1.0)
    assert fidelity["dynamic"]["agreement"] == pytest.approx(1.0)  # the reference agrees with itself
    assert fidelity["static"]["agreement"] == pytest.approx(1.0)  # exact: the same greedy tokens
    for row in fidelity.values():
        assert 0.0 <= row["agreement"] <= 1.0 and row["agreement_tokens"] > 0

    chat = on_disk["results"]["chat"]
    assert {r["system"] for r in chat} == {"cachet", "transformers"}
    later_turns = [r for r in chat if r["system"] == "cachet" and r["turn"] > 1]
    assert later_turns and all(r["reused_tokens"] > 0 for r in later_turns)  # follow-ups reuse the chat's cache

    for section in ("ttft", "decode", "memory", "fidelity", "chat"):
        png = out / f"{section}.png"
        assert png.read_bytes()[:8] == PNG, section
    summary = (out / "summary.txt").read_text()
    assert "dynamic" in summary and "not measured: offloaded" in summary
    assert summary == runner.table(record) + "\n"


def test_bench_command_line_is_validated_before_anything_loads(capsys) -> None:
    assert cli_main(["bench", "--repeat", "0"]) == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "--quick", "--cache", "dynamic", "--cache", "sink", "--no-peers",
                                      "--only", "ttft", "--threads", "1"])
    options = runner.options_from_args(args, ["bench", "--quick"])
    assert options.caches == ("dynamic", "sink") and options.peers == () and options.only == ("ttft",)
    assert options.runs == 1 and options.threads == 1
    assert options.command == "python -m engine bench --quick"


def test_a_record_with_a_missing_field_or_a_bad_figure_is_reported() -> None:
    good = {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [1.0, 2.0, 3.0]}
    machine = {"cpu": "x", "cores_logical": 2, "ram_bytes": 1, "device": "cpu"}
    record = {"schema": bench_record.SCHEMA, "created": "", "command": "", "packages": {}, "model": {},
              "settings": {}, "summary": {}, "machine": machine,
              "results": {"ttft": [{"system": "cachet", "label": "x", "strategy": "dynamic", "mode": "kept",
                                    "history": 1, "history_tokens": 1, "ms": good}]}}
    assert bench_record.validate(record) == []
    record["results"]["ttft"][0]["ms"] = {"median": 5.0, "min": 1.0, "max": 3.0, "runs": [1.0]}
    del record["summary"]
    problems = bench_record.validate(record)
    assert "missing 'summary'" in problems and "ttft[0].ms is not a figure" in problems


def test_figures_keep_median_and_spread() -> None:
    fig = bench_record.Figure.of([3.0, 1.0, 2.0, float("nan")])
    assert (fig.median, fig.min, fig.max, fig.runs) == (2.0, 1.0, 3.0, (3.0, 1.0, 2.0))
    with pytest.raises(ValueError):
        bench_record.Figure.of([])


def test_a_reply_reads_speed_over_any_window() -> None:
    reply = Reply(ttft_ms=10.0, token_times=[0.0, 0.1, 0.2, 0.4, 0.8])
    assert reply.rate(0, 2) == pytest.approx(10.0)
    assert reply.rate(2, 2) == pytest.approx(2 / 0.6)
    assert reply.rate(3, 2) is None  # beyond the reply
    assert reply.decode_rate() == pytest.approx(4 / 0.8)


def test_histories_come_within_a_message_of_the_target(tiny_lm) -> None:
    tok = tiny_lm.tokenizer

    def render_len(msgs):
        return len(tok(tok.apply_chat_template(list(msgs), tokenize=False), add_special_tokens=False)["input_ids"])

    for target in (200, 700, 1500):
        h = workload.build_history(target, render_len, lambda t: tok(t, add_special_tokens=False)["input_ids"],
                                   lambda ids: tok.decode(ids))
        assert h.tokens == render_len(h.messages) <= target
        assert h.tokens >= target - 40  # the byte tokenizer: a user turn is ~40 tokens
        assert h.messages[-1]["role"] == "assistant"


def test_cachet_system_keeps_generated_ids_so_the_next_turn_reuses_the_cache(tiny_lm) -> None:
    system = CachetSystem(tiny_lm, CacheSpec())
    first = system.reply([{"role": "user", "content": "hello"}], 12, 12)
    second = system.reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text},
                           {"role": "user", "content": "more"}], 4)
    assert second.reused_tokens is not None and second.reused_tokens >= first.prompt_tokens + 12 - 1


def test_min_new_tokens_holds_back_end_of_turn_and_on_token_sees_every_token() -> None:
    from engine.sampling import SamplingSettings
    from tests.tiny import tiny_loaded_model

    lm = tiny_loaded_model(seed=3)
    greedy = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=6)
    first_token = int(ChatSession(lm, SessionSettings(sampling=greedy), [Message("user", "hi")])
                      .next_token_logits()[1].argmax())
    # Make the model's own first choice an end-of-turn token: without min_new_tokens it stops at once.
    lm.model.generation_config.eos_token_id = [first_token, lm.tokenizer.eos_token_id]
    plain = ChatSession(lm, SessionSettings(sampling=greedy), [Message("user", "hi")]).generate()
    assert plain.stats.generated_tokens == 1 and plain.stats.finish_reason == "stop"

    seen: list[int] = []
    held = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=6, min_new_tokens=4)
    result = ChatSession(lm, SessionSettings(sampling=held), [Message("user", "hi")]).generate(on_token=seen.append)
    assert result.stats.generated_tokens >= 4
    assert first_token not in seen[:4]
    assert len(seen) == result.stats.generated_tokens


def test_min_new_tokens_is_validated() -> None:
    from engine.sampling import SamplingError, SamplingSettings

    with pytest.raises(SamplingError, match="min new tokens"):
        SamplingSettings(max_new_tokens=4, min_new_tokens=5).validate()


@pytest.mark.real_model
def test_a_model_of_a_published_shape_chats_with_the_bundled_tokenizer(real_lm) -> None:
    lm = shapes.load_shape("shape:tiny", torch.device("cpu"), torch.float32)
    assert lm.tokenizer.vocab_size == real_lm.tokenizer.vocab_size
    from engine.sampling import SamplingSettings

    session = ChatSession(lm, SessionSettings(sampling=SamplingSettings(temperature=0.0, max_new_tokens=5,
                                                                        min_new_tokens=5)))
    result = session.send("Hello there")
    assert result.stats.generated_tokens == 5 and result.stats.finish_reason == "length"
    with pytest.raises(Exception, match="Unknown model shape"):
        shapes.load_shape("shape:nope", torch.device("cpu"), torch.float32)
