"""A GGUF file's header — its metadata and tensor list — read without touching the tensor data.

`gguf.GGUFReader` is not used for listing: it memory-maps the whole file and builds a numpy
view for every vocabulary string (hundreds of thousands in a Llama-3 or Qwen tokenizer) and
every tensor, which takes seconds per file and raises on a truncated one halfway through. This
reader streams the header with buffered reads, keeps the scalar metadata, records long arrays
(the tokenizer's) by their length only, reads the tensor infos, and stops where the tensor
data begins: a multi-GB model lists in a few milliseconds plus the time to skip its vocabulary.
The format (v2 and v3, either byte order) is the one documented in ggml's `docs/gguf.md`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # ggml uses 4; anything past this is corruption
KEEP_ARRAY_ITEMS = 1024  # longer arrays (vocabularies, merges, scores) are kept as their length only
_CHUNK = 1 << 20

# GGUF metadata value types (ggml docs/gguf.md)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS = {_UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i", _FLOAT32: "f",
            _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d"}


class GGUFHeaderError(ValueError):
    """The file is not a readable GGUF file; the message says why, in words for the user."""


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too long to keep (a tokenizer's vocabulary): its item type and length."""

    item_type: int
    length: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: the fastest-varying dimension (a Linear's in_features) first
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def type_name(self) -> str:
        from gguf.constants import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"

    @property
    def nbytes(self) -> int | None:
        """Bytes of the tensor's data, or None for a type this gguf package does not know."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        except (ValueError, KeyError):
            return None
        return self.n_elements * size // block


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself before its tensor data."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]
    data_offset: int  # where the tensor data starts (aligned)
    file_size: int
    bytes_read: int = 0  # what reading the header read from the file (it stops near `data_offset`)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_value(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}`, e.g. `arch_value("context_length")`."""
        arch = self.architecture
        return self.metadata.get(f"{arch}.{key}", default) if arch else default

    @property
    def expected_size(self) -> int | None:
        """The file size its tensor list needs (None when a tensor type is unknown)."""
        end = self.data_offset
        for t in self.tensors:
            n = t.nbytes
            if n is None:
                return None
            end = max(end, self.data_offset + t.offset + n)
        return end


class _Cursor:
    """Sequential little/big-endian reads over a file through one growing-and-sliding buffer."""

    def __init__(self, fh: IO[bytes], size: int) -> None:
        self.fh = fh
        self.size = size
        self.buf = b""
        self.start = 0  # file offset of buf[0]
        self.pos = 0  # read position inside buf
        self.order = "<"
        self.bytes_read = 0

    @property
    def offset(self) -> int:
        return self.start + self.pos

    def need(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            return
        if self.offset + n > self.size:
            raise GGUFHeaderError(
                f"the file ends inside its header (at byte {self.size:,}, {self.offset + n - self.size:,} bytes "
                "short): it is truncated — download it again"
            )
        rest = self.buf[self.pos:]
        self.start += self.pos
        self.pos = 0
        chunk = self.fh.read(max(n - len(rest), _CHUNK))
        self.bytes_read += len(chunk)
        self.buf = rest + chunk
        if len(self.buf) < n:
            raise GGUFHeaderError("the file could not be read to the end of its header (it changed while read?)")

    def unpack(self, fmt: str) -> Any:
        s = struct.Struct(self.order + fmt)
        self.need(s.size)
        value = s.unpack_from(self.buf, self.pos)[0]
        self.pos += s.size
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.offset + n > self.size:
            raise GGUFHeaderError("the header points past the end of the file: it is truncated or damaged")
        if self.pos + n <= len(self.buf):
            self.pos += n
            return
        target = self.offset + n
        self.fh.seek(target)
        self.buf, self.start, self.pos = b"", target, 0

    def string(self, what: str) -> str:
        n = self.unpack("Q")
        if n > self.size - self.offset:
            raise GGUFHeaderError(f"{what} has an impossible length ({n:,} bytes): the file is damaged")
        self.need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings (a vocabulary) without decoding them."""
        unpack_from = struct.Struct(self.order + "Q").unpack_from
        remaining = count
        while remaining:
            self.need(8)
            buf, pos, end = self.buf, self.pos, len(self.buf)
            # walk what is buffered; refill only when a length or its string crosses the buffer's end
            while remaining and pos + 8 <= end:
                n = unpack_from(buf, pos)[0]
                if pos + 8 + n > end:
                    break
                pos += 8 + n
                remaining -= 1
            self.pos = pos
            if remaining and self.pos + 8 <= len(self.buf):
                n = unpack_from(self.buf, self.pos)[0]
                if n > self.size - self.offset:
                    raise GGUFHeaderError(f"a string of {n:,} bytes in an array: the file is damaged")
                self.skip(8 + n)
                remaining -= 1


def _value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype])
    if vtype == _STRING:
        return cur.string(f"the value of {key}")
    if vtype == _ARRAY:
        item_type = cur.unpack("I")
        length = cur.unpack("Q")
        if length > cur.size - cur.offset:
            raise GGUFHeaderError(f"{key} claims {length:,} items: the file is damaged")
        if length > KEEP_ARRAY_ITEMS:
            if item_type in _SCALARS:
                cur.skip(length * struct.calcsize(cur.order + _SCALARS[item_type]))
            elif item_type == _STRING:
                cur.skip_strings(length)
            else:
                for _ in range(length):
                    _value(cur, item_type, key)
            return ArrayInfo(item_type, length)
        return [_value(cur, item_type, key) for _ in range(length)]
    raise GGUFHeaderError(f"{key} has an unknown value type {vtype}: the file is damaged or from a newer format")


def read_header(path: str | Path) -> GGUFHeader:
    """Read `path`'s GGUF header. Raises GGUFHeaderError (with the reason) when it is not a readable GGUF file,
    and OSError when it cannot be opened."""
    path = Path(path)
    with path.open("rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(0)
        cur = _Cursor(fh, size)
        if size < 24:
            raise GGUFHeaderError(f"the file is only {size} bytes long: it is empty or truncated")
        cur.need(4)
        if cur.buf[:4] != GGUF_MAGIC:
            raise GGUFHeaderError("it does not start with the GGUF signature: it is not a GGUF file")
        cur.skip(4)
        version = cur.unpack("I")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            cur.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in SUPPORTED_VERSIONS:
            raise GGUFHeaderError(f"GGUF version {version} is not supported (only 2 and 3)")
        tensor_count = cur.unpack("Q")
        kv_count = cur.unpack("Q")
        if tensor_count > size // 24 or kv_count > size // 12:
            raise GGUFHeaderError(f"the file ({size:,} bytes) is too short for the {tensor_count:,} tensors and "
                                  f"{kv_count:,} metadata entries its header lists: it is truncated or damaged")

        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cur.string("a metadata key")
            metadata[key] = _value(cur, cur.unpack("I"), key)

        tensors = []
        for _ in range(tensor_count):
            name = cur.string("a tensor name")
            n_dims = cur.unpack("I")
            if n_dims > MAX_DIMS:
                raise GGUFHeaderError(f"tensor {name} claims {n_dims} dimensions: the file is damaged")
            dims = tuple(cur.unpack("Q") for _ in range(n_dims))
            ggml_type = cur.unpack("I")
            offset = cur.unpack("Q")
            tensors.append(GGUFTensorInfo(name, dims, ggml_type, offset))

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFHeaderError(f"general.alignment is {alignment!r}, not a power of two: the file is damaged")
        end = cur.offset
        data_offset = end + (-end % alignment)
        return GGUFHeader(path, version, metadata, tuple(tensors), data_offset, size, bytes_read=cur.bytes_read)
