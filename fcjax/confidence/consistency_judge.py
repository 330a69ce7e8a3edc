"""Judge prompt and parsing for prefix-conditioned sampling consistency (METHOD.md 4.3).

For each sampled continuation paragraph (context) and the original step (assertion) a
judge answers Yes (consistent) or No. Yes = 0, No = 1, unparsable = 0.5, and the step's
confidence is 1 - mean over the K answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fcjax.text.chat import Messages

UNPARSED_VALUE = 0.5  # an unreadable judge answer counts as maximally unsure (METHOD.md 4.3)

_THINK_END = re.compile(r"</think>", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def build_consistency_prompt(context: str, assertion: str) -> Messages:
    """Chat messages asking whether `assertion` is consistent with `context` (Yes/No)."""
    content = (
        "Below is a passage of reasoning (the context) and a statement (the assertion).\n\n"
        f"Context:\n{context.strip()}\n\n"
        f"Assertion:\n{assertion.strip()}\n\n"
        "Is the assertion consistent with the context, that is, does the context support "
        "it or at least not contradict it? Answer with a single word: Yes or No."
    )
    return [{"role": "user", "content": content}]


def parse_yes_no(reply: str | None) -> float | None:
    """Yes -> 0.0, No -> 1.0 from the first standalone yes/no word of the reply
    (case-insensitive; markdown such as **Yes** is fine; a reasoning block ending in
    </think> is skipped); None when there is none."""
    if not isinstance(reply, str):
        return None
    tail = _THINK_END.split(reply)[-1]
    m = _YES_NO.search(tail)
    if m is None:
        return None
    return 0.0 if m.group(1).lower() == "yes" else 1.0


def consistency_score(replies: Sequence[str | None]) -> tuple[float, int]:
    """(C_samp, n_unparsed) for one step from its K judge replies: 1 - mean of the parsed
    values, with unparsable replies counted as 0.5; NaN when there are no replies."""
    if not replies:
        return float("nan"), 0
    values = [parse_yes_no(r) for r in replies]
    n_unparsed = sum(v is None for v in values)
    filled = [UNPARSED_VALUE if v is None else v for v in values]
    return 1.0 - sum(filled) / len(filled), n_unparsed
