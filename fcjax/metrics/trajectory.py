"""Trajectory of decisiveness, confidence and faithfulness along the trace (METHOD.md 5)."""

from __future__ import annotations

import numpy as np

from fcjax.metrics._arrays import bin_index

CLOSED = ("left", "right")


def trajectory_bin(position: object, bins: int = 20, closed: str = "left") -> np.ndarray:
    """Bin of each normalised step position in [0, 1] (int64; -1 where not finite).

    closed="left" (fcjax): [k/bins, (k+1)/bins), the last bin closed at 1.0.
    closed="right" (the published ``pd.cut(..., include_lowest=True)``): (e_k, e_k+1] on
    the float edges ``np.linspace(0, 1, bins + 1)``, the first bin closed at 0.0, so a
    position on an edge goes to the bin BELOW it (0.1 of 20 bins is bin 1, fcjax's 2).
    """
    if bins < 1:
        raise ValueError(f"trajectory_bin: bins must be >= 1, got {bins}")
    if closed not in CLOSED:
        raise ValueError(f"trajectory_bin: closed must be one of {CLOSED}, got {closed!r}")
    pos = np.asarray(position, dtype=np.float64).ravel()
    finite = np.isfinite(pos)
    if np.any((pos[finite] < 0.0) | (pos[finite] > 1.0)):
        raise ValueError("trajectory_bin: position must lie in [0, 1]")
    index = np.full(pos.shape, -1, dtype=np.int64)
    if closed == "left":
        index[finite] = bin_index(pos[finite], bins)
    else:
        edges = np.linspace(0.0, 1.0, bins + 1)
        index[finite] = np.maximum(np.searchsorted(edges, pos[finite], side="left") - 1, 0)
    return index


def trajectory_bins(
    position: object, values: dict[str, object], bins: int = 20, closed: str = "left"
) -> dict[str, object]:
    """Per-bin means of each value over normalised step position.

    `position` in [0, 1] (step index / (n_steps - 1) within its trace); bins as
    ``trajectory_bin`` (``closed``: "left", fcjax's, or "right", the published). Returns
    {"edges": [bins + 1], "count": steps per bin (finite position), "mean": {name: [bins]}
    (NaN values ignored; NaN where a bin has none), "n": {name: [bins]} (values that
    entered each mean)}. Steps with a non-finite position are left out.
    """
    pos = np.asarray(position, dtype=np.float64).ravel()
    index = trajectory_bin(pos, bins, closed)
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
