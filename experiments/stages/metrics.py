"""Stage ``metrics``: the faithfulness columns and ``summary.json``, from the two tables
alone (process 0)."""

from __future__ import annotations

from experiments.stages import EXAMPLES, STAGES, STEPS
from experiments.stages import estimators as estimators_stage
from experiments.stages.context import PROBE, Context
from fcjax.confidence.base import get_estimator
from fcjax.metrics import summarize, trace_columns
from fcjax.metrics.trajectory import trajectory_bin
from fcjax.store.tables import read_table, write_json_atomic


def run(ctx: Context) -> dict:
    s, rd = ctx.s, ctx.run
    steps, examples = read_table(rd.path / STEPS), read_table(rd.path / EXAMPLES)
    estimators = {n: get_estimator(n).trace_reduce for n in s.estimators if f"conf_{n}" in steps}
    step_cols, ex_cols = trace_columns(steps, examples, estimators)
    step_cols["trajectory_bin"] = trajectory_bin(
        steps["position"], closed=s.proto.trajectory_closed
    )
    rd.add_columns("metrics", STEPS, step_cols)
    rd.add_columns("metrics", EXAMPLES, ex_cols)
    probe_info = rd.info("probes")
    not_scored = {PROBE: probe_info["not_scored"]} if "not_scored" in probe_info else {}
    decisiveness = rd.info("decisiveness")
    summary = summarize(
        steps,
        examples,
        estimators,
        not_scored=not_scored,
        stage_wall_s={st: rd.info(st).get("wall_s") for st in STAGES if rd.done(st)},
        config=s.config(),
        binning=s.binning,
        bootstrap=s.bootstrap,
        seed=s.seed,
        counts={
            "decisiveness_judge": s.decisiveness_judge,
            "decisiveness_fallback": decisiveness.get("judge_fallback_batches", 0),
            "decisiveness_failed": decisiveness.get("judge_failed_batches", 0),
            "protocol_notes": ctx.judge_notes(estimators_stage.needs_judge(ctx)),
        },
        protocol=s.protocol,
    )
    write_json_atomic(rd.path / "summary.json", summary)
    return {"estimators": list(estimators)}
