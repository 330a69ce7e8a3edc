"""Stage ``segment``: the contract tables ``examples.parquet`` and ``steps.parquet``, one row
per example and one per step of its trace (process 0)."""

from __future__ import annotations

from experiments.stages import EXAMPLES, STEPS
from experiments.stages.context import Context
from experiments.stages.generate import stored_generations
from fcjax.store.tables import write_table_atomic

EXAMPLE_COLUMNS = (
    *("example_id", "question", "gold", "kind", "choices", "prediction", "correct", "scorable"),
    *("n_steps", "prompt", "prompt_ids", "output_ids", "text", "finish_reason"),
)
STEP_COLUMNS = (
    *("example_id", "step", "char_start", "char_end", "token_start", "token_end"),
    *("text", "position"),
)


def run(ctx: Context) -> dict:
    gens = stored_generations(ctx.run)
    ex_cols: dict[str, list] = {k: [] for k in EXAMPLE_COLUMNS}
    st_cols: dict[str, list] = {k: [] for k in STEP_COLUMNS}
    for e, tr in zip(ctx.examples(), ctx.traces(), strict=True):
        prompt, g = gens[str(e.id)]
        for key, value in (
            ("example_id", tr.example_id),
            ("question", e.question),
            ("gold", e.answer),
            ("kind", e.kind),
            ("choices", list(e.choices) if e.choices else None),
            ("prediction", tr.answer),
            ("correct", bool(tr.correct)),
            ("scorable", bool(tr.scorable)),
            ("n_steps", tr.n_steps),
            ("prompt", prompt),
            ("prompt_ids", tr.prompt_ids),
            ("output_ids", tr.output_ids),
            ("text", tr.text),
            ("finish_reason", g.finish_reason),
        ):
            ex_cols[key].append(value)
        n = tr.n_steps
        for step in tr.steps:
            for key, value in (
                ("example_id", tr.example_id),
                ("step", step.index),
                ("char_start", step.start),
                ("char_end", step.end),
                ("token_start", step.token_start),
                ("token_end", step.token_end),
                ("text", step.text),
                ("position", step.index / (n - 1) if n > 1 else 0.0),
            ):
                st_cols[key].append(value)
    write_table_atomic(ctx.run.path / STEPS, st_cols)
    write_table_atomic(ctx.run.path / EXAMPLES, ex_cols)
    return {
        "n_steps": len(st_cols["step"]),
        "no_steps": sum(n == 0 for n in ex_cols["n_steps"]),
        "no_answer": sum(p is None for p in ex_cols["prediction"]),
        "unscorable": sum(not x for x in ex_cols["scorable"]),
        "truncated": sum(f == "length" for f in ex_cols["finish_reason"]),
    }
