"""Step segmentation of a reasoning trace (METHOD.md section 2).

A `Step` is one unit of reasoning that gets a decisiveness and confidence score. Spans always
index the ORIGINAL generation text, so `text[step.start:step.end] == step.text`.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from fcjax.keys import stable_key

SplitMethod = Literal["paragraph", "cue", "tokens", "paper"]

CUE_WORDS: tuple[str, ...] = (
    "wait",
    "double-check",
    "alternatively",
    "make sure",
    "another way",
    "verify",
    "to confirm",
)

_BLANK_LINES_RE = re.compile(r"\n\s*\n")


def _cue_regex(cues: Sequence[str]) -> re.Pattern[str]:
    words = "|".join(re.escape(c).replace(r"\-", "[- ]?").replace(r"\ ", r"\s+") for c in cues)
    # A cue starts a sentence: after a line break, or after ., !, ? (maybe closing quotes).
    return re.compile(
        rf"(?:\n\s*|[.!?][\"')\]]*[^\S\n]+)(?P<cue>[*_\"']*(?:{words})\b)", re.IGNORECASE
    )


_CUE_RE = _cue_regex(CUE_WORDS)


@dataclasses.dataclass(frozen=True)
class Step:
    """One reasoning step: `text == generation[start:end]`; token span [token_start, token_end)."""

    index: int
    start: int
    end: int
    text: str
    token_start: int | None = None
    token_end: int | None = None


def reasoning_span(text: str) -> tuple[int, int]:
    """Character span of the reasoning block.

    Inside `<think>...</think>` (to the end when the tag never closes), else before a lone
    `</think>` (chat templates often put `<think>` in the prompt), else the whole text.
    """
    open_idx = text.find("<think>")
    if open_idx >= 0:
        start = open_idx + len("<think>")
        close_idx = text.find("</think>", start)
        return start, (close_idx if close_idx >= 0 else len(text))
    close_idx = text.find("</think>")
    if close_idx >= 0:
        return 0, close_idx
    return 0, len(text)


def _stripped(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Span [start, end) with surrounding whitespace removed; None when only whitespace."""
    piece = text[start:end]
    left = len(piece) - len(piece.lstrip())
    right = len(piece.rstrip())
    if right <= left:
        return None
    return start + left, start + right


def _paragraph_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, cursor = [], start
    for match in _BLANK_LINES_RE.finditer(text, start, end):
        spans.append((cursor, match.start()))
        cursor = match.end()
    spans.append((cursor, end))
    return [s for a, b in spans if (s := _stripped(text, a, b)) is not None]


def _cue_spans(text: str, start: int, end: int, cue_re: re.Pattern[str]) -> list[tuple[int, int]]:
    spans = []
    for p_start, p_end in _paragraph_spans(text, start, end):
        cuts = [m.start("cue") for m in cue_re.finditer(text, p_start, p_end)]
        bounds = [p_start, *cuts, p_end]
        for a, b in itertools.pairwise(bounds):
            span = _stripped(text, a, b)
            if span is not None:
                spans.append(span)
    return spans


def _window_steps(
    text: str,
    start: int,
    end: int,
    token_offsets: Sequence[tuple[int, int]],
    window: int,
) -> list[Step]:
    if window < 1:
        raise ValueError(f"split_steps: window must be >= 1, got {window}")
    previous_end = 0
    for t, (a, b) in enumerate(token_offsets):
        if not (0 <= a <= b <= len(text)) or a < previous_end:
            raise ValueError(
                f"split_steps: token_offsets[{t}] = ({a}, {b}) is not a monotone span inside "
                f"the text of length {len(text)}"
            )
        previous_end = b
    inside = [t for t, (a, b) in enumerate(token_offsets) if a < end and b > start]
    steps: list[Step] = []
    for w in range(0, len(inside), window):
        tokens = inside[w : w + window]
        a = max(token_offsets[tokens[0]][0], start)
        b = min(token_offsets[tokens[-1]][1], end)
        span = _stripped(text, a, b)
        if span is None:
            continue
        steps.append(
            Step(len(steps), span[0], span[1], text[span[0] : span[1]], tokens[0], tokens[-1] + 1)
        )
    return steps


def split_steps(
    text: str,
    method: SplitMethod = "paragraph",
    *,
    token_offsets: Sequence[tuple[int, int]] | None = None,
    window: int = 64,
    cues: Sequence[str] = CUE_WORDS,
) -> list[Step]:
    """Steps of the reasoning block of a generation.

    paragraph: split on blank lines (`\\n\\s*\\n`); each non-whitespace paragraph is a step,
      its span stripped of surrounding whitespace.
    cue: paragraphs further split where a sentence or line begins with a cue word (wait,
      double-check, alternatively, make sure, another way, verify, to confirm; any case).
    tokens: fixed windows of `window` tokens over the tokens that overlap the reasoning block;
      needs `token_offsets` (char (start, end) per generated token, see `token_char_offsets`);
      token spans are filled in.
    paper: the published segmentation (`paper_spans`), each step's span stripped.
    """
    if method == "paper":
        steps = []
        for a, _, body in paper_spans(text):
            a += text[a:].index(body)
            steps.append(Step(len(steps), a, a + len(body), body))
        return steps
    start, end = reasoning_span(text)
    if method == "paragraph":
        spans = _paragraph_spans(text, start, end)
    elif method == "cue":
        cue_re = _CUE_RE if tuple(cues) == CUE_WORDS else _cue_regex(cues)
        spans = _cue_spans(text, start, end, cue_re)
    elif method == "tokens":
        if token_offsets is None:
            raise ValueError("split_steps: method='tokens' needs token_offsets")
        return _window_steps(text, start, end, token_offsets, window)
    else:
        raise ValueError(f"split_steps: unknown method {method!r}")
    return [Step(i, a, b, text[a:b]) for i, (a, b) in enumerate(spans)]


_PAPER_BREAK = re.compile(r"\n\n+")


def paper_block(text: str) -> tuple[int, int]:
    """The published reasoning block: before the first ``</think>`` when no ``<think>``
    precedes it; between the first ``<think>`` and the first ``</think>`` when both are there
    in that order; otherwise the WHOLE text (a ``<think>`` that never closes stays in it)."""
    close, open_ = text.find("</think>"), text.find("<think>")
    if close >= 0 and (open_ < 0 or open_ > close):
        return 0, close
    if open_ >= 0 and close >= 0:
        return open_ + len("<think>"), close
    return 0, len(text)


def paper_spans(text: str) -> list[tuple[int, int, str]]:
    """The published steps: (start, end, stripped text) of each paragraph of ``paper_block``,
    split at runs of two or more newlines only ("\n \n" does not split); [start, end) is
    the unstripped paragraph and whitespace-only paragraphs are dropped."""
    start, end = paper_block(text)
    spans, cursor = [], start
    for brk in [*_PAPER_BREAK.finditer(text, start, end), None]:
        stop = end if brk is None else brk.start()
        if text[cursor:stop].strip():
            spans.append((cursor, stop, text[cursor:stop].strip()))
        if brk is not None:
            cursor = brk.end()
    return spans


def paper_step_draw(n_steps: Sequence[int], max_steps: int = 20, seed: int = 42) -> list[list[int]]:
    """The published choice of steps for sampling consistency, for a whole run at once.

    ONE ``random.Random(seed)`` serves every example in order: an example with at most
    ``max_steps`` steps keeps them all (and draws nothing), a longer one keeps its first and
    last step and ``max_steps - 2`` of the others drawn by ``sample`` (sorted). So an
    example's choice depends on the examples before it: the run order must be the published
    one (the subset order of ``paper_subset``).
    """
    if max_steps < 2:
        raise ValueError(f"paper_step_draw: max_steps must be >= 2, got {max_steps}")
    rng = random.Random(seed)
    out = []
    for n in n_steps:
        if n < 0:
            raise ValueError(f"paper_step_draw: n_steps must be >= 0, got {n}")
        if n <= max_steps:
            out.append(list(range(n)))
        else:
            middle = sorted(rng.sample(range(1, n - 1), max_steps - 2))
            out.append([0, *middle, n - 1])
    return out


def paper_selection(
    example_ids: Sequence[str], n_steps: Sequence[int], max_steps: int = 20, seed: int = 42
) -> dict[str, list[int]]:
    """``paper_step_draw`` keyed by example id (examples in run order)."""
    if len(example_ids) != len(n_steps):
        raise ValueError(
            f"paper_selection: {len(example_ids)} example ids for {len(n_steps)} step counts"
        )
    drawn = paper_step_draw(n_steps, max_steps, seed)
    return dict(zip(example_ids, drawn, strict=True))


def select_steps(
    n_steps: int, max_steps: int = 20, seed: int = 0, key: str | int = ""
) -> list[int]:
    """Indices of the steps that get sampling confidence, sorted.

    All steps when n_steps <= max_steps, else the first, the last and max_steps - 2 others
    drawn without replacement by a numpy Generator seeded from (seed, stable hash of key);
    `key` is typically the example id, so each trace gets its own reproducible draw.
    """
    if n_steps < 0:
        raise ValueError(f"select_steps: n_steps must be >= 0, got {n_steps}")
    if max_steps < 1:
        raise ValueError(f"select_steps: max_steps must be >= 1, got {max_steps}")
    if n_steps <= max_steps:
        return list(range(n_steps))
    if max_steps == 1:
        return [0]
    rng = np.random.default_rng([seed, stable_key(key)])
    middle = rng.choice(np.arange(1, n_steps - 1), size=max_steps - 2, replace=False)
    return sorted([0, n_steps - 1, *(int(i) for i in middle)])
