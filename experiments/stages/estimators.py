"""Stage ``estimators``: every requested estimator but the probe scores every step of every
trace with steps; each process scores its share of the traces, a part per batch, and
process 0 merges the parts into ``steps.parquet`` (and kept records into
``<estimator>_samples.parquet``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.rundir import Progress
from experiments.stages import STEPS
from experiments.stages.context import PROBE, Context
from fcjax.confidence.base import EstimatorContext, check_columns, get_estimator
from fcjax.confidence.consistency_judge import PROMPT as CONSISTENCY_PROMPT
from fcjax.confidence.consistency_judge import REPLY_TOKENS as CONSISTENCY_TOKENS
from fcjax.engine.complete import chat_completer
from fcjax.store.tables import align_step_columns, read_table, write_table_atomic
from fcjax.text.steps import paper_selection


def names(ctx: Context) -> list[str]:
    """The estimators this stage runs (``--estimators`` without the probe)."""
    return [n for n in ctx.s.estimators if n != PROBE]


def needs_judge(ctx: Context) -> bool:
    return any(get_estimator(n).needs_judge for n in names(ctx))


def estimator_context(ctx: Context) -> EstimatorContext:
    judge = (
        chat_completer(ctx.judge_lm, max_new_tokens=CONSISTENCY_TOKENS)
        if needs_judge(ctx)
        else None
    )
    s = ctx.s
    return EstimatorContext(
        ctx.lm,
        judge,
        k=s.k,
        max_steps=s.max_steps,
        seed=s.seed,
        temperature=s.branch_temperature,
        top_p=s.branch_top_p,
        max_new_tokens=s.branch_new_tokens,
        consistency_prompt=ctx.template("consistency") if judge else CONSISTENCY_PROMPT,
        protocol=s.proto.judges,
    )


def work(ctx: Context) -> int:
    s = ctx.s
    every = ctx.traces()
    traces = [t for t in every if t.n_steps > 0]
    est_ctx = estimator_context(ctx)
    if s.proto.step_draw == "paper":  # one draw for the whole run, in example order
        ids, counts = [t.example_id for t in every], [t.n_steps for t in every]
        chosen = paper_selection(ids, counts, s.max_steps, s.proto.study_seed)
        est_ctx = dataclasses.replace(est_ctx, selected=chosen)
    done: set[str] = set()
    for name in names(ctx):
        estimator = get_estimator(name)
        part = f"estimators_{name}"
        kept_part = f"{part}_kept"  # records kept through ctx.store (e.g. samples)
        # expected cost: the trace's tokens plus the continuations of its scored steps
        mine = ctx.my_parts(
            part,
            traces,
            key=lambda t: t.example_id,
            cost=lambda t: (
                len(t.output_ids) + min(t.n_steps, s.max_steps) * s.k * s.branch_new_tokens
            ),
            # a part per batch of forward passes, or per quarter batch of sampling traces
            # (K continuations from each step): fewer, larger calls compile fewer shapes
            size=max(1, s.batch_size // 4) if estimator.samples else s.batch_size,
        )
        progress = Progress(f"estimator {name}", sum(len(c) for _, c in mine), "traces")
        for index, chunk in mine:
            kept: dict[str, list] = {}
            results = estimator.score(
                chunk,
                dataclasses.replace(est_ctx, keep=lambda _, rows, kept=kept: _extend(kept, rows)),
            )
            if kept:  # before the columns part, which marks the batch done
                ctx.run.write_part(kept_part, index, kept)
            cols: dict[str, list] = {"example_id": [], "step": []}
            for tr, res in zip(chunk, results, strict=True):
                res = check_columns(estimator, tr, res)
                cols["example_id"] += [tr.example_id] * tr.n_steps
                cols["step"] += list(range(tr.n_steps))
                for key, value in res.items():
                    cols.setdefault(key, []).extend(np.asarray(value, float).tolist())
            ctx.run.write_part(part, index, cols)
            progress.update(len(chunk))
            done.update(t.example_id for t in chunk)
    return len(done)


def merge(ctx: Context) -> dict:
    steps = read_table(ctx.run.path / STEPS, ["example_id", "step"])
    order = [str(e.id) for e in ctx.examples()]
    columns: dict[str, np.ndarray] = {}
    for name in names(ctx):
        part = f"estimators_{name}"
        columns.update(align_step_columns(steps, ctx.run.read_parts(part)))
        kept = ctx.run.read_parts(f"{part}_kept", order=order)  # in example order
        if kept:
            write_table_atomic(ctx.run.path / f"{name}_samples.parquet", kept)
    if columns:
        ctx.run.add_columns("estimators", STEPS, columns)
    return {"estimators": names(ctx)}


def _extend(columns: dict[str, list], rows: dict[str, list]) -> None:
    for key, values in rows.items():
        columns.setdefault(key, []).extend(values)
