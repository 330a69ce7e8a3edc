"""Agreement between confidence estimators on the same steps (METHOD.md section 5).

Spearman's rho and Kendall's tau-b, tie-aware, in numpy (no scipy).
"""

from __future__ import annotations

import numpy as np

from fcjax.metrics._arrays import finite_pairs


def rankdata(values: object) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (scipy's 'average')."""
    array = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(array, kind="stable")
    sorted_values = array[order]
    is_new = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group = np.cumsum(is_new) - 1
    group_start = np.flatnonzero(is_new)
    group_stop = np.append(group_start[1:], array.size)
    average = (group_start + group_stop + 1) / 2.0  # mean of ranks start+1..stop
    ranks = np.empty(array.size, dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def spearman(x: object, y: object) -> float:
    """Spearman's rho (Pearson correlation of average ranks) over finite pairs.

    NaN with fewer than 2 pairs or when either side is constant.
    """
    x_arr, y_arr = finite_pairs(x, y, "spearman")
    if x_arr.size < 2:
        return float("nan")
    rx, ry = rankdata(x_arr), rankdata(y_arr)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _tied_pairs(values: np.ndarray) -> int:
    _, counts = np.unique(values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _count_inversions(values: np.ndarray) -> int:
    """Number of pairs i < j with values[i] > values[j] (strict), by a vectorised merge sort.

    `values` are integer ranks 0..n-1 (ties allowed). Each level merges adjacent sorted
    blocks; the count for a right-block element is how many left-block elements exceed it,
    found with one global searchsorted on keys offset by block pair.
    """
    n = values.size
    current = values.astype(np.int64)
    big = int(current.max()) + 1 if n else 1
    inversions = 0
    width = 1
    positions = np.arange(n)
    while width < n:
        pair_id = positions // (2 * width)
        in_left = (positions % (2 * width)) < width
        keys = pair_id * big + current  # sorted within each block
        left_keys = keys[in_left]  # globally sorted: blocks in order, offsets increase
        right_keys = keys[~in_left]
        right_pairs = pair_id[~in_left]
        # Left-block elements <= r in the same pair, then > r = left size - that.
        left_start = np.searchsorted(left_keys, right_pairs * big, side="left")
        not_greater = np.searchsorted(left_keys, right_keys, side="right") - left_start
        left_size = np.minimum(width, n - right_pairs * 2 * width)
        inversions += int((left_size - not_greater).sum())
        current = np.sort(keys, kind="stable") - pair_id * big
        width *= 2
    return inversions


def kendall(x: object, y: object) -> float:
    """Kendall's tau-b over finite pairs (tie-aware, O(n log^2 n), Knight's method).

    tau_b = (n_c - n_d) / sqrt((n0 - n1) (n0 - n2)) with n0 = n(n-1)/2, n1/n2 pairs tied
    in x/y. NaN with fewer than 2 pairs or when either side is constant.
    """
    x_arr, y_arr = finite_pairs(x, y, "kendall")
    n = x_arr.size
    if n < 2:
        return float("nan")
    order = np.lexsort((y_arr, x_arr))  # by x, then y
    x_sorted, y_sorted = x_arr[order], y_arr[order]
    n0 = n * (n - 1) // 2
    n1 = _tied_pairs(x_sorted)
    n2 = _tied_pairs(y_sorted)
    joint = np.stack([x_sorted, y_sorted], axis=1)
    _, joint_counts = np.unique(joint, axis=0, return_counts=True)
    n3 = int((joint_counts * (joint_counts - 1) // 2).sum())
    y_rank = np.unique(y_sorted, return_inverse=True)[1].ravel()
    discordant = _count_inversions(y_rank)
    concordant_minus_discordant = (n0 - n1 - n2 + n3) - 2 * discordant
    denom = np.sqrt(float(n0 - n1) * float(n0 - n2))
    return float(concordant_minus_discordant / denom) if denom > 0 else float("nan")


def pairwise_agreement(columns: dict[str, object]) -> dict[str, dict[str, float]]:
    """Spearman, Kendall and n for every pair of columns, over rows where both are finite.

    Keys are "a|b" for a before b in the dict's order.
    """
    names = list(columns)
    arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in columns.items()}
    sizes = {k: v.size for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"pairwise_agreement: columns differ in length: {sizes}")
    out: dict[str, dict[str, float]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            n = int((np.isfinite(arrays[a]) & np.isfinite(arrays[b])).sum())
            out[f"{a}|{b}"] = {
                "spearman": spearman(arrays[a], arrays[b]),
                "kendall": kendall(arrays[a], arrays[b]),
                "n": n,
            }
    return out
