"""Stage ``probes``: cross-fitted probes on the stored features, their per-layer table and
``conf_probe`` (``probes.train``; process 0, on one device)."""

from __future__ import annotations

import numpy as np
from absl import logging

from experiments.stages import STEPS
from experiments.stages.context import PROBE, Context
from fcjax.store.tables import read_table


def run(ctx: Context) -> dict:
    if PROBE not in ctx.s.estimators:
        return {"skipped": "probe estimator not requested"}
    from probes import TooFewLabels
    from probes.train import run_probe_stage

    s = ctx.s
    try:
        return run_probe_stage(
            ctx.run.path,
            folds=s.folds,
            label=s.probe_label,
            seed=s.seed,
            families=s.probe_family,
            features=s.probe_features,
            batch_size=s.probe_batch,
            checkpoint=s.probe_checkpoint or None,
            reps=s.bootstrap,
            model_name=s.model,
        )
    except TooFewLabels as e:
        # a legitimate outcome of a small run, recorded in summary.json counts.not_scored;
        # anything else fails the run
        logging.warning("probe stage: no probe trained (%s); conf_probe left empty", e)
        n = len(read_table(ctx.run.path / STEPS, ["step"])["step"])
        ctx.run.add_columns("probes", STEPS, {"conf_probe": np.full(n, np.nan)})
        return {"not_scored": f"too few labels: {e}"}
