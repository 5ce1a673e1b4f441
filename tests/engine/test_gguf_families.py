"""One tiny GGUF per architecture family, written with the `gguf` package's writer (tests/gguf_files.py)
and opened through Cachet's GGUF path (issue 15): models.load converts it, the chat reuses its cache, and
reusing gives the logits of recomputing; discovery describes the file as usable, with its architecture."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from engine import discovery, models
from engine.caches import CacheSpec
from engine.discovery import USABLE
from engine.models import ModelLoadError
from engine.sampling import SamplingSettings
from engine.session import ChatSession, Message, SessionSettings
from tests.gguf_files import FAMILIES, write_gguf

# family -> (the writer's arguments beyond the architecture, the model_type transformers gives it)
CASES: dict[str, tuple[dict[str, object], str]] = {
    "llama": ({"name": "Tiny Llama"}, "llama"),
    # llama.cpp writes Mistral as llama's architecture; transformers reads it as llama (the same network
    # without a sliding window, as Mistral 7B v0.2 onwards has none).
    "mistral": ({"name": "Mistral-7B-Instruct-v0.3"}, "llama"),
    "qwen2": ({"name": "Tiny Qwen2", "tied": True}, "qwen2"),
    "qwen3": ({"name": "Tiny Qwen3", "head_dim": 128}, "qwen3"),  # transformers reads no head_dim for qwen3: 128
    "phi3": ({"name": "Tiny Phi3"}, "phi3"),
    "gemma2": ({"name": "Tiny Gemma2", "tied": True, "head_dim": 16, "sliding_window": 128}, "gemma2"),
    # a window longer than the chat (a window that slid cannot be cut back to an edit: recomputed, and said so);
    # six layers: Gemma 3's pattern makes every sixth layer global, the others sliding
    "gemma3": ({"name": "Tiny Gemma3", "tied": True, "head_dim": 16, "sliding_window": 128, "layers": 6},
               "gemma3_text"),
}
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=4, repetition_penalty=1.0)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CACHET_CACHE_DIR", str(tmp_path / "cache"))  # no converted copy from an earlier run
    return tmp_path / "cache"


def session_for(lm: models.LoadedModel) -> ChatSession:
    return ChatSession(lm, SessionSettings(cache=CacheSpec("dynamic"), sampling=GREEDY, speculative="off"))


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_tiny_gguf_of_each_family_loads_chats_and_reuses_its_cache(
        family: str, tmp_path: Path, cache_dir: Path) -> None:
    kwargs, model_type = CASES[family]
    path = write_gguf(tmp_path / f"Tiny-{family}-F32.gguf", arch=FAMILIES[family], loadable=True, **kwargs)

    found = discovery.describe_gguf(path)
    assert (found.status, found.reason, found.architecture) == (USABLE, None, FAMILIES[family])

    lm = models.load(str(path), device="cpu", dtype="float32")
    assert lm.config.model_type == model_type
    assert lm.identity.startswith(f"gguf-sha256:{models.file_sha256(path)}")
    # Every parameter comes from the file: as many elements as the GGUF's tensors, and the embedding's values.
    reader = GGUFReader(str(path))
    assert sum(p.numel() for p in lm.model.parameters()) == sum(int(t.n_elements) for t in reader.tensors)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert np.array_equal(lm.model.get_input_embeddings().weight.detach().numpy(),
                          np.asarray(embedding.data).reshape(lm.model.get_input_embeddings().weight.shape))

    session = session_for(lm)
    first = session.send("t1 t10 0")
    assert first.stats.reused_tokens == 0 and first.stats.prompt_tokens > 0
    second = session.send("1 t t10")
    assert second.stats.reused_tokens > 0  # the second turn continues from the first turn's cache
    assert second.stats.prefilled_tokens == second.stats.prompt_tokens - second.stats.reused_tokens

    session.messages.append(Message("user", "t10 t1"))
    reused, logits = session.next_token_logits()
    assert reused > 0
    fresh = session_for(lm)
    fresh.messages = copy.deepcopy(session.messages)
    reused_fresh, logits_fresh = fresh.next_token_logits()
    assert reused_fresh == 0
    assert torch.allclose(logits, logits_fresh, atol=1e-4), family


def test_a_llama_gguf_named_exactly_mistral_is_read_as_transformers_reads_it(tmp_path: Path, cache_dir: Path) -> None:
    """transformers reads a llama GGUF whose general.name is exactly "mistral" as a Mistral model, and maps its
    tensors through the gguf package's architecture names; where those have no "mistral", it cannot load it,
    and discovery says so beforehand instead of offering a file that fails."""
    path = write_gguf(tmp_path / "mistral.gguf", arch="llama", name="mistral", loadable=True)
    found = discovery.describe_gguf(path)
    if discovery.gguf_knows_architecture("mistral"):
        assert found.status == USABLE
        assert models.load(str(path), device="cpu", dtype="float32").config.model_type == "mistral"
    else:
        assert found.status == discovery.UNSUPPORTED
        assert "named exactly \"mistral\"" in found.reason and "Unknown gguf model_type: mistral" in found.reason
        with pytest.raises(ModelLoadError, match="Unknown gguf model_type: mistral in gguf-py"):
            models.load(str(path), device="cpu", dtype="float32")
