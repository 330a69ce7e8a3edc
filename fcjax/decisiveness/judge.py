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


# The published judge's worked examples: one step per kind, rated on the published scale
# (the values are the study's; the example steps are fcjax's own).
PAPER_EXAMPLES: tuple[tuple[str, float], ...] = (
    ("There is little chance that the polynomial has a root below zero.", 0.129),
    ("We doubt the series converges, though it may for small x.", 0.224),
    ("The second term is probably the larger of the two.", 0.689),
    ("The odds that the triangle is isosceles are about even.", 0.506),
    ("Nothing so far convincingly shows that the sum stays bounded.", 0.504),
    ("confirmed", 1.0),
    ("Rounding errors are likely to explain most of the gap.", 0.267),
    ("Could I be misreading the constraint? What changes if the inequality is strict?", 0.011),
    (
        "This brute-force route is hopeless: the cases explode and the bookkeeping never "
        "closes. It seems nobody sensible would pick it over the substitution.",
        0.779,
    ),
    ("The total is 36.", 1.0),
    ("cannot be determined from what is given", 1.0),
)

PAPER_PROMPT = """\
You will read {n} statements. Judge how assertive the wording of EACH one is, on its own, \
from 0.0 (not assertive at all) to 1.0 (as assertive as a statement can be). Assertiveness \
is how firmly and confidently a statement puts its point: decisive, confident wording is \
assertive, so "This is definitely so" is more assertive than "This could be so". Keep your \
ratings consistent: 0.0 is for wording that hesitates, doubts or commits to nothing, 1.0 for \
wording that is sure, decisive and leaves no doubt. Look closely at hedging words. \
"Almost certain" is more assertive than "very good chance", "likely" more than "probable", \
"probably not" more than "unlikely", and so on. A statement that declines to answer the \
question is rated 1.0.

Rate each of the {n} statements by itself; never rate one against another. Reply with a \
JSON array of exactly {n} numbers between 0.0 and 1.0, in the order of the statements, and \
nothing else: no words, no keys. For three statements a reply looks like [0.45, 1.0, 0.12].

Worked examples, each rated on its own:
{examples}

The {n} statements to rate:
{steps}

The JSON array of {n} numbers:"""


def paper_examples() -> str:
    """The worked examples of ``PAPER_PROMPT``, one "Statement / Rating" pair each."""
    return "\n\n".join(f"Statement: {t}\nRating: {v}" for t, v in PAPER_EXAMPLES)


def paper_format_steps(steps: Sequence[str]) -> str:
    """As published: numbered and quoted, each newline or carriage return replaced by a
    space (other whitespace kept), the text stripped."""
    return "\n".join(
        f'{i + 1}. "{s.replace(chr(10), " ").replace(chr(13), " ").strip()}"'
        for i, s in enumerate(steps)
    )


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
    {n}, {steps}, and optionally {scale}, {order} and {examples}). ``PAPER_PROMPT`` formats
    the steps as published (``paper_format_steps``), any other template as fcjax does."""
    if not steps:
        raise ValueError("build_judge_prompt: no steps to rate")
    check_template(template, REQUIRED, "decisiveness prompt")
    content = fill(
        template,
        n=len(steps),
        steps=paper_format_steps(steps) if template == PAPER_PROMPT else format_steps(steps),
        scale=calibration_scale(),
        order=hedge_order(),
        examples=paper_examples(),
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


_PAPER_FENCE_OPEN = re.compile(r"^```(?:json)?\s*")
_PAPER_FENCE_CLOSE = re.compile(r"\s*```$")
_PAPER_NUMBER = re.compile(r"[-+]?\d*\.?\d+")


def _unit(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if 0.0 <= v <= 1.0 else None


def parse_judge_reply_paper(reply: str | None, n: int) -> tuple[np.ndarray, str]:
    """(float64 [n] scores, how) by the published rule, quirks included.

    A reply (a leading ```json and trailing ``` fence removed) that is a JSON list of exactly
    n elements is read element by element IN PLACE: each element that float() accepts
    (numbers, numeric strings, true/false) and that lies in [0, 1] is kept, any other is
    missing (NaN) at its own position ("json"). Any other reply falls back to every number
    in the text in order, those in [0, 1] kept, truncated to n, missing at the end
    ("fallback"; "failed" when none) -- so in that case a list marker such as "1." counts
    as a score and later scores shift, as they do in the published code.
    """
    missing = np.full(n, np.nan)
    raw = (reply or "").strip()
    if raw.startswith("```"):
        raw = _PAPER_FENCE_CLOSE.sub("", _PAPER_FENCE_OPEN.sub("", raw))
    try:
        values = json.loads(raw)
    except (json.JSONDecodeError, ValueError):
        values = None
    if isinstance(values, list) and len(values) == n:
        kept = [_unit(v) for v in values]
        return np.array([np.nan if v is None else v for v in kept], dtype=np.float64), JSON
    found = [v for m in _PAPER_NUMBER.findall(raw) if (v := _unit(m)) is not None][:n]
    if not found:
        return missing, FAILED
    missing[: len(found)] = found
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
    across_traces: bool = False,
    parse: Callable[[str | None, int], tuple[np.ndarray, str]] = parse_judge_reply,
) -> list[Judged]:
    """``judge_decisiveness`` for many traces with ONE ``complete`` call, so the engine
    decodes every trace's judge prompt in the same batch.

    By default a batch never mixes traces. ``across_traces`` (the published batching) puts
    all steps of all traces, in order, into consecutive batches of ``batch_size``, so a
    batch may end one trace and begin the next. ``parse`` reads one reply for n steps
    (``parse_judge_reply``, or ``parse_judge_reply_paper``); a reply read by the fallback,
    or failed, counts once for every trace with a step in its batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    flat = [(t, i) for t, steps in enumerate(traces) for i in range(len(steps))]
    if across_traces:
        batches = [flat[b : b + batch_size] for b in range(0, len(flat), batch_size)]
    else:
        batches = [
            [(t, i) for i in range(s, min(s + batch_size, len(steps)))]
            for t, steps in enumerate(traces)
            for s in range(0, len(steps), batch_size)
        ]
    prompts = [build_judge_prompt([traces[t][i] for t, i in b], template) for b in batches]
    replies = complete(prompts) if prompts else []
    if len(replies) != len(prompts):
        raise ValueError(f"complete() returned {len(replies)} replies for {len(prompts)} prompts")
    out = [Judged(np.full(len(steps), np.nan), 0, 0) for steps in traces]
    for batch, reply in zip(batches, replies, strict=True):
        scores, how = parse(reply, len(batch))
        for (t, i), v in zip(batch, scores, strict=True):
            out[t].scores[i] = v
        for t in dict.fromkeys(t for t, _ in batch):
            out[t] = out[t]._replace(
                fallback=out[t].fallback + (how == FALLBACK),
                failed=out[t].failed + (how == FAILED),
            )
    return out


# the published judge's sampling: near-greedy (chat_completer keyword arguments)
PAPER_SAMPLING = {"temperature": 0.5, "top_p": 0.1}


def judge_options(judges: str) -> tuple[dict, dict]:
    """(``chat_completer`` keywords, ``judge_traces`` keywords) for a protocol's judges:
    "fcjax" greedy, one trace per batch, ``parse_judge_reply``; "paper" ``PAPER_SAMPLING``,
    batches across traces, ``parse_judge_reply_paper``."""
    if judges == "paper":
        return dict(PAPER_SAMPLING), {"across_traces": True, "parse": parse_judge_reply_paper}
    if judges == "fcjax":
        return {}, {}
    raise ValueError(f"judges must be 'fcjax' or 'paper', got {judges!r}")
