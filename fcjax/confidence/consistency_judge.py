"""Judge prompt and parsing for prefix-conditioned sampling consistency (METHOD.md 4.3).

For each sampled continuation paragraph (the context) and the original step (the statement)
a judge answers whether the statement is consistent with the context: Yes (consistent) = 0,
No = 1, N/A (the context does not bear on it) = 0.5, an unparsable reply = 0.5. The step's
confidence is 1 - mean over the K answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fcjax.text.chat import Messages
from fcjax.text.templates import check_template, fill

UNPARSED_VALUE = 0.5  # an unreadable judge answer counts as maximally unsure (METHOD.md 4.3)
NOT_APPLICABLE = 0.5  # so does "N/A"
REPLY_TOKENS = 10  # greedy reply budget of the consistency judge

# placeholders a consistency prompt must contain
REQUIRED = ("context", "assertion")

PROMPT = """\
Below is a passage of reasoning (the context) and a statement.

Context:
{context}

Statement:
{assertion}

Is the statement consistent with the context? Answer with one word: Yes, No, or N/A if \
the context says nothing that bears on the statement."""

_THINK_END = re.compile(r"</think>", re.IGNORECASE)
_VERDICT = re.compile(r"(?<![\w/])(yes|no|n\s*/\s*a|not applicable)(?![\w/])", re.IGNORECASE)


def build_consistency_prompt(context: str, assertion: str, template: str = PROMPT) -> Messages:
    """Chat messages asking whether ``assertion`` is consistent with ``context``
    (``template`` placeholders: {context}, {assertion})."""
    check_template(template, REQUIRED, "consistency prompt")
    content = fill(template, context=context.strip(), assertion=assertion.strip())
    return [{"role": "user", "content": content}]


def parse_verdict(reply: str | None) -> float | None:
    """Yes -> 0.0, No -> 1.0, N/A -> 0.5 from the first standalone verdict word of the reply
    (case-insensitive; markdown such as **Yes** is fine; a reasoning block ending in
    </think> is skipped); None when there is none."""
    if not isinstance(reply, str):
        return None
    m = _VERDICT.search(_THINK_END.split(reply)[-1])
    if m is None:
        return None
    word = m.group(1).lower()
    return 0.0 if word == "yes" else 1.0 if word == "no" else NOT_APPLICABLE


def consistency_score(replies: Sequence[str | None]) -> tuple[float, int]:
    """(C_samp, n_unparsed) for one step from its K judge replies: 1 - mean of the parsed
    values, with unparsable replies counted as 0.5; NaN when there are no replies."""
    if not replies:
        return float("nan"), 0
    values = [parse_verdict(r) for r in replies]
    n_unparsed = sum(v is None for v in values)
    filled = [UNPARSED_VALUE if v is None else v for v in values]
    return 1.0 - sum(filled) / len(filled), n_unparsed
