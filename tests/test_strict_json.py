"""Run-directory JSON is strict: non-finite numbers are written as null."""

import json

import numpy as np
import pytest

from fcjax.store import write_json_atomic
from fcjax.store.strict_json import dumps_strict, to_strict


def _strict_load(text: str):
    def refuse(token):
        raise AssertionError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null(tmp_path) -> None:
    obj = {
        "agreement": {"a|b": {"spearman": float("nan"), "kendall": np.float64("nan"), "n": 0}},
        "edges": np.array([0.0, np.inf, 1.0]),
        "pair": (np.float32(0.5), -np.inf),
        "count": np.int64(3),
        "ok": True,
    }
    path = tmp_path / "summary.json"
    write_json_atomic(path, obj)
    back = _strict_load(path.read_text())
    assert back == {
        "agreement": {"a|b": {"spearman": None, "kendall": None, "n": 0}},
        "edges": [0.0, None, 1.0],
        "pair": [0.5, None],
        "count": 3,
        "ok": True,
    }
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_plain_json_dump_would_have_written_nan() -> None:
    # the failure this guards against: the standard library writes NaN by default
    assert "NaN" in json.dumps({"x": float("nan")})
    assert dumps_strict({"x": float("nan")}) == '{"x": null}'
    assert to_strict([1, "a", None]) == [1, "a", None]
    with pytest.raises(ValueError):
        json.dumps({"x": float("nan")}, allow_nan=False)


def test_to_python_keeps_nan_unless_strict() -> None:
    import math

    from fcjax.plain import to_python

    obj = {"a": np.float32(0.5), "b": (np.arange(2), float("nan")), 3: np.int64(7)}
    plain = to_python(obj)
    assert plain["a"] == 0.5 and type(plain["a"]) is float
    assert plain["b"][0] == [0, 1] and math.isnan(plain["b"][1])
    assert plain[3] == 7 and type(plain[3]) is int
    assert to_python(obj, strict=True) == {"a": 0.5, "b": [[0, 1], None], "3": 7}
