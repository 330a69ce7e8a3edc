"""Compares two run directories: tables, hidden states, summary (used by multi-process tests)."""

import json
import math

import numpy as np

from fcjax.store.hidden import read_hidden
from fcjax.store.tables import read_table


def assert_same_tables(a, b, name: str, atol: float = 1e-5) -> None:
    """Same columns and rows; float columns to ``atol`` (NaN where NaN), the rest exactly."""
    x, y = read_table(a / name), read_table(b / name)
    assert sorted(x) == sorted(y), name
    for k in x:
        vx, vy = x[k], y[k]
        if isinstance(vx, np.ndarray) and vx.dtype.kind == "f":
            np.testing.assert_allclose(vx, vy, rtol=0, atol=atol, err_msg=f"{name}:{k}")
        else:
            assert list(map(str, vx)) == list(map(str, vy)), f"{name}:{k}"


def assert_same_hidden(a, b, atol: float = 1e-5) -> None:
    """The same (example_id, step) keys with the same states, whatever the row layout."""
    (ia, sa), (ib, sb) = read_hidden(a / "hidden"), read_hidden(b / "hidden")
    keys_a = list(zip(ia["example_id"], ia["step"].tolist(), strict=True))
    keys_b = list(zip(ib["example_id"], ib["step"].tolist(), strict=True))
    assert sorted(keys_a) == sorted(keys_b) and keys_a
    rows_b = {k: i for i, k in enumerate(keys_b)}
    order = [rows_b[k] for k in keys_a]
    np.testing.assert_allclose(sa, sb[order], rtol=0, atol=atol)


def assert_same_json(x, y, path: str = "", atol: float = 1e-5) -> None:
    """Equal JSON values, numbers to ``atol``; wall-clock times are skipped."""
    if isinstance(x, dict):
        assert isinstance(y, dict) and sorted(x) == sorted(y), path
        for k in x:
            if "wall" not in k:
                assert_same_json(x[k], y[k], f"{path}.{k}", atol)
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            assert_same_json(u, v, f"{path}[{i}]", atol)
    elif isinstance(x, float) or isinstance(y, float):
        assert x is not None and y is not None, (path, x, y)
        assert math.isclose(x, y, rel_tol=0, abs_tol=atol), (path, x, y)
    else:
        assert x == y, (path, x, y)


def assert_same_run(a, b) -> None:
    for name in ("examples.parquet", "steps.parquet"):
        assert_same_tables(a, b, name)
    assert_same_hidden(a, b)
    assert_same_json(
        json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    )
