"""A run's summary from its two tables: what ``summary.json`` holds (METHOD.md section 5).

``steps`` and ``examples`` are the run directory's tables as ``{column: values}`` (e.g.
``fcjax.store.read_table``). ``steps`` needs ``example_id, position, decisiveness`` and
``conf_E`` per estimator E; ``examples`` needs ``example_id, correct, n_steps, prediction,
finish_reason`` (``scorable`` optional). ``estimators`` maps each E to its trace reduction
(``"mean"`` or ``"last"``, the estimator's ``trace_reduce``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from fcjax.metrics.agreement import pairwise_agreement
from fcjax.metrics.bootstrap import bootstrap_intervals
from fcjax.metrics.calibration import auroc, brier, ece
from fcjax.metrics.faithfulness import cmfg, cmfg_star, mfg, step_faithfulness
from fcjax.metrics.trajectory import trajectory_bins
from fcjax.plain import to_python
from fcjax.protocol import PROTOCOLS, get_protocol

Reduce = Literal["mean", "last"]
Table = Mapping[str, Any]


def trace_confidence(values: Any, reduce: Reduce) -> float:
    """Trace-level confidence from step values; NaN and inf entries are ignored.

    mean: the mean of the finite values. last: the last finite value (for the estimators
    that use it, RCC and forcing, every step is scored, so this is the last step's value).
    NaN when no value is finite.
    """
    if reduce not in ("mean", "last"):
        raise ValueError(f"reduce must be 'mean' or 'last', got {reduce!r}")
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(v.mean() if reduce == "mean" else v[-1])


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _f(x) -> float | None:
    """A JSON number, or None for a missing (non-finite) value."""
    x = float(x)
    return x if np.isfinite(x) else None


def _require(table: Table, names: list[str], what: str) -> None:
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"summarize: {what} table lacks column(s) {missing}; has {sorted(table)}")


def trace_columns(
    steps: Table, examples: Table, estimators: Mapping[str, Reduce]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The faithfulness columns of a run: ``faith_E`` per step (``1 - |D - C|``), and per
    example ``conf_E`` (the steps reduced by E's rule) and ``faith_E`` (mean over its
    scored steps). Returns (step columns, example columns)."""
    _require(steps, ["example_id", "decisiveness", *(f"conf_{n}" for n in estimators)], "steps")
    _require(examples, ["example_id"], "examples")
    eids = np.asarray(steps["example_id"]).astype(str)
    ex_ids = np.asarray(examples["example_id"]).astype(str)
    rows = {e: np.flatnonzero(eids == e) for e in ex_ids}
    d = np.asarray(steps["decisiveness"], float)
    step_cols, ex_cols = {}, {}
    for name, reduce in estimators.items():
        conf = np.asarray(steps[f"conf_{name}"], float)
        faith = step_faithfulness(d, conf)
        step_cols[f"faith_{name}"] = faith
        ex_cols[f"conf_{name}"] = np.array(
            [trace_confidence(conf[rows[e]], reduce) for e in ex_ids]
        )
        ex_cols[f"faith_{name}"] = np.array([_nanmean(faith[rows[e]]) for e in ex_ids])
    return step_cols, ex_cols


def summarize(
    steps: Table,
    examples: Table,
    estimators: Mapping[str, Reduce],
    *,
    not_scored: Mapping[str, str] | None = None,
    stage_wall_s: Mapping[str, float] | None = None,
    config: Mapping[str, Any] | None = None,
    binning: str = "closed",
    bootstrap: int = 0,
    seed: int = 0,
    counts: Mapping[str, Any] | None = None,
    protocol: str | None = None,
) -> dict:
    """The run summary, exactly as ``summary.json`` holds it.

    Per estimator: MFG, cMFG (``binning``: see ``cmfg``), cMFG* over traces with a confidence
    and a faithfulness (confidence clipped to [0, 1]); ECE, Brier, AUROC and mean confidence
    over traces with a confidence. Traces whose answer cannot be scored (``scorable`` false)
    are left out of these and counted under ``counts.unscorable``. ``bootstrap`` > 0 adds
    seeded 95% intervals over ``bootstrap`` resamples of the questions and the AUROC
    permutation p (``bootstrap_intervals``). Then step-level agreement of D and every
    estimator (Spearman, Kendall), trajectories over step position, counts (plus the given
    ``counts``), and the given ``protocol``, ``stage_wall_s`` and ``config``. Under a
    protocol with published scoring ("paper") accuracy is over the scorable traces only and
    trajectories use its bins (``fcjax.protocol.Protocol.trajectory_closed``). ``not_scored``
    names estimators that legitimately produced no values, with the reason (recorded under
    ``counts.not_scored``). Missing values are ``None``.
    """
    _require(steps, ["position"], "steps")
    _require(examples, ["correct", "n_steps", "prediction", "finish_reason"], "examples")
    step_cols, ex_cols = trace_columns(steps, examples, estimators)
    d = np.asarray(steps["decisiveness"], float)
    correct = np.asarray(examples["correct"], float)
    # traces whose answer cannot be scored are left out of the estimator summaries
    scored = np.asarray(examples.get("scorable", np.ones(len(correct), bool)), bool)
    proto = get_protocol(protocol) if protocol is not None else PROTOCOLS["fcjax"]
    graded = scored if proto.scoring == "paper" else np.ones(len(correct), bool)
    per_estimator = {}
    for name in estimators:
        conf = np.asarray(steps[f"conf_{name}"], float)
        ex_conf, ex_faith = ex_cols[f"conf_{name}"], ex_cols[f"faith_{name}"]
        ok = np.isfinite(ex_conf) & np.isfinite(ex_faith) & scored
        ok_c = np.isfinite(ex_conf) & scored
        c_ok = np.clip(ex_conf[ok], 0, 1)
        per_estimator[name] = {
            "mfg": _f(mfg(ex_faith[ok])),
            "cmfg": _f(cmfg(ex_faith[ok], c_ok, binning=binning)),
            "cmfg_star": _f(cmfg_star(ex_faith[ok], c_ok)),
            "ece": _f(ece(ex_conf[ok_c], correct[ok_c])),
            "brier": _f(brier(ex_conf[ok_c], correct[ok_c])),
            "auroc": _f(auroc(ex_conf[ok_c], correct[ok_c])),
            "mean_conf": _f(_nanmean(ex_conf[ok_c])),
            "n_traces": int(ok.sum()),
            "n_steps_scored": int(np.isfinite(conf).sum()),
        }
        if bootstrap:
            per_estimator[name].update(
                bootstrap_intervals(
                    np.where(scored, ex_faith, np.nan),
                    np.clip(ex_conf, 0, 1),
                    np.where(scored, correct, np.nan),
                    reps=bootstrap,
                    seed=seed,
                    binning=binning,
                )
            )
    conf_steps = {n: np.asarray(steps[f"conf_{n}"], float) for n in estimators}
    faith_steps = {f"faith_{n}": step_cols[f"faith_{n}"] for n in estimators}
    position = np.asarray(steps["position"], float)
    return to_python(
        {
            "n_examples": len(correct),
            "accuracy": _f(np.mean(correct[graded]) if graded.any() else np.nan),
            "estimators": per_estimator,
            "agreement": pairwise_agreement({"decisiveness": d, **conf_steps})
            if estimators
            else {},
            "trajectory": trajectory_bins(
                position,
                {"decisiveness": d, **conf_steps, **faith_steps},
                closed=proto.trajectory_closed,
            ),
            "counts": {
                "no_steps": int(np.sum(np.asarray(examples["n_steps"]) == 0)),
                "no_answer": int(sum(p is None for p in examples["prediction"])),
                "unscorable": int((~scored).sum()),
                "truncated": int(sum(f == "length" for f in examples["finish_reason"])),
                "steps": len(d),
                "decisiveness_missing": int(np.isnan(d).sum()),
                "not_scored": dict(not_scored or {}),
                **dict(counts or {}),
            },
            **({"protocol": protocol} if protocol is not None else {}),
            "stage_wall_s": dict(stage_wall_s or {}),
            "config": dict(config or {}),
        }
    )
