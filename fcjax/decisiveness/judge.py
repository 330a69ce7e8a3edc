"""LLM decisiveness judge (METHOD.md section 3), independent of the engine that runs it.

A judge model reads numbered reasoning steps and returns a JSON list with one
assertiveness score per step, 0.0 hesitant ... 1.0 decisive. Replies are parsed strictly:
anything but exactly one well-formed list of n numbers in [0, 1] gives NaN for every step
of that batch, so a missing score is never replaced by a guess.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from fcjax.text.chat import Messages

INSTRUCTIONS = """\
You rate how decisive the wording of reasoning steps is.

For each step, judge only its linguistic assertiveness: how confidently it is phrased, \
not whether it is correct. Use a number from 0.0 to 1.0:
- 0.0: hesitant and non-committal; the step is full of doubt or refuses to commit.
- 0.5: partly committed; some claims are hedged.
- 1.0: decisive; the step states things with no room for doubt.
Pay close attention to hedging phrases ("maybe", "I think", "perhaps", "wait", "I'm not \
sure", "it seems") and to boosters ("clearly", "definitely", "certainly"). A step that \
punts (moves on, restates the task, or plans the next move without claiming anything \
uncertain) is rated 1.0.

Reply with ONLY a JSON list of numbers, one per step, in the order given, and nothing \
else."""

# Few-shot anchors written for fcjax: (steps, scores) shown as one user/assistant exchange.
FEW_SHOT: tuple[tuple[str, float], ...] = (
    ("Each box holds 12 eggs, so 5 boxes hold 5 * 12 = 60 eggs.", 1.0),
    ("Let me now work out the total cost.", 1.0),
    ("Hmm, maybe the train leaves at 3 pm? I'm not sure that reading is right.", 0.2),
    ("I think the remainder is 4, but I should probably check it once more.", 0.55),
    ("Wait, that can't be right... or can it? I really don't know which case applies.", 0.05),
    ("This is clearly a right triangle, so the area is definitely 24.", 1.0),
    ("It seems likely that option B is correct, though C is also possible.", 0.45),
)


def _numbered(steps: Sequence[str]) -> str:
    return "\n\n".join(f"Step {i + 1}:\n{s.strip()}" for i, s in enumerate(steps))


def _request(steps: Sequence[str]) -> str:
    return (
        f"Rate the following {len(steps)} steps.\n\n{_numbered(steps)}\n\n"
        f"Reply with ONLY a JSON list of {len(steps)} numbers between 0.0 and 1.0."
    )


def build_judge_prompt(steps: Sequence[str], system_role: bool = True) -> Messages:
    """Chat messages asking the judge to rate `steps`.

    Instructions (system message, or the first user turn when `system_role` is False for
    templates without a system role), one worked few-shot exchange, then the steps.
    """
    if not steps:
        raise ValueError("build_judge_prompt: no steps to rate")
    shot_steps = [s for s, _ in FEW_SHOT]
    shot_reply = json.dumps([v for _, v in FEW_SHOT])
    messages: Messages = [
        {"role": "user", "content": _request(shot_steps)},
        {"role": "assistant", "content": shot_reply},
        {"role": "user", "content": _request(steps)},
    ]
    if system_role:
        return [{"role": "system", "content": INSTRUCTIONS}, *messages]
    messages[0] = {"role": "user", "content": f"{INSTRUCTIONS}\n\n{messages[0]['content']}"}
    return messages


_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def parse_judge_reply(reply: str, n: int) -> np.ndarray:
    """float64 [n] scores from a judge reply; all NaN unless the reply is exactly a JSON
    list (optionally in a ```json fence, with surrounding whitespace) of n finite numbers
    in [0, 1]."""
    missing = np.full(n, np.nan)
    if not isinstance(reply, str):
        return missing
    body = reply.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not (body.startswith("[") and body.endswith("]")):
        return missing
    try:
        values = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return missing
    if not isinstance(values, list) or len(values) != n:
        return missing
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return missing
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            return missing
    return np.asarray(values, dtype=np.float64)


def judge_decisiveness(
    steps: Sequence[str],
    complete: Callable[[list[Messages]], list[str]],
    batch_size: int = 20,
) -> tuple[np.ndarray, int]:
    """Rates every step of one trace with the judge; returns (scores [n_steps], n_unparsed).

    Steps go to the judge `batch_size` at a time (the study: 20). `complete` maps a list
    of chat-message lists to one reply string each; all batches are sent in one call.
    A batch whose reply does not parse leaves NaN for its steps; `n_unparsed` counts
    those replies (batches), not steps.
    """
    return judge_traces([steps], complete, batch_size)[0]


def judge_traces(
    traces: Sequence[Sequence[str]],
    complete: Callable[[list[Messages]], list[str]],
    batch_size: int = 20,
) -> list[tuple[np.ndarray, int]]:
    """``judge_decisiveness`` for many traces with ONE ``complete`` call, so the engine
    decodes every trace's judge prompt in the same batch. A batch never mixes traces."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spans = [(t, s) for t, steps in enumerate(traces) for s in range(0, len(steps), batch_size)]
    prompts = [build_judge_prompt(traces[t][s : s + batch_size]) for t, s in spans]
    replies = complete(prompts) if prompts else []
    if len(replies) != len(prompts):
        raise ValueError(f"complete() returned {len(replies)} replies for {len(prompts)} prompts")
    out = [(np.full(len(steps), np.nan), 0) for steps in traces]
    for (t, s), reply in zip(spans, replies, strict=True):
        scores, n_unparsed = out[t]
        batch = parse_judge_reply(reply, min(batch_size, len(traces[t]) - s))
        scores[s : s + len(batch)] = batch
        out[t] = (scores, n_unparsed + int(np.isnan(batch).all()))
    return out
