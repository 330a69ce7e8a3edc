"""Answer forcing (METHOD.md 4.5): how likely the model is to give its own final answer if
made to answer right after a step.

For step i the sequence is prompt + output tokens through the step's last token + an answer
cue + the tokens of the trace's final answer. The cue closes the reasoning block when there
is one ("\\n</think>\\n\\nFinal answer: ", used when the generation contains <think> or
</think> or the prompt ends inside an opened <think>), else "\\n\\nFinal answer: ".

conf_forcing = exp(mean log p(answer token)), the geometric mean of the answer tokens'
probabilities. Length-normalising keeps answers of different token lengths comparable (a
raw product would rate "1234" below "7" only for having more tokens), and keeps the value
in [0, 1]. forcing_logprob keeps the sum (the log-probability of the whole answer). Both NaN
when the trace has no answer.

Answer tokens are the natural tokenisation of the cue followed by the answer: cue + answer
is encoded; when the encoded cue is a prefix of it, the rest is the answer; else when the
cue without its trailing space is (a BPE tokenizer that merges the space into the answer,
" 42"), the rest is the answer; otherwise the cue and the answer are encoded separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fcjax.confidence.base import Columns, Estimator, EstimatorContext, nan_columns, register
from fcjax.confidence.trace import Trace
from fcjax.engine.scoring import score_after_cuts

PLAIN_CUE = "\n\nFinal answer: "
THINK_CUE = "\n</think>\n\nFinal answer: "


def answer_cue(lm, trace: Trace) -> str:
    """The cue after a step: close the think block when the step sits inside one."""
    if "<think>" in trace.text or "</think>" in trace.text:
        return THINK_CUE
    tail = lm.tokenizer.decode(trace.prompt_ids[-8:], skip_special_tokens=False)
    if "<think>" in tail and "</think>" not in tail.rsplit("<think>", 1)[-1]:
        return THINK_CUE
    return PLAIN_CUE


def cue_and_answer_ids(lm, cue: str, answer: str) -> tuple[list[int], list[int]]:
    """(cue ids, answer ids) with the answer tokenised as it would follow the cue."""
    full = lm.encode(cue + answer)
    for head in (lm.encode(cue), lm.encode(cue.rstrip(" "))):
        if len(full) > len(head) and full[: len(head)] == head:
            return head, full[len(head) :]
    return lm.encode(cue), lm.encode(answer)


@register
@dataclasses.dataclass(frozen=True)
class AnswerForcing(Estimator):
    """conf_forcing = geometric-mean probability of the trace's own answer tokens."""

    name = "forcing"
    trace_reduce = "last"

    def score(self, traces: Sequence[Trace], ctx: EstimatorContext) -> list[Columns]:
        results = [nan_columns(t.n_steps, "conf_forcing", "forcing_logprob") for t in traces]
        sequences, branches, where = [], [], []
        for n, trace in enumerate(traces):
            if trace.answer is None or not trace.answer.strip() or trace.n_steps == 0:
                continue
            cue_ids, ans_ids = cue_and_answer_ids(ctx.lm, answer_cue(ctx.lm, trace), trace.answer)
            if not ans_ids:
                continue
            # the trace once; after each step, the cue and the answer read its prefix, and
            # only the answer is scored
            sequences.append([*trace.prompt_ids, *trace.output_ids])
            cont, first = cue_ids + ans_ids, len(cue_ids)
            branches.append([(trace.prompt_len + s.token_end, cont, first) for s in trace.steps])
            where.append(n)
        logps = score_after_cuts(ctx.lm, sequences, branches)
        for n, per_step in zip(where, logps, strict=True):
            for i, answer in enumerate(per_step):  # log p of the answer tokens after the cue
                total = float(np.sum(answer, dtype=np.float64))
                results[n]["forcing_logprob"][i] = total
                results[n]["conf_forcing"][i] = float(np.exp(total / len(answer)))
        for n in range(len(traces)):
            ctx.report(self.name, n + 1, len(traces))
        return results
