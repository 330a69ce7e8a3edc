"""Hidden-state features of a trace's steps: which positions to capture, and their pooling.

``end``: the state at each step's last token; ``mean``: the mean of the states over each
step's tokens. Positions index the trace's full sequence (prompt + output).
"""

from __future__ import annotations

import numpy as np

from fcjax.confidence.trace import Trace

FEATURES = ("end", "mean")


def _check(features: str) -> None:
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")


def step_spans(trace: Trace) -> list[tuple[int, int]]:
    """[start, end) sequence positions (prompt + output) of each step's tokens."""
    off = len(trace.prompt_ids)
    return [(off + s.token_start, off + s.token_end) for s in trace.steps]


def capture_positions(trace: Trace, features: str) -> list[int]:
    """The sequence positions whose states ``pool_steps`` reads, in order."""
    _check(features)
    spans = step_spans(trace)
    if features == "end":
        return [b - 1 for _, b in spans]
    return [p for a, b in spans for p in range(a, b)]


def pool_steps(trace: Trace, states: np.ndarray, features: str) -> np.ndarray:
    """One feature row per step: ``states`` [len(capture_positions), ...] -> [n_steps, ...]."""
    _check(features)
    states = np.asarray(states)
    spans = step_spans(trace)
    want = len(spans) if features == "end" else sum(b - a for a, b in spans)
    if states.shape[0] != want:
        raise ValueError(
            f"trace {trace.example_id!r}: {states.shape[0]} captured states for {features!r} "
            f"features, expected {want}"
        )
    if features == "end":
        return states
    sizes = np.array([b - a for a, b in spans])
    starts = np.cumsum(sizes) - sizes
    shape = (-1,) + (1,) * (states.ndim - 1)
    return np.add.reduceat(states, starts, axis=0) / sizes.reshape(shape)
