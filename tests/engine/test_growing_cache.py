"""The full cache grows in place: no step copies the whole cache, and the logits stay transformers' own."""

from __future__ import annotations

import torch

from engine.caches import CacheSpec
from engine.caches.base import cache_kwargs
from engine.caches.dynamic import FullLayer, grown_capacity
from engine.session import ChatSession, SessionSettings


def test_the_full_cache_grows_in_place_and_reports_capacity_apart_from_content(tiny_lm) -> None:
    session = ChatSession(tiny_lm, SessionSettings(cache=CacheSpec()))
    session.forward_logits([t % 250 for t in range(300)])  # 300 tokens
    layer = session.cache.layers[0]
    assert isinstance(layer, FullLayer)
    buffer = layer._kbuf
    assert buffer is not None and buffer.shape[-2] == grown_capacity(300, 0) == 512
    for token in range(100):  # decoding steps write into the same buffer
        session.forward_logits([token])
    assert layer._kbuf is buffer and layer.keys.data_ptr() == buffer.data_ptr()
    assert session.cache.nbytes() < session.cache.reserved_nbytes()
    content = session.cache.nbytes()
    assert content == 400 * tiny_lm.config.num_hidden_layers * 2 * 2 * 16 * 4  # 400 tokens, 2 KV heads of 16, fp32
    session.forward_logits([t % 250 for t in range(200)])  # past the capacity: one move to a larger buffer
    assert layer._kbuf is not buffer and layer._kbuf.shape[-2] >= 600
    assert session.cache.crop_to(350) and layer.keys.shape[-2] == 350
    session.cache.to(torch.device("cpu"))  # the pool's move keeps the content only
    assert session.cache.reserved_nbytes() == session.cache.nbytes()


def test_a_grown_cache_gives_the_logits_of_transformers_own_cache(tiny_lm) -> None:
    from transformers import DynamicCache

    ids = torch.tensor([[t % 250 for t in range(300)]])
    with torch.inference_mode():
        reference = DynamicCache()
        tiny_lm.model(input_ids=ids, **cache_kwargs(tiny_lm.model, reference), use_cache=True)
        session = ChatSession(tiny_lm)
        session.forward_logits(ids[0].tolist())
        for token in range(300, 520):  # past the first capacity (512)
            expected = tiny_lm.model(input_ids=torch.tensor([[token % 200]]), **cache_kwargs(tiny_lm.model, reference),
                                     use_cache=True).logits[0, -1]
            torch.testing.assert_close(session.forward_logits([token % 200]), expected, rtol=1e-5, atol=1e-5)
