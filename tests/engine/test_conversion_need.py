"""Converting a GGUF: how much disk the copy takes, read from the header beforehand (engine/conversion.py),
and converting at every start into a temporary folder instead of keeping a copy (issue 15 §2)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from engine import conversion, models
from engine.gguf_header import GGUFHeaderError, read_header
from tests.gguf_files import write_gguf


def test_the_copy_size_is_known_beforehand_and_every_start_keeps_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHET_CACHE_DIR", str(tmp_path / "cache"))  # no copy from an earlier run
    monkeypatch.setattr(conversion, "temporary_dir", lambda: tmp_path / "temp")
    gguf = write_gguf(tmp_path / "Tiny-F32.gguf", loadable=True)
    need = conversion.conversion_need(gguf)
    assert need is not None
    elements = sum(math.prod(t.dims) for t in read_header(gguf).tensors)
    assert need.bytes == elements * 4 == conversion.converted_bytes(gguf)
    assert need.folder == models.converted_dir(models.file_sha256(gguf)) and need.free_bytes > 0

    said: list[str] = []
    lm = models.load(str(gguf), device="cpu", dtype="float32", weights=None, keep_converted=False,
                     progress=said.append)
    assert lm.identity.startswith(f"gguf-sha256:{models.file_sha256(gguf)}")  # the same identity as a kept copy's
    assert "Converting Tiny-F32.gguf (at every start, nothing kept on disk)…" in said
    assert not (tmp_path / "cache" / "models").exists()  # nothing written to the cache folder
    assert list((tmp_path / "temp").glob(f".*.{os.getpid()}.tmp")) == []  # the temporary copy is gone
    again = conversion.conversion_need(gguf)  # still no copy: the next start converts again
    assert again is not None and again[:2] == need[:2]

    kept = models.load(str(gguf), device="cpu", dtype="float32", weights=None)
    assert conversion.conversion_need(gguf) is None  # an intact copy exists now
    safetensors = need.folder / "model.safetensors"
    assert 0 <= safetensors.stat().st_size - need.bytes < 64 * 1024  # + the safetensors header
    for a, b in zip(lm.model.state_dict().values(), kept.model.state_dict().values(), strict=True):
        assert a.equal(b)

    (need.folder / "model.safetensors").write_bytes(b"damaged")
    assert conversion.conversion_need(gguf) is not None  # a damaged copy is converted again


def test_a_broken_file_says_why(tmp_path: Path) -> None:
    cut = write_gguf(tmp_path / "Cut.gguf")
    with cut.open("r+b") as fh:
        fh.truncate(200)
    with pytest.raises(GGUFHeaderError):
        conversion.conversion_need(cut)


@pytest.mark.real_model
def test_the_estimate_matches_the_bundled_models_converted_copy(real_lm: models.LoadedModel) -> None:
    source = models.resolve("default")
    copy = models.converted_dir(real_lm.identity.split(":")[1].split("|")[0]) / "model.safetensors"
    assert conversion.converted_bytes(Path(source.location)) == 538_060_032  # 134,515,008 parameters × 4
    assert copy.stat().st_size == 538_090_424  # the estimate + the safetensors header (30,392 bytes)
    assert conversion.conversion_need(Path(source.location)) is None
