"""Trajectory of decisiveness, confidence and faithfulness along the trace (METHOD.md 5)."""

from __future__ import annotations

import numpy as np

from fcjax.metrics._arrays import bin_index


def trajectory_bins(
    position: object, values: dict[str, object], bins: int = 20
) -> dict[str, object]:
    """Per-bin means of each value over normalised step position.

    `position` in [0, 1] (step index / (n_steps - 1) within its trace); bins are
    [k/bins, (k+1)/bins), the last closed at 1.0. Returns {"edges": [bins + 1],
    "count": steps per bin (finite position), "mean": {name: [bins]} (NaN values ignored;
    NaN where a bin has none), "n": {name: [bins]} (values that entered each mean)}.
    Steps with a non-finite position are left out.
    """
    if bins < 1:
        raise ValueError(f"trajectory_bins: bins must be >= 1, got {bins}")
    pos = np.asarray(position, dtype=np.float64).ravel()
    finite = np.isfinite(pos)
    if np.any((pos[finite] < 0.0) | (pos[finite] > 1.0)):
        raise ValueError("trajectory_bins: position must lie in [0, 1]")
    index = np.full(pos.shape, -1, dtype=np.int64)
    index[finite] = bin_index(pos[finite], bins)
    in_bin = index >= 0
    out: dict[str, object] = {
        "edges": np.linspace(0.0, 1.0, bins + 1),
        "count": np.bincount(index[in_bin], minlength=bins),
        "mean": {},
        "n": {},
    }
    for name, column in values.items():
        v = np.asarray(column, dtype=np.float64).ravel()
        if v.shape != pos.shape:
            raise ValueError(
                f"trajectory_bins: values[{name!r}] has {v.size} entries, position has {pos.size}"
            )
        ok = in_bin & np.isfinite(v)
        sums = np.bincount(index[ok], weights=v[ok], minlength=bins)
        counts = np.bincount(index[ok], minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["mean"][name] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        out["n"][name] = counts
    return out
