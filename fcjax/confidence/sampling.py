"""Prefix-conditioned sampling consistency (METHOD.md 4.3).

For each selected step i (``select_steps``: all steps up to ``ctx.max_steps``, else the
first, the last and a seeded random draw), the prefix is the prompt plus the output tokens
before the step (``prefix_tokens``: up to the first token whose char start is >= the step's
start). K = ``ctx.k`` continuations are sampled from every prefix of every trace in ONE
``branch_many`` call (temperature 0.8, top-p 0.95, at most 200 new tokens by default) with the
stop string "\\n\\n", so each continuation is its first paragraph. A judge then answers, for
each (sampled paragraph as context, original step text as assertion), whether they are
consistent: Yes = 0, No = 1, unparsable = 0.5; conf_sampling = 1 - mean over the K answers
(``consistency_score``). All K x steps judge prompts of all traces go in one ``complete`` call.

An empty paragraph (the continuation starts with a blank line, or is empty) is not sent to
the judge and counts as unparsable (0.5), like an unreadable judge reply; the reference
code instead falls back to the first 300 characters of the stripped sample.

Columns: conf_sampling, sampling_unparsed (replies counted as 0.5, empty paragraphs
included), sampling_n (answers per step); all NaN on steps that were not selected.
Through ``ctx.store`` it also keeps one record per continuation (``SAMPLE_COLUMNS``): the
judged paragraph, the judge's reply (None for an empty paragraph) and the verdict
(1 consistent, 0 not, NaN unparsable), which the runner writes to
``sampling_samples.parquet``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fcjax.confidence.base import (
    Columns,
    Estimator,
    EstimatorContext,
    EstimatorError,
    nan_columns,
    register,
)
from fcjax.confidence.consistency_judge import (
    build_consistency_prompt,
    consistency_score,
    paper_paragraph,
    parse_verdict,
    parse_verdict_paper,
)
from fcjax.confidence.trace import Trace, prefix_tokens
from fcjax.engine.generate import Generation, branch_many
from fcjax.text.steps import select_steps

PARAGRAPH_STOP = "\n\n"
# one record per continuation, kept through ``EstimatorContext.store``
SAMPLE_COLUMNS = ("example_id", "step", "sample", "paragraph", "reply", "consistent")


def step_cuts(trace: Trace, ctx: EstimatorContext) -> tuple[list[int], list[int]]:
    """(selected step indices, branch cut of each: token count of prompt + prefix).

    ``ctx.selected`` (the published run-wide draw) overrides ``select_steps``; under the
    published protocol step 0 branches from the bare prompt."""
    if ctx.selected is not None:
        chosen = [int(i) for i in ctx.selected[trace.example_id]]
    else:
        chosen = select_steps(trace.n_steps, ctx.max_steps, ctx.seed, key=trace.example_id)
    paper = ctx.protocol == "paper"
    cuts = [
        trace.prompt_len + (0 if paper and i == 0 else prefix_tokens(trace, trace.steps[i]))
        for i in chosen
    ]
    return chosen, cuts


def sample_from_steps(
    traces: Sequence[Trace], ctx: EstimatorContext, stop: tuple[str, ...]
) -> list[tuple[list[int], list[list[Generation]]]]:
    """Per trace, (selected steps, K continuations from each one's prefix). All traces go
    to ONE ``branch_many`` call, so their rows share every decode step; each trace's rows
    read only its own KV and are seeded by its example id, as ``branch`` would."""
    selected = [step_cuts(trace, ctx) for trace in traces]
    for trace, (chosen, _) in zip(traces, selected, strict=True):
        if chosen and trace.prompt_len == 0:
            raise EstimatorError(f"trace {trace.example_id!r} has an empty prompt")
    outs = branch_many(
        ctx.lm,
        [(trace.sequence, cuts) for trace, (_, cuts) in zip(traces, selected, strict=True)],
        ctx.k,
        ctx.branch_params(stop),
        keys=[trace.example_id for trace in traces],
    )
    return [(chosen, o) for (chosen, _), o in zip(selected, outs, strict=True)]


@register
@dataclasses.dataclass(frozen=True)
class SamplingConsistency(Estimator):
    """conf_sampling = 1 - mean judge verdict over K sampled first paragraphs."""

    name = "sampling"
    trace_reduce = "mean"
    needs_judge = True
    samples = True

    def score(self, traces: Sequence[Trace], ctx: EstimatorContext) -> list[Columns]:
        if ctx.judge_complete is None:
            raise EstimatorError(
                "sampling: EstimatorContext.judge_complete is None; pass a judge, e.g. "
                "fcjax.engine.complete.chat_completer(lm)"
            )
        paper = ctx.protocol == "paper"  # no stop: the judged paragraph is paper_paragraph's
        sampled = sample_from_steps(traces, ctx, () if paper else (PARAGRAPH_STOP,))
        parse = parse_verdict_paper if paper else parse_verdict
        prompts, slots = [], []  # slots[trace][(step, sample)] -> prompt index or None
        paragraphs = []  # per trace, flat like slots
        for trace, (chosen, outs) in zip(traces, sampled, strict=True):
            slots.append([])
            paragraphs.append([])
            for j, gens in zip(chosen, outs, strict=True):
                for g in gens:
                    if paper:
                        paragraph = paper_paragraph(g.text)
                    else:
                        paragraph = g.text.split(PARAGRAPH_STOP, 1)[0].strip()
                    paragraphs[-1].append(paragraph)
                    if paragraph or paper:  # the published judge also reads an empty one
                        slots[-1].append(len(prompts))
                        prompts.append(
                            build_consistency_prompt(
                                paragraph, trace.steps[j].text, ctx.consistency_prompt
                            )
                        )
                    else:
                        slots[-1].append(None)
        replies = ctx.judge_complete(prompts) if prompts else []  # every trace in one call
        if len(replies) != len(prompts):
            raise EstimatorError(
                f"sampling: judge returned {len(replies)} replies for {len(prompts)} prompts"
            )
        results = []
        kept: dict[str, list] = {c: [] for c in SAMPLE_COLUMNS}
        for trace, (chosen, _), trace_slots, texts in zip(
            traces, sampled, slots, paragraphs, strict=True
        ):
            cols = nan_columns(trace.n_steps, "conf_sampling", "sampling_unparsed", "sampling_n")
            for a, j in enumerate(chosen):
                step_slots = trace_slots[a * ctx.k : (a + 1) * ctx.k]
                step_replies = [None if s is None else replies[s] for s in step_slots]
                conf, unparsed = consistency_score(step_replies, parse)
                cols["conf_sampling"][j] = conf
                cols["sampling_unparsed"][j] = unparsed
                cols["sampling_n"][j] = len(step_replies)
                for i, reply in enumerate(step_replies):
                    verdict = parse(reply)  # Yes = 0 (consistent), No = 1, N/A = 0.5
                    for key, value in zip(
                        SAMPLE_COLUMNS,
                        (
                            trace.example_id,
                            j,
                            i,
                            texts[a * ctx.k + i],
                            reply,
                            float("nan") if verdict is None else 1.0 - verdict,
                        ),
                        strict=True,
                    ):
                        kept[key].append(value)
            results.append(cols)
        ctx.store(self.name, kept)
        ctx.report(self.name, len(traces), len(traces))
        return results
