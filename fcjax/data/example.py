"""The evaluation example every loader returns, and the error a bad dataset raises."""

from __future__ import annotations

import dataclasses


class DataError(ValueError):
    """A dataset file or row is unusable; the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation question.

    `choices` is None for free-form answers; otherwise the options in order, labelled
    A, B, C, ... by position, and `answer` is the gold letter. `kind` says how a
    prediction is scored: "numeric", "math", "letter" or "yesno". `answer_type` is HLE's
    ("exactMatch" or "multipleChoice"; None elsewhere), which the published protocol's
    prompt and scorer read.
    """

    id: str
    question: str
    choices: tuple[str, ...] | None
    answer: str
    kind: str
    source: str
    answer_type: str | None = None


def letters(n: int) -> str:
    """The first n option letters, "ABC..."."""
    return "".join(chr(ord("A") + i) for i in range(n))
