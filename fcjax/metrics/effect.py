"""The published intervention effect: the change in point cMFG* per (model, dataset) cell.

The study reports an intervention's effect as, for each (model, dataset) cell with a blank
run and an intervention run (each over all of its valid traces), the intervention's mean
cMFG* over RCC, DeepConf and sampling minus the blank run's, then the mean (and standard
error) of those changes over cells. The published figures read cMFG* from summary.txt,
printed to 3 decimals, so ``decimals=3`` rounds each cMFG* first (None: full precision); a
run missing any of the three is left out, as the published analysis drops it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

PAPER_ESTIMATORS = ("rcc", "deepconf", "sampling")
BLANK = "blank"


def mean_cmfg_star(
    summary: Mapping[str, Any],
    estimators: Sequence[str] = PAPER_ESTIMATORS,
    decimals: int | None = 3,
) -> float | None:
    """Mean of the estimators' point cMFG* in a ``summary.json``; None if any is missing."""
    values = []
    for name in estimators:
        value = (summary.get("estimators", {}).get(name) or {}).get("cmfg_star")
        if value is None or not math.isfinite(value):
            return None
        values.append(round(value, decimals) if decimals is not None else value)
    return sum(values) / len(values)


def condition(summary: Mapping[str, Any]) -> str:
    """A run's intervention label: "blank", "perception", "ms_hedge+perception" (system +
    user turn; the study's msh_perc), from its recorded config."""
    config = summary.get("config", {})
    system, user = config.get("system_intervention") or BLANK, config.get("intervention") or BLANK
    if system == BLANK:
        return user
    return system if user == BLANK else f"{system}+{user}"


def cell(summary: Mapping[str, Any]) -> tuple[str, str]:
    """A run's (model, dataset) cell, from its recorded config."""
    config = summary.get("config", {})
    return str(config.get("model")), str(config.get("dataset") or config.get("data_path"))


def intervention_effect(
    pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
    estimators: Sequence[str] = PAPER_ESTIMATORS,
    decimals: int | None = 3,
) -> dict[str, Any]:
    """The published effect over (blank summary, intervention summary) pairs, one per cell.

    Returns {"effect": mean change over the cells that have both means (None when none),
    "sem": its standard error (std with ddof 1 / sqrt(n); 0.0 for one cell, as published),
    "n_cells", "deltas": the change per pair (None where a run lacks an estimator)}.
    """
    deltas = []
    for base, treated in pairs:
        a, b = (
            mean_cmfg_star(treated, estimators, decimals),
            mean_cmfg_star(base, estimators, decimals),
        )
        deltas.append(None if a is None or b is None else a - b)
    kept = [d for d in deltas if d is not None]
    n = len(kept)
    mean = sum(kept) / n if n else None
    if n > 1:
        sem = math.sqrt(sum((d - mean) ** 2 for d in kept) / (n - 1)) / math.sqrt(n)
    else:
        sem = 0.0 if n else None
    return {"effect": mean, "sem": sem, "n_cells": n, "deltas": deltas}


def effects_by_condition(
    summaries: Sequence[Mapping[str, Any]],
    estimators: Sequence[str] = PAPER_ESTIMATORS,
    decimals: int | None = 3,
) -> dict[str, dict[str, Any]]:
    """``intervention_effect`` for every non-blank condition among ``summaries``, each
    paired with the blank run of its cell (cells without a blank run are left out)."""
    blanks = {cell(s): s for s in summaries if condition(s) == BLANK}
    pairs: dict[str, list] = {}
    for s in summaries:
        label = condition(s)
        if label != BLANK and cell(s) in blanks:
            pairs.setdefault(label, []).append((blanks[cell(s)], s))
    return {k: intervention_effect(v, estimators, decimals) for k, v in pairs.items()}


def effect_lines(effects: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per condition: the published effect, its SEM and the number of cells."""
    lines = [
        "Published intervention effect: per (model, dataset) cell, the change in mean point "
        "cMFG* (RCC, DeepConf, sampling; 3-decimal values) vs the cell's blank run, averaged "
        "over cells:"
    ]
    if not effects:
        lines.append("  (no intervention run with a blank run of the same model and dataset)")
    for label, e in effects.items():
        value = "n/a" if e["effect"] is None else f"{e['effect']:+.4f} ± {e['sem']:.4f} (SEM)"
        lines.append(f"  {label}: {value}, {e['n_cells']} cell(s)")
    return "\n".join(lines)
