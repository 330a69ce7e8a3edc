"""Judge prompt and parsing for prefix-conditioned sampling consistency (METHOD.md 4.3).

For each sampled continuation paragraph (the context) and the original step (the statement)
a judge answers whether the statement is consistent with the context: Yes (consistent) = 0,
No = 1, N/A (the context does not bear on it) = 0.5, an unparsable reply = 0.5. The step's
confidence is 1 - mean over the K answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

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


def consistency_score(
    replies: Sequence[str | None],
    parse: Callable[[str | None], float | None] | None = None,
) -> tuple[float, int]:
    """(C_samp, n_unparsed) for one step from its K judge replies: 1 - mean of the values
    ``parse`` reads (``parse_verdict``; ``parse_verdict_paper`` under the published
    protocol), with unparsable replies counted as 0.5; NaN when there are no replies."""
    if not replies:
        return float("nan"), 0
    values = [(parse or parse_verdict)(r) for r in replies]
    n_unparsed = sum(v is None for v in values)
    filled = [UNPARSED_VALUE if v is None else v for v in values]
    return 1.0 - sum(filled) / len(filled), n_unparsed


# ----------------------------------------------------------------------------- published
# --protocol=paper: the published judge's framing (a context and an assertion, Yes or No
# only), its reply rule (an N/A reply is still read as 0.5) and its judged continuation.

PAPER_PROMPT = """\
Context: {context}
Assertion: {assertion}
Does the assertion agree with the context above?
Reply Yes or No:"""

_PAPER_VERDICT = re.compile(r"(?:Answer\s+yes\s+or\s+no:\s*)?\b(yes|no|N/A)\b", re.IGNORECASE)
_PAPER_VALUES = {"yes": 0.0, "no": 1.0, "n/a": NOT_APPLICABLE}
PAPER_FALLBACK_CHARS = 300


def parse_verdict_paper(reply: str | None) -> float | None:
    """The published reading: the first whole word Yes, No or N/A anywhere in the stripped
    reply (any case; no reasoning block is skipped) -> 0.0, 1.0, 0.5; None when there is
    none (then counted 0.5, ``UNPARSED_VALUE``). The prompt never offers N/A, but a reply
    that says it is still read as 0.5."""
    if not isinstance(reply, str):
        return None
    m = _PAPER_VERDICT.search(reply.strip())
    return None if m is None else _PAPER_VALUES[m.group(1).lower()]


def paper_paragraph(sample: str) -> str:
    """The judged part of a sampled continuation, as published: the stripped sample's text
    before its first blank line ("\\n\\n"), stripped; when that is empty, the first
    ``PAPER_FALLBACK_CHARS`` characters of the stripped sample."""
    text = sample.strip()
    first = text.split("\n\n")[0].strip()
    return first if first else text[:PAPER_FALLBACK_CHARS]
