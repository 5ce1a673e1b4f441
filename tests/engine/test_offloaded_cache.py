"""The offloaded cache: refused clearly where there is no GPU; its memory estimates."""

from __future__ import annotations

import pytest
import torch

from engine import caches
from engine.caches import CacheConfigError, CacheSpec
from engine.caches import offloaded as offloaded_cache
from engine.caches.base import cache_kwargs

OFFLOADED = CacheSpec(strategy="offloaded")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_the_offloaded_cache_is_refused_with_the_reason(tiny_lm) -> None:
    reason = caches.availability(torch.device("cpu"))["offloaded"]
    assert reason is not None
    with pytest.raises(CacheConfigError) as error:
        caches.build_cache(OFFLOADED, tiny_lm.config)
    assert str(error.value) == reason
    assert "CUDA GPU" in reason


def test_offloaded_holds_the_full_cache_in_ram_and_two_layers_on_the_gpu() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=8, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256)
    # by hand: K and V × 2 KV heads × 16 channels × 4 bytes = 256 bytes per token and layer
    assert caches.bytes_for(OFFLOADED, 1000, config) == 1000 * 8 * 256  # in RAM: every layer
    assert offloaded_cache.gpu_bytes_for(1000, config) == 1000 * 2 * 256  # on the GPU: the layer in use + the next


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_gives_the_dynamic_caches_logits_on_a_gpu(tiny_lm) -> None:
    model = tiny_lm.model.to("cuda")
    try:
        ids = torch.randint(0, 250, (1, 120), device="cuda")
        with torch.inference_mode():
            dynamic = model(input_ids=ids, **cache_kwargs(model, caches.build_cache(CacheSpec(), model.config))).logits
            cache = caches.build_cache(OFFLOADED, model.config, torch.device("cuda"))
            first = model(input_ids=ids[:, :100], **cache_kwargs(model, cache)).logits
            second = model(input_ids=ids[:, 100:], **cache_kwargs(model, cache),
                           position_ids=torch.arange(100, 120, device="cuda")[None]).logits
        torch.testing.assert_close(torch.cat([first, second], dim=1), dynamic, rtol=1e-4, atol=1e-4)
        keys = getattr(cache.layers[-1], "keys", None)  # layer 0 is prefetched back for the next pass
        assert keys is not None and keys.device.type == "cpu", "the history lives in RAM between forward passes"
    finally:
        tiny_lm.model.to("cpu")


def test_a_model_on_the_cpu_gets_no_offloading_cache_even_on_a_gpu_machine(tiny_lm, monkeypatch) -> None:
    """`--device cpu --cache offloaded` on a machine with a GPU: the model is on the CPU, so there
    is nothing to offload from; what the machine has does not matter."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(CacheConfigError, match="GPU"):
        caches.build_cache(OFFLOADED, tiny_lm.config, torch.device("cpu"))
    assert caches.availability(torch.device("cpu"))["offloaded"] is not None
