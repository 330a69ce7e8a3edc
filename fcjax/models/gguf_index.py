"""A GGUF file's header: its metadata fields and tensor index, read without its data.

``gguf.GGUFReader`` decodes every element of every array field into numpy views when it
opens a file: ~200k views for a 49k-token vocabulary and its merges, 4.5 s of the 6.6 s a
SmolLM2 load took. Here a string array is only stepped over (its length prefixes) and kept
as bytes, decoded when ``contents()`` asks for it (the tokenizer converter, first load only).
The format is llama.cpp's ``gguf.md`` (versions 2 and 3, little-endian); the value and
quantization types are the ``gguf`` package's.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from functools import cached_property
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# GGUFValueType -> struct format of one little-endian value
SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}


class HeaderError(ValueError):
    """A header that does not parse (``gguf_file.reader`` names the file)."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One metadata value: a scalar, a string, or an array of either (``item_type``)."""

    name: str
    value_type: int
    item_type: int | None  # arrays only
    count: int  # elements of an array; 1 otherwise
    raw: bytes  # the encoded value (an array: its elements, after type and count)

    def contents(self) -> Any:
        """The decoded value: int, float, bool or str; a list for an array."""
        if self.value_type == ARRAY:
            if self.item_type == STRING:
                return _strings(self.raw, self.count)
            return list(struct.unpack(f"<{self.count}{SCALARS[self.item_type]}", self.raw))
        if self.value_type == STRING:
            return _strings(self.raw, 1)[0]
        return struct.unpack(f"<{SCALARS[self.value_type]}", self.raw)[0]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor's index entry; ``data`` maps its stored bytes on first use."""

    path: str
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data_offset: int  # from the start of the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @cached_property
    def data(self) -> np.ndarray:
        """The stored values (F32/F16) or uint8 blocks [rows, bytes per row], memory-mapped."""
        raw = np.memmap(self.path, np.uint8, "r", self.data_offset, (self.n_bytes,))
        return storage_layout(raw, self)


def storage_layout(raw: np.ndarray, tensor) -> np.ndarray:
    """A tensor's stored bytes ``raw`` (uint8) viewed in its storage layout: F32/F16 values in
    torch order, else uint8 blocks [rows, bytes per row]."""
    from gguf import GGMLQuantizationType as QT
    from gguf import quant_shape_to_byte_shape

    qtype = QT(tensor.tensor_type)
    shape = tuple(int(x) for x in reversed(tensor.shape))
    if qtype == QT.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == QT.F16:
        return raw.view(np.float16).reshape(shape)
    return raw.reshape(quant_shape_to_byte_shape(shape, qtype))


class Index:
    """``fields`` (name -> ``Field``, in file order) and ``tensors`` of a GGUF file."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            head = _Cursor(f)
            if head.take(4) != MAGIC:
                raise HeaderError("not a GGUF file (bad magic)")
            (version,) = head.unpack("I")
            if version not in VERSIONS:
                raise HeaderError(f"GGUF version {version} (readable: {VERSIONS})")
            n_tensors, n_fields = head.unpack("QQ")
            self.fields: dict[str, Field] = {}
            for _ in range(n_fields):
                name = head.string()
                if name in self.fields:
                    raise HeaderError(f"metadata key {name!r} appears twice")
                self.fields[name] = head.field(name)
            infos = []
            for _ in range(n_tensors):
                name = head.string()
                (n_dims,) = head.unpack("I")
                dims = head.unpack(f"{n_dims}Q")
                qtype, offset = head.unpack("IQ")
                infos.append((name, dims, GGMLQuantizationType(qtype), offset))
        align = self.fields.get("general.alignment")
        alignment = align.contents() if align is not None else DEFAULT_ALIGNMENT
        if alignment <= 0 or alignment & (alignment - 1):
            raise HeaderError(f"general.alignment {alignment} is not a power of two")
        start = -(-head.offset // alignment) * alignment
        size = os.path.getsize(self.path)
        self.tensors: list[Tensor] = []
        for name, dims, qtype, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block * block_bytes
            if start + offset + n_bytes > size:
                raise HeaderError(f"tensor {name!r}: file ends inside its data (truncated?)")
            self.tensors.append(Tensor(self.path, name, dims, qtype, start + offset, n_bytes))


class _Cursor:
    """Reads a header sequentially from an open file, in 1 MiB reads."""

    def __init__(self, file):
        self.file, self.buf, self.at, self.base = file, b"", 0, 0

    @property
    def offset(self) -> int:
        """Bytes consumed from the start of the file."""
        return self.base + self.at

    def take(self, n: int) -> bytes:
        while len(self.buf) - self.at < n:
            more = self.file.read(max(n, 1 << 20))
            if not more:
                raise HeaderError("file ends inside its header (truncated?)")
            self.base += self.at
            self.buf, self.at = self.buf[self.at :] + more, 0
        out = self.buf[self.at : self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("Q")
        return self.take(n).decode("utf-8")

    def field(self, name: str) -> Field:
        (kind,) = self.unpack("I")
        if kind in SCALARS:
            return Field(name, kind, None, 1, self.take(struct.calcsize(SCALARS[kind])))
        if kind == STRING:
            (n,) = self.unpack("Q")
            return Field(name, kind, None, 1, struct.pack("<Q", n) + self.take(n))
        if kind != ARRAY:
            raise HeaderError(f"metadata key {name!r} has unknown value type {kind}")
        item, count = self.unpack("IQ")
        if item in SCALARS:
            return Field(name, kind, item, count, self.take(count * struct.calcsize(SCALARS[item])))
        if item != STRING:
            raise HeaderError(f"metadata key {name!r}: arrays of type {item} are not supported")
        parts = []
        for _ in range(count):  # step over the strings, keeping their bytes
            head = self.take(8)
            parts += (head, self.take(struct.unpack("<Q", head)[0]))
        return Field(name, kind, item, count, b"".join(parts))


def _strings(raw: bytes, count: int) -> list[str]:
    out, at = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", raw, at)
        out.append(raw[at + 8 : at + 8 + n].decode("utf-8"))
        at += 8 + n
    return out
