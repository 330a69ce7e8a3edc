"""RCC, the Recurrent Confidence Chain: step confidence from hidden states, no training
(METHOD.md 4.2; arXiv 2601.13368).

H is the last decoder layer's output before the final norm, one row per token of prompt +
trace; p_t = exp(top_logprobs[t, 0]) is the largest next-token probability at generated
token t. For step i with rows E_i and previous rows E_prev (the prompt for the first step,
else the previous step):

    A = E_prev E_i^T / sqrt(d)        [n_prev, n_i], softmax over each row
    W = [softmax(A) >= mu]            which step tokens a previous token attends to strongly
    r = W p_i                         [n_prev]
    q_i = mean of the non-zero entries of r (0 if none)
    P_1 = q_1,  P_i = delta q_i + (1 - delta) P_{i-1}

conf_rcc = P_i; rcc_q keeps q_i. Defaults mu = 0.5, delta = 0.4 (the study's). With
mu >= 0.5 a softmax row has at most one entry above mu (two only at an exact tie), so
q <= max p <= 1; a smaller mu can let q exceed 1, and conf_rcc is clipped to [0, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fcjax.confidence.base import Columns, Estimator, EstimatorContext, EstimatorError, register
from fcjax.confidence.trace import Trace
from fcjax.engine.capture import capture


def row_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def step_q(e_prev: np.ndarray, e_step: np.ndarray, p_step: np.ndarray, mu: float) -> float:
    """q for one step: e_prev [n_prev, d], e_step [n_i, d], p_step [n_i]."""
    d = e_step.shape[-1]
    a = (e_prev.astype(np.float64) @ e_step.astype(np.float64).T) / np.sqrt(d)
    w = row_softmax(a) >= mu  # [n_prev, n_i]
    r = w.astype(np.float64) @ p_step.astype(np.float64)  # [n_prev]
    nonzero = r[r != 0]
    return float(nonzero.mean()) if nonzero.size else 0.0


def smooth(q: np.ndarray, delta: float) -> np.ndarray:
    """P_1 = q_1, P_i = delta q_i + (1 - delta) P_{i-1}."""
    p = np.empty(len(q))
    for i, qi in enumerate(q):
        p[i] = qi if i == 0 else delta * qi + (1 - delta) * p[i - 1]
    return p


def rcc_steps(
    last_hidden: np.ndarray, trace: Trace, mu: float = 0.5, delta: float = 0.4
) -> tuple[np.ndarray, np.ndarray]:
    """(q [n_steps], P [n_steps]) of a trace from its hidden rows [prompt + T, d]."""
    n_prompt = trace.prompt_len
    if last_hidden.shape[0] != n_prompt + len(trace.output_ids):
        raise EstimatorError(
            f"rcc: trace {trace.example_id!r} has {last_hidden.shape[0]} hidden rows for "
            f"{n_prompt} prompt + {len(trace.output_ids)} output tokens"
        )
    if n_prompt == 0:
        raise EstimatorError(f"rcc: trace {trace.example_id!r} has an empty prompt")
    p_top = np.exp(trace.top_logprobs[:, 0].astype(np.float64))  # [T]
    e_prev = last_hidden[:n_prompt]
    q = np.zeros(trace.n_steps)
    for i, s in enumerate(trace.steps):
        e_step = last_hidden[n_prompt + s.token_start : n_prompt + s.token_end]
        q[i] = step_q(e_prev, e_step, p_top[s.token_start : s.token_end], mu)
        e_prev = e_step
    return q, smooth(q, delta)


def ensure_hidden(lm, traces: Sequence[Trace]) -> None:
    """Fills ``trace.last_hidden`` by one capture forward for the traces that lack it."""
    todo = [t for t in traces if t.last_hidden is None]
    if not todo:
        return
    layer = (lm.config.num_layers,)  # the smallest capture; only last_hidden is used
    caps = capture(lm, [t.sequence for t in todo], [[0] for _ in todo], layers=layer)
    for t, c in zip(todo, caps, strict=True):
        t.last_hidden = c.last_hidden


@register
@dataclasses.dataclass(frozen=True)
class RCC(Estimator):
    """conf_rcc = P_i (smoothed), rcc_q = q_i."""

    name = "rcc"
    trace_reduce = "last"
    mu: float = 0.5
    delta: float = 0.4

    def __post_init__(self):
        if not 0 < self.delta <= 1:
            raise EstimatorError(f"rcc: delta must be in (0, 1], got {self.delta}")

    def score(self, traces: Sequence[Trace], ctx: EstimatorContext) -> list[Columns]:
        for trace in traces:
            if trace.top_logprobs.shape[1] == 0:
                raise EstimatorError(
                    f"rcc: trace {trace.example_id!r} has no top log-probabilities"
                )
        # one batched capture for the part (a forward per trace would compile a program
        # per length bucket and run batch-1 passes)
        ensure_hidden(ctx.lm, [t for t in traces if t.n_steps])
        out = []
        for n, trace in enumerate(traces):
            if trace.n_steps == 0:
                out.append({"conf_rcc": np.zeros(0), "rcc_q": np.zeros(0)})
            else:
                q, p = rcc_steps(trace.last_hidden, trace, self.mu, self.delta)
                out.append({"conf_rcc": np.clip(p, 0.0, 1.0), "rcc_q": q})
            ctx.report(self.name, n + 1, len(traces))
        return out
