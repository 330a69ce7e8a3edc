"""Small parquet helpers over pyarrow (no pandas) for the run-directory tables.

Tables are plain ``dict[str, column]``. Numeric and boolean columns come back as numpy
arrays (missing floats as NaN); strings, token-id lists and anything with nulls that numpy
cannot hold come back as Python lists. Paths are local paths or URLs (``fcjax.store.fs``).
Writes are atomic (``Location.write_with``: locally a temporary file in the same directory
is written, fsynced and renamed over the target; on an object store one whole upload), so
a crash never leaves a torn table and a stage either wrote its output or did not.
``write_json_atomic`` does the same for the run directory's JSON files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fcjax.store.fs import Location, PathLike, location
from fcjax.store.strict_json import dumps_strict

Column = np.ndarray | list


class TableError(ValueError):
    """A table is missing, malformed, or lacks a required column."""


def _to_arrow(name: str, values: Any) -> pa.Array:
    """Converts one column to an arrow array; 2-D numpy arrays become list columns."""
    if isinstance(values, np.ndarray):
        if values.ndim == 1:
            if values.dtype == object:
                return pa.array(values.tolist())
            return pa.array(values)  # NaN stays NaN (from_pandas=False).
        if values.ndim == 2:
            return pa.array([row for row in values.tolist()])
        raise TableError(f"column {name!r}: arrays must be 1-D or 2-D, got shape {values.shape}")
    if isinstance(values, Sequence) and not isinstance(values, str | bytes):
        items = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
        try:
            return pa.array(items)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise TableError(f"column {name!r}: cannot convert to arrow: {err}") from err
    raise TableError(f"column {name!r}: expected list or numpy array, got {type(values).__name__}")


def write_table_atomic(path: PathLike | Location, columns: Mapping[str, Column]) -> None:
    """Writes ``columns`` as a parquet file at ``path``, atomically."""
    path = location(path)
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise TableError(f"{path}: columns have different lengths: {lengths}")
    arrays = {name: _to_arrow(name, values) for name, values in columns.items()}
    _write_arrow_atomic(path, pa.table(arrays) if arrays else pa.table({}))


def read_arrow(file, columns: Sequence[str] | None = None) -> pa.Table:
    """A parquet file's table, read on the calling thread. Arrow starts its thread pools on
    first use (``pq.read_table`` does, even with ``use_threads=False``: its dataset layer) and
    tears them down at interpreter exit, where a worker still alive aborts a process whose
    work is done ("terminate called without an active exception", rc -6: apache/arrow#34314;
    seen twice in CI, in ``experiments.export``). Run tables are small: a pool buys nothing."""
    names = list(columns) if columns is not None else None
    return pq.ParquetFile(file, pre_buffer=False).read(columns=names, use_threads=False)


def _write_arrow_atomic(path: Location, table: pa.Table) -> None:
    path.write_with(lambda fh: pq.write_table(table, fh))


def write_json_atomic(path: PathLike | Location, obj: Any) -> None:
    """Writes ``obj`` as strict JSON at ``path``, atomically (numpy values as Python numbers
    and lists, non-finite numbers as null; ``fcjax.store.strict_json``)."""
    location(path).write_text(dumps_strict(obj, indent=2, sort_keys=True))


def update_columns(path: PathLike | Location, columns: Mapping[str, Column]) -> None:
    """Replaces or appends ``columns`` in an existing table atomically; others kept as is."""
    path = location(path)
    if not path.exists():
        raise TableError(f"table not found: {path}")
    with path.open() as f:
        table = read_arrow(f)
    for name, values in columns.items():
        if len(values) != table.num_rows:
            raise TableError(
                f"{path}: column {name!r} has {len(values)} rows, table has {table.num_rows}"
            )
        array = _to_arrow(name, values)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    _write_arrow_atomic(path, table)


def drop_columns(path: PathLike | Location, names: Sequence[str]) -> list[str]:
    """Removes the columns ``names`` that ``path`` holds, atomically; returns those removed."""
    path = location(path)
    if not path.exists():
        raise TableError(f"table not found: {path}")
    with path.open() as f:
        table = read_arrow(f)
    gone = [n for n in table.column_names if n in set(names)]
    if gone:
        _write_arrow_atomic(path, table.drop_columns(gone))
    return gone


def align_step_columns(
    steps: Mapping[str, Column], rows: Mapping[str, Sequence]
) -> dict[str, np.ndarray]:
    """Per-step ``rows`` (``example_id``, ``step`` and value columns, in any order) as float
    columns in the row order of the table ``steps`` (``example_id``, ``step``): NaN where a
    step has no row or its value is None; rows of steps the table lacks are dropped."""
    index = {
        (str(e), int(s)): i
        for i, (e, s) in enumerate(zip(steps["example_id"], steps["step"], strict=True))
    }
    keys = zip(rows.get("example_id", []), rows.get("step", []), strict=True)
    where = [index.get((str(e), int(s))) for e, s in keys]
    out = {}
    for key, values in rows.items():
        if key in ("example_id", "step"):
            continue
        col = np.full(len(index), np.nan)
        for r, v in zip(where, values, strict=True):
            if r is not None:
                col[r] = np.nan if v is None else float(v)
        out[key] = col
    return out


def _from_arrow(column: pa.ChunkedArray) -> Column:
    kind = column.type
    if pa.types.is_floating(kind):
        return column.to_numpy()  # Nulls become NaN.
    if pa.types.is_integer(kind):
        if column.null_count:
            return column.to_numpy().astype(np.float64)  # Missing ints become NaN.
        return column.to_numpy()
    if pa.types.is_boolean(kind) and column.null_count == 0:
        return column.to_numpy()
    return column.to_pylist()


def read_table(
    path: PathLike | Location, columns: Sequence[str] | None = None
) -> dict[str, Column]:
    """Reads a parquet file into ``{name: column}``; names a missing file or column."""
    path = location(path)
    if not path.exists():
        raise TableError(f"table not found: {path}")
    with path.open() as f:
        schema_names = pq.read_schema(f).names
        if columns is not None:
            missing = [c for c in columns if c not in schema_names]
            if missing:
                raise TableError(f"{path}: missing column(s) {missing}; has {schema_names}")
        f.seek(0)
        table = read_arrow(f, columns)
    return {name: _from_arrow(table.column(name)) for name in table.column_names}


def require_columns(path: PathLike | Location, table: Mapping[str, Column], names: Sequence[str]):
    """Raises a TableError naming ``path`` if any of ``names`` is absent from ``table``."""
    missing = [n for n in names if n not in table]
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}; has {sorted(table)}")


def num_rows(table: Mapping[str, Column]) -> int:
    """Number of rows of a column dict (0 when it has no columns)."""
    return len(next(iter(table.values()))) if table else 0
