"""Summaries of faithfulness, calibration, estimator agreement and step trajectories."""

from fcjax.metrics.agreement import kendall, pairwise_agreement, rankdata, spearman
from fcjax.metrics.bootstrap import (
    auroc_permutation_p,
    bootstrap_intervals,
    match_ids,
    paired_differences,
)
from fcjax.metrics.calibration import auroc, brier, ece, prr, reliability_bins
from fcjax.metrics.effect import effects_by_condition, intervention_effect
from fcjax.metrics.faithfulness import cmfg, cmfg_star, mfg, step_faithfulness
from fcjax.metrics.summary import summarize, trace_columns, trace_confidence
from fcjax.metrics.trajectory import trajectory_bin, trajectory_bins

__all__ = [
    "auroc",
    "auroc_permutation_p",
    "bootstrap_intervals",
    "brier",
    "cmfg",
    "cmfg_star",
    "ece",
    "effects_by_condition",
    "intervention_effect",
    "kendall",
    "match_ids",
    "mfg",
    "paired_differences",
    "pairwise_agreement",
    "prr",
    "rankdata",
    "reliability_bins",
    "spearman",
    "step_faithfulness",
    "summarize",
    "trace_columns",
    "trace_confidence",
    "trajectory_bin",
    "trajectory_bins",
]
