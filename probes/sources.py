"""Row sources for probe training: an in-memory array or a TensorStore hidden-state dump.

Both hand out the same float32 blocks ``[rows, layers, width]`` for consecutive row ranges,
so a trainer that reads through a source computes the same numbers from either. The store
source never holds more than the blocks of one minibatch (plus one prefetched minibatch).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from fcjax.store.hidden import HiddenReader, HiddenStoreError
from probes.common import ProbeError


def _return_freed_minibatches() -> None:
    """Fixes glibc's mmap threshold at 1 MiB (once per process). glibc raises the threshold
    after large blocks are freed, so later minibatch buffers come from the heap, whose freed
    pages fragment and stay resident: streaming a 4.3 GB dump in 290 MB minibatches then
    peaked at 4.0 GB of RSS for reading alone, 2.5 GB with the threshold fixed. No-op where
    the C library is not glibc."""
    global _FIXED
    if _FIXED:
        return
    _FIXED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_FIXED = False


class ArraySource:
    """Rows of an in-memory array x [n, layers, width]."""

    def __init__(self, x: np.ndarray):
        x = np.asarray(x)
        if x.ndim != 3:
            raise ProbeError(f"x must be [n, layers, d], got shape {x.shape}")
        self._x = x
        self.n_rows, self.n_layers, self.width = x.shape

    def start(self, ranges: Sequence[tuple[int, int]]):
        """Begins reading the row ranges; ``finish`` of the result returns their rows."""
        return [self._x[lo:hi] for lo, hi in ranges]

    @staticmethod
    def finish(handle) -> np.ndarray:
        return np.concatenate(handle).astype(np.float32, copy=False)


class StoreSource:
    """Rows of a finalized hidden store, in its index order (position i = index row i).

    Reads are asynchronous TensorStore reads of whole chunk blocks; ``layers`` picks the
    layer ids (default: all stored)."""

    def __init__(self, reader: HiddenReader | str, layers: Sequence[int] | None = None):
        _return_freed_minibatches()
        self.reader = reader if isinstance(reader, HiddenReader) else HiddenReader(reader)
        stored = self.reader.layers
        layers = stored if layers is None else tuple(int(v) for v in layers)
        missing = [v for v in layers if v not in stored]
        if missing:
            raise HiddenStoreError(f"{self.reader.root}: layers {missing} not stored; has {stored}")
        self.layers = layers
        self._pick = np.array([stored.index(v) for v in layers])
        self._all = tuple(layers) == tuple(stored)
        rows = self.reader.index["row"]
        self._rows = rows
        self._contiguous = bool(np.array_equal(rows, np.arange(rows.size)))
        self.n_rows, self.n_layers, self.width = rows.size, len(layers), self.reader.meta.width

    def start(self, ranges: Sequence[tuple[int, int]]):
        out = []
        for lo, hi in ranges:
            if self._contiguous:
                out.append(self.reader.start_read(lo, hi))
            else:
                rows = self._rows[lo:hi]
                out.append((rows, self.reader.start_read(int(rows.min()), int(rows.max()) + 1)))
        return out

    def finish(self, handle) -> np.ndarray:
        blocks = []
        for item in handle:
            if isinstance(item, tuple):
                rows, future = item
                block = future.result()[rows - rows.min()]
            else:
                block = item.result()
            if not self._all:
                block = block[:, self._pick]
            blocks.append(np.asarray(block, np.float32))
        return np.concatenate(blocks)


class ConcatSource:
    """Several sources one after another (e.g. the runs a transferred probe trains on)."""

    def __init__(self, sources: Sequence):
        if not sources:
            raise ProbeError("ConcatSource: no sources")
        shapes = {(s.n_layers, s.width) for s in sources}
        if len(shapes) != 1:
            raise ProbeError(f"ConcatSource: sources differ in (layers, width): {sorted(shapes)}")
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [s.n_rows for s in sources])
        self.n_rows = int(self.offsets[-1])
        self.n_layers, self.width = shapes.pop()

    def start(self, ranges: Sequence[tuple[int, int]]):
        parts = []
        for lo, hi in ranges:
            for k, src in enumerate(self.sources):
                a, b = max(lo, self.offsets[k]), min(hi, self.offsets[k + 1])
                if a < b:
                    off = int(self.offsets[k])
                    parts.append((src, src.start([(int(a) - off, int(b) - off)])))
        return parts

    @staticmethod
    def finish(handle) -> np.ndarray:
        return np.concatenate([src.finish(h) for src, h in handle])
