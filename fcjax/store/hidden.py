"""Step-end hidden states in a TensorStore zarr3 array plus a parquet row index.

Layout under ``root``::

    states/            zarr3 array [rows, layers, width] (bfloat16, float16 or float32)
    meta.json          {"layers", "width", "dtype", "chunk_rows"}
    index.parquet      example_id (str), step (int64), row (int64)
    COMPLETE           {"rows": n, ...}, written last by ``finalize`` (readers need it)
    parts/             per-process indexes and done markers in multi-process mode

Chunks are ``[chunk_rows=64, 1, width]``: one chunk holds 64 consecutive rows of ONE layer.
The dominant reader is probe training, which loads one layer for every row, so a layer read
touches ``rows / 64`` chunks and reads no bytes of other layers. Reading one step's layers
touches ``layers`` chunks (64x over-read), which is acceptable because such reads come in
batches of rows. Writers append consecutive rows, so a chunk fills up after a few writes.

Writes are asynchronous: ``write`` issues TensorStore writes and returns; ``flush`` waits
for them and only then rewrites the index atomically, so the index never names a row whose
data is not on disk. ``finalize`` flushes, trims the array and writes ``COMPLETE`` last.

Multi-process: process 0 calls ``HiddenStore.create_shared`` to pre-size the array; each
process opens ``HiddenStore(root, ..., row_offset=o, num_rows=n)`` over a disjoint,
chunk-aligned row range (see ``plan_row_ranges``) so no two processes share a chunk, and
calls ``finalize`` (which marks its part done); process 0 then calls
``HiddenStore.finalize_shared(root, num_parts)`` to merge the part indexes.

``root`` is a local path or a URL (``fcjax.store.fs``): the array goes through the matching
TensorStore kvstore (``file``, ``gcs``, ``s3``), the JSON files and indexes through pyarrow.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from fcjax.store.fs import Location, PathLike, location
from fcjax.store.tables import read_table, write_json_atomic, write_table_atomic

_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
DTYPES = tuple(_DTYPES)
MARKER = "COMPLETE"
INDEX = "index.parquet"


class HiddenStoreError(ValueError):
    """A hidden-state store is missing, incomplete, or inconsistent."""


@dataclass(frozen=True)
class HiddenMeta:
    """What a store holds; saved as meta.json and checked on reopen."""

    layers: tuple[int, ...]
    width: int
    dtype: str
    chunk_rows: int


def _spec(root: Location) -> dict:
    return {"driver": "zarr3", "kvstore": (root / "states").kvstore()}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _load_meta(root: Location) -> HiddenMeta:
    path = root / "meta.json"
    if not path.exists():
        raise HiddenStoreError(f"hidden store metadata not found: {path}")
    raw = json.loads(path.read_text())
    return HiddenMeta(tuple(raw["layers"]), raw["width"], raw["dtype"], raw["chunk_rows"])


def _create(root: Location, meta: HiddenMeta, rows: int) -> ts.TensorStore:
    if meta.dtype not in _DTYPES:
        raise HiddenStoreError(f"{root}: dtype must be one of {sorted(_DTYPES)}, got {meta.dtype}")
    root.mkdir()
    spec = _spec(root)
    spec["metadata"] = {
        "shape": [rows, len(meta.layers), meta.width],
        "data_type": meta.dtype,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [meta.chunk_rows, 1, meta.width]},
        },
    }
    array = ts.open(spec, create=True, delete_existing=True).result()
    write_json_atomic(
        root / "meta.json",
        {
            "layers": list(meta.layers),
            "width": meta.width,
            "dtype": meta.dtype,
            "chunk_rows": meta.chunk_rows,
        },
    )
    return array


def plan_row_ranges(total_rows: int, num_parts: int, chunk_rows: int = 64) -> list[tuple[int, int]]:
    """Splits ``total_rows`` into ``num_parts`` chunk-aligned (row_offset, num_rows) ranges."""
    chunks = _round_up(total_rows, chunk_rows) // chunk_rows
    per, extra = divmod(chunks, num_parts)
    ranges, start = [], 0
    for part in range(num_parts):
        n_chunks = per + (part < extra)
        stop = min(start + n_chunks * chunk_rows, total_rows)
        ranges.append((start, max(stop - start, 0)))
        start = stop
    return ranges


class HiddenStore:
    """Appends step-end hidden states [n, layers, width] keyed by (example_id, step)."""

    def __init__(
        self,
        root: PathLike | Location,
        layers: Sequence[int],
        width: int,
        dtype: str = "bfloat16",
        *,
        chunk_rows: int = 64,
        row_offset: int | None = None,
        num_rows: int | None = None,
        max_pending: int = 64,
    ):
        self.root = location(root)
        self.meta = HiddenMeta(tuple(int(x) for x in layers), int(width), dtype, int(chunk_rows))
        self.max_pending = max_pending
        self._pending: list[tuple[Any, list[tuple[str, int, int]]]] = []
        self._shared = row_offset is not None or num_rows is not None
        if self._shared:
            if row_offset is None or num_rows is None:
                raise HiddenStoreError(f"{self.root}: give both row_offset and num_rows")
            self._open_part(int(row_offset), int(num_rows))
        else:
            self._open_single()
        self._keys = {(e, s) for e, s, _ in self._committed}

    # -- opening -----------------------------------------------------------------------

    def _check_meta(self) -> None:
        found = _load_meta(self.root)
        if found != self.meta:
            raise HiddenStoreError(
                f"{self.root}/meta.json: store holds {found}, but opened with {self.meta}"
            )

    def _read_index(self, path: Location) -> list[tuple[str, int, int]]:
        if not path.exists():
            return []
        table = read_table(path)
        return list(
            zip(
                [str(e) for e in table["example_id"]],
                [int(s) for s in table["step"]],
                [int(r) for r in table["row"]],
                strict=True,
            )
        )

    def _open_single(self) -> None:
        self._index_path = self.root / INDEX
        if (self.root / "states").exists():
            self._check_meta()
            self._array = ts.open(_spec(self.root)).result()
            marker = self.root / MARKER
            marker.unlink()  # Appending makes the store incomplete again.
        else:
            self._array = _create(self.root, self.meta, 0)
        self._committed = self._read_index(self._index_path)
        self._next_row = max((r for _, _, r in self._committed), default=-1) + 1
        self._row_limit = None

    def _open_part(self, row_offset: int, num_rows: int) -> None:
        if not (self.root / "states").exists():
            raise HiddenStoreError(
                f"{self.root}/states: missing; process 0 must call HiddenStore.create_shared first"
            )
        self._check_meta()
        self._array = ts.open(_spec(self.root)).result()
        total = self._array.shape[0]
        stop = row_offset + num_rows
        aligned = row_offset % self.meta.chunk_rows == 0 and (
            stop % self.meta.chunk_rows == 0 or stop == total
        )
        if row_offset < 0 or stop > total or not aligned:
            raise HiddenStoreError(
                f"{self.root}: row range [{row_offset}, {stop}) must lie in [0, {total}) and be "
                f"aligned to chunk_rows={self.meta.chunk_rows} (use plan_row_ranges)"
            )
        parts = self.root / "parts"
        parts.mkdir()
        self._index_path = parts / f"index-{row_offset:012d}.parquet"
        self._done_path = parts / f"done-{row_offset:012d}.json"
        self._done_path.unlink()
        self._row_offset, self._row_limit = row_offset, stop
        self._committed = self._read_index(self._index_path)
        self._next_row = max((r for _, _, r in self._committed), default=row_offset - 1) + 1

    @classmethod
    def create_shared(
        cls,
        root: PathLike | Location,
        layers: Sequence[int],
        width: int,
        total_rows: int,
        dtype: str = "bfloat16",
        *,
        chunk_rows: int = 64,
    ) -> None:
        """Process 0: creates a pre-sized array that several processes fill by row range."""
        root = location(root)
        meta = HiddenMeta(tuple(int(x) for x in layers), int(width), dtype, int(chunk_rows))
        for stale in (root / MARKER, root / INDEX):
            stale.unlink()
        (root / "parts").rmtree()
        _create(root, meta, int(total_rows))

    # -- writing -----------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """Rows written so far (committed or pending)."""
        return len(self._keys)

    def __contains__(self, key: tuple[Any, int]) -> bool:
        return (str(key[0]), int(key[1])) in self._keys

    def _ensure_capacity(self, stop: int) -> None:
        if self._row_limit is not None:
            if stop > self._row_limit:
                raise HiddenStoreError(
                    f"{self.root}: writing row {stop - 1} past this process's range end "
                    f"{self._row_limit}"
                )
            return
        capacity = self._array.shape[0]
        if stop <= capacity:
            return
        new = _round_up(max(stop, 2 * capacity, self.meta.chunk_rows), self.meta.chunk_rows)
        shape = [new, len(self.meta.layers), self.meta.width]
        self._array = self._array.resize(exclusive_max=shape, resize_metadata_only=True).result()

    def write(self, example_id: Any, steps: Sequence[int], states: np.ndarray) -> int:
        """Queues states [n, layers, width] of ``steps``; skips keys already stored.

        Returns the number of new rows. The data is copied, so the caller may reuse
        ``states`` at once; call ``flush`` to wait for the writes and persist the index.
        """
        states = np.asarray(states)
        expect = (len(steps), len(self.meta.layers), self.meta.width)
        if states.shape != expect:
            raise HiddenStoreError(
                f"{self.root}: states for example {example_id!r} have shape {states.shape}, "
                f"expected {expect} (steps, layers, width)"
            )
        eid = str(example_id)
        keep, seen = [], set()
        for i, step in enumerate(steps):
            key = (eid, int(step))
            if key not in self._keys and key not in seen:
                keep.append(i)
                seen.add(key)
        if not keep:
            return 0
        start = self._next_row
        stop = start + len(keep)
        self._ensure_capacity(stop)
        block = np.array(states[keep], dtype=_DTYPES[self.meta.dtype], copy=True)
        future = self._array[start:stop].write(block).commit
        entries = [(eid, int(steps[i]), start + j) for j, i in enumerate(keep)]
        self._pending.append((future, entries))
        self._keys.update(seen)
        self._next_row = stop
        while len(self._pending) > self.max_pending:
            self._retire(self._pending.pop(0))
        return len(keep)

    def _retire(self, item: tuple[Any, list[tuple[str, int, int]]]) -> None:
        future, entries = item
        future.result()
        self._committed.extend(entries)

    def flush(self) -> int:
        """Waits for queued writes, then rewrites the index atomically; returns row count."""
        while self._pending:
            self._retire(self._pending.pop(0))
        ids, steps, rows = zip(*self._committed, strict=True) if self._committed else ((), (), ())
        write_table_atomic(
            self._index_path,
            {
                "example_id": list(ids),
                "step": np.asarray(steps, np.int64),
                "row": np.asarray(rows, np.int64),
            },
        )
        return len(self._committed)

    def finalize(self) -> int:
        """Flushes and marks the store (or this process's part) complete; returns rows."""
        n = self.flush()
        if self._shared:
            write_json_atomic(
                self._done_path,
                {"row_offset": self._row_offset, "row_limit": self._row_limit, "rows": n},
            )
            return n
        shape = [self._next_row, len(self.meta.layers), self.meta.width]
        self._array = self._array.resize(exclusive_max=shape, resize_metadata_only=True).result()
        _write_marker(self.root, self.meta, n)
        return n

    @staticmethod
    def finalize_shared(root: PathLike | Location, num_parts: int) -> int:
        """Process 0, after all parts finalized: merges part indexes, writes COMPLETE."""
        root = location(root)
        meta = _load_meta(root)
        done = (root / "parts").glob("done-*.json")
        if len(done) != num_parts:
            raise HiddenStoreError(
                f"{root}/parts: {len(done)} of {num_parts} parts marked done; not finalizing"
            )
        ids, steps, rows, keys = [], [], [], set()
        for marker in done:
            info = json.loads(marker.read_text())
            index_path = marker.with_name(
                marker.name.replace("done-", "index-").removesuffix(".json") + ".parquet"
            )
            table = read_table(index_path) if info["rows"] else {"example_id": [], "step": []}
            for j, (e, s) in enumerate(zip(table["example_id"], table["step"], strict=True)):
                key = (str(e), int(s))
                if key in keys:
                    raise HiddenStoreError(f"{index_path}: (example_id, step) {key} in two parts")
                keys.add(key)
                ids.append(key[0])
                steps.append(key[1])
                rows.append(int(table["row"][j]))
        write_table_atomic(
            root / INDEX,
            {
                "example_id": ids,
                "step": np.asarray(steps, np.int64),
                "row": np.asarray(rows, np.int64),
            },
        )
        _write_marker(root, meta, len(ids))
        return len(ids)

    def __enter__(self) -> HiddenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

    @staticmethod
    def open_for_read(root: PathLike | Location) -> HiddenReader:
        """Opens a finalized store; raises HiddenStoreError naming the path otherwise."""
        return HiddenReader(root)


def _write_marker(root: Location, meta: HiddenMeta, rows: int) -> None:
    write_json_atomic(
        root / MARKER,
        {"rows": rows, "layers": list(meta.layers), "width": meta.width, "dtype": meta.dtype},
    )


class HiddenReader:
    """Read access to a finalized store; values come back as float32."""

    def __init__(self, root: PathLike | Location):
        self.root = location(root)
        marker = self.root / MARKER
        if not marker.exists():
            raise HiddenStoreError(
                f"{marker}: completion marker missing; the hidden store at {self.root} was not "
                "finalized (interrupted run?) and will not be read"
            )
        self.meta = _load_meta(self.root)
        info = json.loads(marker.read_text())
        index = read_table(self.root / INDEX)
        if len(index["row"]) != info["rows"]:
            raise HiddenStoreError(
                f"{self.root / INDEX}: {len(index['row'])} rows, but {marker} says {info['rows']}"
            )
        self.index = {
            "example_id": [str(e) for e in index["example_id"]],
            "step": np.asarray(index["step"], np.int64),
            "row": np.asarray(index["row"], np.int64),
        }
        self._array = ts.open(_spec(self.root), open=True).result()

    @property
    def layers(self) -> tuple[int, ...]:
        return self.meta.layers

    def __len__(self) -> int:
        return len(self.index["row"])

    def read_rows(self, rows: np.ndarray, layers: Sequence[int] | None = None) -> np.ndarray:
        """Returns float32 [len(rows), len(layers), width] for array rows and layer ids."""
        rows = np.asarray(rows, np.int64)
        layers = self.meta.layers if layers is None else tuple(layers)
        unknown = [layer for layer in layers if layer not in self.meta.layers]
        if unknown:
            raise HiddenStoreError(f"{self.root}: layers {unknown} not stored; has {self.layers}")
        out = np.empty((len(rows), len(layers), self.meta.width), np.float32)
        if len(rows) == 0:
            return out
        lo, hi = int(rows.min()), int(rows.max()) + 1
        reads = [
            self._array[lo:hi, self.meta.layers.index(layer)].read() for layer in layers
        ]  # One read per layer: whole chunks of that layer only.
        for j, future in enumerate(reads):
            out[:, j] = future.result()[rows - lo].astype(np.float32)
        return out

    def start_read(self, lo: int, hi: int):
        """Begins an asynchronous read of array rows [lo, hi), every layer, in the stored
        dtype; ``.result()`` of the returned future gives [hi - lo, layers, width]."""
        if not 0 <= lo <= hi <= self._array.shape[0]:
            raise HiddenStoreError(f"{self.root}: rows [{lo}, {hi}) outside the stored array")
        return self._array[lo:hi].read()

    def read(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """All indexed rows, in index order: float32 [n, layers, width]."""
        return self.read_rows(self.index["row"], layers)


def read_hidden(
    root: PathLike | Location, layers: Sequence[int] | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """Reads a finalized store: (index {example_id, step, row}, float32 [n, layers, width])."""
    reader = HiddenReader(root)
    return reader.index, reader.read(layers)
