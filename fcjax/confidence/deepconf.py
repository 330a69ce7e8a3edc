"""DeepConf step confidence from top-k token log-probabilities (METHOD.md 4.1).

For each generated token t, c_t = -mean of the top-k log-probabilities of the model's own
next-token distribution (temperature 1, before filtering; k = ``top_k`` = 5, the first
columns the engine recorded). A step's raw value is the mean of c_t over its tokens, mapped
to [0, 1] as min(max(raw / scale, 0), 1) with scale 8 (the study's constant). A peaked
distribution has one log-probability near 0 and the others very negative, so a large c_t
means a confident token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fcjax.confidence.base import Columns, Estimator, EstimatorContext, EstimatorError, register
from fcjax.confidence.trace import Trace


def token_confidence(top_logprobs: np.ndarray) -> np.ndarray:
    """c_t [T] = -mean over k of top_logprobs [T, k]; non-finite entries are ignored (NaN
    when a row has none)."""
    lp = np.asarray(top_logprobs, np.float64)
    finite = np.isfinite(lp)
    n = finite.sum(-1)
    total = np.where(finite, lp, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, -total / np.maximum(n, 1), np.nan)


def step_means(values: np.ndarray, trace: Trace) -> np.ndarray:
    """Mean of per-token ``values`` [T] over each step's tokens (NaN-aware) -> [n_steps]."""
    out = np.full(trace.n_steps, np.nan)
    for i, s in enumerate(trace.steps):
        v = values[s.token_start : s.token_end]
        v = v[np.isfinite(v)]
        if v.size:
            out[i] = v.mean()
    return out


@register
@dataclasses.dataclass(frozen=True)
class DeepConf(Estimator):
    """conf_deepconf = clip(mean_t c_t / scale, 0, 1); deepconf_raw = mean_t c_t."""

    name = "deepconf"
    trace_reduce = "mean"
    scale: float = 8.0
    top_k: int = 5

    def score(self, traces: Sequence[Trace], ctx: EstimatorContext) -> list[Columns]:
        out = []
        for n, trace in enumerate(traces):
            if trace.top_logprobs.shape[1] < self.top_k:
                raise EstimatorError(
                    f"deepconf: trace {trace.example_id!r} has {trace.top_logprobs.shape[1]} "
                    f"top log-probabilities per token, needs {self.top_k} "
                    f"(generate with SamplingParams(logprobs={self.top_k}))"
                )
            top = trace.top_logprobs[:, : self.top_k]
            raw = step_means(token_confidence(top), trace)
            out.append({"conf_deepconf": np.clip(raw / self.scale, 0.0, 1.0), "deepconf_raw": raw})
            ctx.report(self.name, n + 1, len(traces))
        return out
