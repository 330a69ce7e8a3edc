"""Answer agreement and semantic entropy from step prefixes (METHOD.md 4.3, fcjax variants).

For each selected step (the same selection and prefixes as sampling consistency), K full
continuations are sampled from the prefix (one ``branch`` call per trace, no stop string,
``ctx.max_new_tokens`` new tokens) and their final answers extracted. conf_agreement is the
fraction of the K whose answer matches the trace's own final answer (``score_answer`` with
the trace's own answer as gold, by the dataset kind; when the trace's answer cannot serve
as gold for that kind, e.g. a numeric set whose trace answered in words, normalised string
equality). NaN when the trace has no answer.

agreement_entropy is the semantic entropy of the K answers: answers are clustered by
normalised equality (a number's value for numeric sets, else case- and space-folded text;
continuations with no answer form one cluster), H = -sum_c p_c log p_c over cluster
frequencies, divided by log K so it lies in [0, 1] (0 when K = 1). A budget too short to
reach an answer lowers agreement and merges into the no-answer cluster, so keep
``ctx.max_new_tokens`` near the length of a full trace.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from fcjax.confidence.base import Columns, Estimator, EstimatorContext, nan_columns, register
from fcjax.confidence.sampling import sample_from_steps
from fcjax.confidence.trace import Trace
from fcjax.text.answers import extract_answer, score_answer

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def answer_key(answer: str | None, kind: str) -> str | None:
    """Cluster key: None for no answer; a number's value for numeric kinds; else the text
    lower-cased with markdown, $ and surrounding/internal runs of whitespace folded."""
    if answer is None:
        return None
    s = answer.replace("**", "").replace("$", "").strip().rstrip(".").strip()
    if kind == "numeric":
        plain = s.replace(",", "").replace(" ", "")
        if _NUMBER.fullmatch(plain):
            return repr(float(plain))
    return re.sub(r"\s+", " ", s.lower())


def same_answer(pred: str | None, ref: str, kind: str, choices=None) -> bool:
    """Whether ``pred`` gives the answer ``ref`` (the trace's own): ``score_answer`` with
    ``ref`` as gold; normalised equality when ``ref`` is not a valid gold for ``kind``."""
    if pred is None:
        return False
    try:
        return score_answer(pred, ref, kind, list(choices) if choices else None)
    except ValueError:
        return answer_key(pred, kind) == answer_key(ref, kind)


def semantic_entropy(keys: Sequence[str | None]) -> float:
    """Entropy of the cluster frequencies of ``keys`` divided by log(len(keys))."""
    n = len(keys)
    if n == 0:
        return float("nan")
    if n == 1:
        return 0.0
    counts = np.asarray(list(Counter(keys).values()), np.float64)
    p = counts / n
    return float(-(p * np.log(p)).sum() / math.log(n))


@register
@dataclasses.dataclass(frozen=True)
class AnswerAgreement(Estimator):
    """conf_agreement = fraction of K continuations reaching the trace's answer."""

    name = "agreement"
    trace_reduce = "mean"
    samples = True

    def score(self, traces: Sequence[Trace], ctx: EstimatorContext) -> list[Columns]:
        results = []
        sampled = sample_from_steps(traces, ctx, ())
        for n, (trace, (chosen, outs)) in enumerate(zip(traces, sampled, strict=True)):
            cols = nan_columns(trace.n_steps, "conf_agreement", "agreement_entropy")
            for j, gens in zip(chosen, outs, strict=True):
                answers = [extract_answer(g.text) for g in gens]
                cols["agreement_entropy"][j] = semantic_entropy(
                    [answer_key(a, trace.kind) for a in answers]
                )
                if trace.answer is not None:
                    hits = [
                        same_answer(a, trace.answer, trace.kind, trace.choices) for a in answers
                    ]
                    cols["conf_agreement"][j] = float(np.mean(hits))
            results.append(cols)
            ctx.report(self.name, n + 1, len(traces))
        return results
