"""LLM decisiveness judge (METHOD.md section 3), independent of the engine that runs it.

A judge model reads numbered, quoted reasoning steps and returns a JSON list with one
assertiveness score per step, 0.0 hesitant ... 1.0 decisive, anchored on a calibration scale
of hedging phrases (the ``ms_hedge`` phrase values, ``fcjax.data.CALIBRATED_PHRASES``).
A reply that is exactly a JSON list of n numbers in [0, 1] is read as it is; any other reply
is read by a fallback that takes the numbers in [0, 1] in order, truncated to n, with missing
steps left NaN (never guessed). Replies read by the fallback, and replies with no usable
number at all, are counted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from fcjax.data.interventions import CALIBRATED_PHRASES
from fcjax.text.chat import Messages
from fcjax.text.templates import check_template, fill

# placeholders a decisiveness prompt must contain; {scale} and {order} are optional
REQUIRED = ("n", "steps")

PROMPT = """\
Below are {n} numbered steps taken from a piece of reasoning. Rate each step for how \
assertively it is worded, from 0.0 (hesitant, non-committal, full of doubt) to 1.0 (stated \
with full conviction, leaving no room for doubt). Judge the wording only, not whether the \
step is correct, and rate every step on its own, without comparing it with the others.

Use this scale: a step whose claim carries one of these hedging phrases is worth about the \
number next to it.
{scale}
A plain assertion with no hedge ("The answer is 100.", "This is supported.") is 1.0.

From most to least assertive, the hedges rank: {order}.

A step that makes no claim of its own (it plans what to do next, restates the question, or \
moves on) is rated 1.0.

Steps:
{steps}

Reply with only a JSON array of {n} numbers between 0.0 and 1.0, one per step, in the same \
order, for example [0.45, 1.0, 0.12]."""


def _by_value() -> list[tuple[str, float]]:
    return sorted(CALIBRATED_PHRASES.items(), key=lambda kv: -kv[1])


def calibration_scale() -> str:
    """The hedging phrases with their values, most assertive first, one per line."""
    return "\n".join(f'- "{p}": {v:.2f}' for p, v in _by_value())


def hedge_order() -> str:
    """The hedging phrases ordered from most to least assertive, joined by " > "."""
    return " > ".join(f'"{p}"' for p, _ in _by_value())


def format_steps(steps: Sequence[str]) -> str:
    """One line per step: its number and its text quoted, newlines flattened to spaces."""
    return "\n".join(f'{i + 1}. "{" ".join(s.split())}"' for i, s in enumerate(steps))


def reply_budget(n: int) -> int:
    """Tokens a judge reply for n steps may use: max(50, 12 n)."""
    return max(50, 12 * n)


def build_judge_prompt(steps: Sequence[str], template: str = PROMPT) -> Messages:
    """One user message asking the judge to rate ``steps`` (``template`` placeholders:
    {n}, {steps}, and optionally {scale} and {order})."""
    if not steps:
        raise ValueError("build_judge_prompt: no steps to rate")
    check_template(template, REQUIRED, "decisiveness prompt")
    content = fill(
        template,
        n=len(steps),
        steps=format_steps(steps),
        scale=calibration_scale(),
        order=hedge_order(),
    )
    return [{"role": "user", "content": content}]


_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
_THINK_END = re.compile(r"</think>", re.IGNORECASE)
# a list marker at the start of a line ("3." / "3)" / "Step 3:") is not a score
_MARKER = re.compile(r"^\s*(?:step\s*)?\d+\s*[.:)](?=\s)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)")

JSON, FALLBACK, FAILED = "json", "fallback", "failed"


def _strict(body: str, n: int) -> np.ndarray | None:
    if not (body.startswith("[") and body.endswith("]")):
        return None
    try:
        values = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(values, list) or len(values) != n:
        return None
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            return None
    return np.asarray(values, dtype=np.float64)


def parse_judge_reply(reply: str | None, n: int) -> tuple[np.ndarray, str]:
    """(float64 [n] scores, how) from a judge reply.

    how = "json" when the reply (after a reasoning block ending in </think>, optionally in a
    ```json fence) is exactly a JSON list of n numbers in [0, 1]. Otherwise "fallback": the
    numbers in [0, 1] of the reply, in order (list markers such as "3." at a line start
    skipped), truncated to n, NaN for steps left without one; "failed" when there is none.
    """
    missing = np.full(n, np.nan)
    if not isinstance(reply, str):
        return missing, FAILED
    body = _THINK_END.split(reply)[-1].strip()
    fenced = _FENCE.match(body)
    strict = _strict(fenced.group(1).strip() if fenced else body, n)
    if strict is not None:
        return strict, JSON
    values = [float(m) for m in _NUMBER.findall(_MARKER.sub(" ", body))]
    values = [v for v in values if 0.0 <= v <= 1.0][:n]
    if not values:
        return missing, FAILED
    missing[: len(values)] = values
    return missing, FALLBACK


class Judged(NamedTuple):
    """One trace's decisiveness: scores [n_steps] (NaN = missing) and how many of its judge
    replies were read by the fallback parser or gave no score at all."""

    scores: np.ndarray
    fallback: int
    failed: int


def judge_decisiveness(
    steps: Sequence[str],
    complete: Callable[[list[Messages]], list[str]],
    batch_size: int = 20,
    template: str = PROMPT,
) -> Judged:
    """Rates every step of one trace with the judge.

    Steps go to the judge ``batch_size`` at a time (the study: 20). ``complete`` maps a list
    of chat-message lists to one reply string each; all batches are sent in one call, and
    should allow ``reply_budget(batch_size)`` new tokens.
    """
    return judge_traces([steps], complete, batch_size, template)[0]


def judge_traces(
    traces: Sequence[Sequence[str]],
    complete: Callable[[list[Messages]], list[str]],
    batch_size: int = 20,
    template: str = PROMPT,
) -> list[Judged]:
    """``judge_decisiveness`` for many traces with ONE ``complete`` call, so the engine
    decodes every trace's judge prompt in the same batch. A batch never mixes traces."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spans = [(t, s) for t, steps in enumerate(traces) for s in range(0, len(steps), batch_size)]
    prompts = [build_judge_prompt(traces[t][s : s + batch_size], template) for t, s in spans]
    replies = complete(prompts) if prompts else []
    if len(replies) != len(prompts):
        raise ValueError(f"complete() returned {len(replies)} replies for {len(prompts)} prompts")
    out = [Judged(np.full(len(steps), np.nan), 0, 0) for steps in traces]
    for (t, s), reply in zip(spans, replies, strict=True):
        batch, how = parse_judge_reply(reply, min(batch_size, len(traces[t]) - s))
        out[t].scores[s : s + len(batch)] = batch
        out[t] = out[t]._replace(
            fallback=out[t].fallback + (how == FALLBACK), failed=out[t].failed + (how == FAILED)
        )
    return out
