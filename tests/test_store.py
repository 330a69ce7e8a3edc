"""Tests for fcjax.store: parquet tables and the TensorStore hidden-state store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fcjax.store import (
    HiddenStore,
    HiddenStoreError,
    TableError,
    plan_row_ranges,
    read_hidden,
    read_table,
    write_table_atomic,
)
from fcjax.store.tables import update_columns

REPO = Path(__file__).resolve().parents[1]


# -- tables ------------------------------------------------------------------------------


def test_table_round_trip_lists_nan_and_strings(tmp_path):
    path = tmp_path / "t.parquet"
    cols = {
        "example_id": ["a", "b", None],
        "step": np.array([0, 1, 2], np.int64),
        "conf": np.array([0.25, np.nan, 1.0]),
        "ok": np.array([True, False, True]),
        "ids": [[1, 2, 3], [], [7]],
        "mat": np.arange(6).reshape(3, 2),
    }
    write_table_atomic(path, cols)
    back = read_table(path)
    assert back["example_id"] == ["a", "b", None]
    np.testing.assert_array_equal(back["step"], [0, 1, 2])
    assert back["step"].dtype == np.int64
    assert back["conf"][0] == 0.25 and np.isnan(back["conf"][1]) and back["conf"][2] == 1.0
    np.testing.assert_array_equal(back["ok"], [True, False, True])
    assert back["ids"] == [[1, 2, 3], [], [7]]
    assert back["mat"] == [[0, 1], [2, 3], [4, 5]]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # No temp files left.


def test_table_errors_name_path_and_column(tmp_path):
    path = tmp_path / "t.parquet"
    with pytest.raises(TableError, match="different lengths"):
        write_table_atomic(path, {"a": [1, 2], "b": [1]})
    assert not path.exists()
    write_table_atomic(path, {"a": [1, 2]})
    with pytest.raises(TableError, match=r"t\.parquet.*'zz'"):
        read_table(path, columns=["zz"])
    with pytest.raises(TableError, match=r"nope\.parquet"):
        read_table(tmp_path / "nope.parquet")


def test_update_columns_keeps_other_columns(tmp_path):
    path = tmp_path / "t.parquet"
    write_table_atomic(path, {"ids": [[1], [2, 3]], "n": np.array([4, 5], np.int32)})
    update_columns(path, {"n": np.array([6.5, np.nan]), "new": ["x", "y"]})
    back = read_table(path)
    assert back["ids"] == [[1], [2, 3]]
    assert back["n"][0] == 6.5 and np.isnan(back["n"][1])
    assert back["new"] == ["x", "y"]
    with pytest.raises(TableError, match="3 rows"):
        update_columns(path, {"bad": [1, 2, 3]})


def test_reading_tables_starts_no_arrow_thread_pool(tmp_path):
    """Reads, updates and the trace reader run on the calling thread: an Arrow pool worker
    alive at interpreter exit can abort a finished process (``tables.read_arrow``). In a
    fresh process, since a pool, once started, lives to the end."""
    code = textwrap.dedent(
        """
        import os, sys
        from fcjax.data import DataError
        from fcjax.data.traces import read_traces
        from fcjax.store.tables import (
            drop_columns, read_table, update_columns, write_table_atomic,
        )

        def threads():
            return [t for t in os.listdir("/proc/self/task")
                    if open(f"/proc/self/task/{t}/comm").read().strip() != "jemalloc_bg_thd"]

        path = os.path.join(sys.argv[1], "t.parquet")
        write_table_atomic(path, {"example_id": ["a", "b"], "x": [1.0, 2.0]})
        before = threads()
        read_table(path)
        read_table(path, ["x"])
        update_columns(path, {"y": [3.0, 4.0]})
        drop_columns(path, ["y"])
        try:  # read as a trace file: not one (no "id" field), but read first
            read_traces(path)
        except DataError as e:
            assert "missing field" in str(e), e
        print(len(read_table(path)["x"]), len(before), len(threads()))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows, before, after = map(int, done.stdout.split())
    assert rows == 2 and after == before


# -- hidden store ------------------------------------------------------------------------


def test_float32_round_trip_exact_across_chunks(tmp_path):
    rng = np.random.default_rng(0)
    store = HiddenStore(tmp_path / "h", [2, 5, 9], 12, "float32", chunk_rows=8)
    written = {}
    for e in range(7):  # 7 * 5 = 35 rows: partial chunks and several resizes.
        states = rng.normal(size=(5, 3, 12)).astype(np.float32)
        store.write(f"ex{e}", list(range(5)), states)
        for s in range(5):
            written[(f"ex{e}", s)] = states[s].copy()
        states[:] = np.nan  # Must not affect what was queued.
    assert not (tmp_path / "h" / "COMPLETE").exists()
    assert store.finalize() == 35
    index, states = read_hidden(tmp_path / "h")
    assert states.shape == (35, 3, 12) and states.dtype == np.float32
    for i, (e, s) in enumerate(zip(index["example_id"], index["step"], strict=True)):
        np.testing.assert_array_equal(states[i], written[(e, int(s))])
    _, middle = read_hidden(tmp_path / "h", layers=[5])
    np.testing.assert_array_equal(middle[:, 0], states[:, 1])


def test_bfloat16_representable_exact_and_rounding_matches_ml_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(6, 2, 8)).astype(np.float32)
    representable = raw.astype(ml_dtypes.bfloat16).astype(np.float32)
    store = HiddenStore(tmp_path / "h", [0, 1], 8, "bfloat16")
    store.write("rep", list(range(6)), representable)
    store.write("raw", list(range(6)), raw)
    store.finalize()
    index, states = read_hidden(tmp_path / "h")
    pairs = zip(index["example_id"], index["step"].tolist(), strict=True)
    order = {key: i for i, key in enumerate(pairs)}
    rep = states[[order[("rep", s)] for s in range(6)]]
    got = states[[order[("raw", s)] for s in range(6)]]
    np.testing.assert_array_equal(rep, representable)
    np.testing.assert_array_equal(got, representable)  # Rounded once, like ml_dtypes.
    assert not np.array_equal(raw, representable)  # The rounding check is not vacuous.


def test_resume_appends_without_duplicates(tmp_path):
    rng = np.random.default_rng(2)
    first = rng.normal(size=(3, 1, 4)).astype(np.float32)
    store = HiddenStore(tmp_path / "h", [7], 4, "float32")
    store.write("a", [0, 1, 2], first)
    store.finalize()
    again = HiddenStore(tmp_path / "h", [7], 4, "float32")
    assert not (tmp_path / "h" / "COMPLETE").exists()  # Appending reopens the store.
    assert ("a", 1) in again and ("a", 3) not in again
    second = rng.normal(size=(3, 1, 4)).astype(np.float32)
    assert again.write("a", [1, 2, 3], second) == 1  # Only step 3 is new.
    assert again.write("b", [0, 0], second[:2]) == 1  # Duplicate within a call.
    assert again.finalize() == 5
    index, states = read_hidden(tmp_path / "h")
    keys = list(zip(index["example_id"], index["step"].tolist(), strict=True))
    assert sorted(keys) == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0)]
    by_key = dict(zip(keys, states, strict=True))
    np.testing.assert_array_equal(by_key[("a", 1)], first[1])  # First write wins.
    np.testing.assert_array_equal(by_key[("a", 3)], second[2])
    np.testing.assert_array_equal(by_key[("b", 0)], second[0])


def test_unflushed_rows_are_not_indexed_and_reader_refuses(tmp_path):
    root = tmp_path / "h"
    store = HiddenStore(root, [0], 4, "float32")
    store.write("a", [0], np.ones((1, 1, 4), np.float32))
    with pytest.raises(HiddenStoreError, match=re.escape(str(root))):
        HiddenStore.open_for_read(root)
    store.flush()  # Flushed but not finalized: still refused.
    with pytest.raises(HiddenStoreError, match="COMPLETE"):
        read_hidden(root)
    # A "crashed" writer: rows written but never flushed are not in the index on resume.
    store.write("b", [0], np.full((1, 1, 4), 2, np.float32))
    del store
    resumed = HiddenStore(root, [0], 4, "float32")
    assert ("a", 0) in resumed and ("b", 0) not in resumed
    resumed.write("b", [0], np.full((1, 1, 4), 3, np.float32))
    resumed.finalize()
    index, states = read_hidden(root)
    assert index["example_id"] == ["a", "b"]
    np.testing.assert_array_equal(states[:, 0, 0], [1.0, 3.0])


def test_reopen_with_other_layout_and_bad_shapes_raise(tmp_path):
    root = tmp_path / "h"
    store = HiddenStore(root, [0, 1], 4, "float32")
    with pytest.raises(HiddenStoreError, match=r"expected \(2, 2, 4\)"):
        store.write("a", [0, 1], np.zeros((2, 3, 4)))
    store.finalize()
    with pytest.raises(HiddenStoreError, match=r"meta\.json"):
        HiddenStore(root, [0, 2], 4, "float32")
    with pytest.raises(HiddenStoreError, match=r"layers \[5\] not stored"):
        read_hidden(root, layers=[5])


def test_plan_row_ranges_aligned_disjoint_cover():
    ranges = plan_row_ranges(200, 3, chunk_rows=64)
    assert ranges == [(0, 128), (128, 64), (192, 8)]
    covered = [r for off, n in ranges for r in range(off, off + n)]
    assert covered == list(range(200))


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fcjax.store import HiddenStore
    root, offset, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = HiddenStore(root, [3, 4], 6, "float32", chunk_rows=16, row_offset=offset, num_rows=n)
    for e in range(offset, offset + n, 4):
        steps = list(range(4))
        states = np.arange(e * 12, (e + 4) * 12, dtype=np.float32).reshape(4, 2, 6)
        store.write(f"ex{e}", steps, states)
    store.finalize()
    """
)


@pytest.mark.integration
def test_two_processes_write_disjoint_halves(tmp_path):
    root = tmp_path / "h"
    total = 64
    HiddenStore.create_shared(root, [3, 4], 6, total, "float32", chunk_rows=16)
    ranges = plan_row_ranges(total, 2, chunk_rows=16)
    assert ranges == [(0, 32), (32, 32)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(root), str(off), str(n)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for off, n in ranges
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    with pytest.raises(HiddenStoreError, match=r"2 of 3 parts"):
        HiddenStore.finalize_shared(root, 3)
    assert HiddenStore.finalize_shared(root, 2) == total
    index, states = read_hidden(root)
    expected = np.arange(total * 12, dtype=np.float32).reshape(total, 2, 6)
    np.testing.assert_array_equal(states[np.argsort(index["row"])], expected)
    # Row r came from example 4 * (r // 4), step r % 4.
    for e, s, r in zip(index["example_id"], index["step"], index["row"], strict=True):
        assert (e, int(s)) == (f"ex{4 * (r // 4)}", r % 4)


def test_part_range_must_be_chunk_aligned(tmp_path):
    root = tmp_path / "h"
    HiddenStore.create_shared(root, [0], 2, 64, "float32", chunk_rows=16)
    with pytest.raises(HiddenStoreError, match="aligned"):
        HiddenStore(root, [0], 2, "float32", chunk_rows=16, row_offset=8, num_rows=16)
    part = HiddenStore(root, [0], 2, "float32", chunk_rows=16, row_offset=16, num_rows=16)
    with pytest.raises(HiddenStoreError, match="range end"):
        part.write("a", list(range(17)), np.zeros((17, 1, 2)))
