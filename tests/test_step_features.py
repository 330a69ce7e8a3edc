"""Library pieces the run's stages use: step features (positions, pooling), aligning
per-step rows to the step table, dropping columns."""

import numpy as np
import pytest

from fcjax.confidence.step_features import capture_positions, pool_steps, step_spans
from fcjax.confidence.trace import Trace
from fcjax.store.tables import align_step_columns, drop_columns, read_table, write_table_atomic
from fcjax.text.steps import Step


def _trace(prompt_len: int, spans: list[tuple[int, int]]) -> Trace:
    n = spans[-1][1] if spans else 0
    steps = [
        Step(index=i, start=a, end=b, text="x" * (b - a), token_start=a, token_end=b)
        for i, (a, b) in enumerate(spans)
    ]
    return Trace(
        example_id="e",
        prompt_ids=list(range(prompt_len)),
        output_ids=list(range(n)),
        text="x" * n,
        token_logprobs=np.zeros(n),
        top_logprobs=np.zeros((n, 1)),
        steps=steps,
        answer=None,
        correct=None,
        kind="numeric",
    )


def test_step_features_against_a_hand_computed_case():
    tr = _trace(3, [(0, 2), (2, 3), (3, 7)])  # steps of 2, 1 and 4 tokens after 3 prompt tokens
    assert step_spans(tr) == [(3, 5), (5, 6), (6, 10)]
    assert capture_positions(tr, "end") == [4, 5, 9]
    assert capture_positions(tr, "mean") == [3, 4, 5, 6, 7, 8, 9]
    rng = np.random.default_rng(0)
    seq = rng.normal(size=(10, 2, 3))  # [positions, layers, width]
    ends = pool_steps(tr, seq[capture_positions(tr, "end")], "end")
    np.testing.assert_array_equal(ends, seq[[4, 5, 9]])
    means = pool_steps(tr, seq[capture_positions(tr, "mean")], "mean")
    want = np.stack([seq[3:5].mean(0), seq[5:6].mean(0), seq[6:10].mean(0)])
    np.testing.assert_allclose(means, want, rtol=1e-12)
    with pytest.raises(ValueError, match="7 captured states for 'end' features, expected 3"):
        pool_steps(tr, seq[3:10], "end")
    with pytest.raises(ValueError, match="features must be one of end, mean"):
        capture_positions(tr, "max")


def test_align_step_columns_orders_like_the_table_with_nan_for_missing():
    steps = {"example_id": ["a", "a", "b"], "step": np.array([0, 1, 0])}
    rows = {
        "example_id": ["b", "a", "zz"],  # out of order; "zz" is no step of the table
        "step": [0, 1, 0],
        "d": [0.5, None, 1.0],
        "n": [3, 4, 5],
    }
    out = align_step_columns(steps, rows)
    assert sorted(out) == ["d", "n"]
    np.testing.assert_array_equal(out["d"], [np.nan, np.nan, 0.5])
    np.testing.assert_array_equal(out["n"], [np.nan, 4.0, 3.0])


def test_drop_columns(tmp_path):
    path = tmp_path / "t.parquet"
    write_table_atomic(path, {"a": [1, 2], "b": [0.5, 0.25], "c": ["x", "y"]})
    assert drop_columns(path, ["b", "missing"]) == ["b"]
    assert sorted(read_table(path)) == ["a", "c"]
    assert drop_columns(path, ["missing"]) == []
