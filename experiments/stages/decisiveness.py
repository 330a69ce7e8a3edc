"""Stage ``decisiveness``: D of every step, from the judge model (each process judges its
share of the traces, a part per batch) or the lexicon; process 0 merges into
``steps.parquet``."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from experiments.rundir import Progress
from experiments.stages import STEPS
from experiments.stages.context import Context
from fcjax.decisiveness.judge import judge_options, judge_traces, reply_budget
from fcjax.decisiveness.lexicon import lexicon_scores
from fcjax.engine.complete import chat_completer
from fcjax.store.tables import align_step_columns, read_table


def work(ctx: Context) -> int:
    """The judge's replies for this process's traces (the lexicon needs no model)."""
    s = ctx.s
    if s.decisiveness != "judge":
        return 0
    steps = read_table(ctx.run.path / STEPS, ["example_id", "step", "text"])
    texts = list(steps["text"])
    sampling, judging = judge_options(s.proto.judges)
    complete = chat_completer(
        ctx.decisiveness_lm, max_new_tokens=reply_budget(s.judge_batch), **sampling
    )
    template = ctx.template("decisiveness")
    eids = np.asarray(steps["example_id"]).astype(str)
    n_steps = Counter(eids.tolist())
    mine = ctx.my_parts(
        "decisiveness",
        list(n_steps),  # the traces with steps, in table order
        key=str,
        cost=lambda eid: n_steps[eid],  # the judge reads every step
        size=max(1, s.batch_size // 2),
    )
    progress = Progress("decisiveness judge", sum(len(c) for _, c in mine), "traces")
    for index, chunk in mine:
        out: dict[str, list] = {k: [] for k in ("example_id", "step", "d", "fallback", "failed")}
        rows = [np.flatnonzero(eids == eid) for eid in chunk]
        judged = judge_traces(
            [[texts[r] for r in rs] for rs in rows],
            complete,
            batch_size=s.judge_batch,
            template=template,
            **judging,
        )
        for eid, rs, j in zip(chunk, rows, judged, strict=True):
            out["example_id"] += [eid] * len(rs)
            out["step"] += np.asarray(steps["step"])[rs].tolist()
            out["d"] += j.scores.tolist()
            out["fallback"] += [j.fallback] * len(rs)
            out["failed"] += [j.failed] * len(rs)
        ctx.run.write_part("decisiveness", index, out)
        progress.update(len(chunk))
    return progress.done


def merge(ctx: Context) -> dict:
    s = ctx.s
    steps = read_table(ctx.run.path / STEPS, ["example_id", "step", "text"])
    cols = {"decisiveness_lexicon": lexicon_scores(list(steps["text"]))}
    info: dict[str, Any] = {"source": s.decisiveness, "judge": s.decisiveness_judge}
    if s.decisiveness == "judge":
        parts = ctx.run.read_parts("decisiveness")
        merged = align_step_columns(steps, parts)
        cols["decisiveness_judge"] = merged["d"]
        cols["decisiveness"] = merged["d"]
        for key in ("fallback", "failed"):  # replies (batches), counted once per trace
            per_trace = dict(zip(parts["example_id"], parts[key], strict=True))
            info[f"judge_{key}_batches"] = int(sum(per_trace.values()))
        info["judge_missing_steps"] = int(np.isnan(merged["d"]).sum())
    else:
        cols["decisiveness"] = cols["decisiveness_lexicon"]
    ctx.run.add_columns("decisiveness", STEPS, cols)
    return info
