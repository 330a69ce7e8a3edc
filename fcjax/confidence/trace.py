"""``Trace``: one generation with its steps, answer and the arrays estimators read.

A trace is built once per example from its ``Generation`` (``build_trace``); estimators only
read it, except that the last-layer hidden rows (``last_hidden``) are filled lazily by the
first estimator that needs them (RCC), so traces that no such estimator scores never pay
for the extra forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fcjax.engine.generate import Generation
from fcjax.text.answers import (
    extract_answer,
    extract_answer_paper,
    is_scorable,
    score,
    score_answer,
    study_dataset,
)
from fcjax.text.steps import SplitMethod, Step, split_steps
from fcjax.text.tokens import token_char_offsets, token_spans


class TraceError(ValueError):
    """A trace whose arrays do not fit together (lengths, spans)."""


@dataclasses.dataclass
class Trace:
    """One reasoning trace.

    ``steps`` carry char spans into ``text`` and token spans ``[token_start, token_end)``
    into ``output_ids`` (every step has at least one token). ``token_offsets`` are the char
    (start, end) of each output token in ``text``. ``last_hidden`` [len(prompt_ids) + T, D]
    is the last decoder layer's output (before the final norm) over prompt + output, or
    None until captured.
    """

    example_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    token_logprobs: np.ndarray  # [T] chosen-token log-probabilities (temperature 1)
    top_logprobs: np.ndarray  # [T, k] top-k log-probabilities, descending
    steps: list[Step]
    answer: str | None
    correct: bool | None
    kind: str
    choices: tuple[str, ...] | None = None
    token_offsets: list[tuple[int, int]] | None = None
    last_hidden: np.ndarray | None = None
    scorable: bool = True  # the answer can be scored (see fcjax.text.answers.is_scorable)

    def __post_init__(self):
        n = len(self.output_ids)
        self.token_logprobs = np.asarray(self.token_logprobs, np.float32).reshape(-1)
        self.top_logprobs = np.asarray(self.top_logprobs, np.float32)
        if self.top_logprobs.ndim == 1:
            self.top_logprobs = self.top_logprobs[:, None]
        where = f"trace {self.example_id!r}"
        if self.token_logprobs.shape[0] != n:
            raise TraceError(
                f"{where}: token_logprobs has {self.token_logprobs.shape[0]} entries for "
                f"{n} output tokens"
            )
        if self.top_logprobs.ndim != 2 or self.top_logprobs.shape[0] != n:
            raise TraceError(
                f"{where}: top_logprobs must be [{n}, k], got {self.top_logprobs.shape}"
            )
        if self.token_offsets is not None and len(self.token_offsets) != n:
            raise TraceError(
                f"{where}: token_offsets has {len(self.token_offsets)} entries for {n} tokens"
            )
        for s in self.steps:
            if s.token_start is None or s.token_end is None:
                raise TraceError(f"{where}: step {s.index} has no token span")
            if not 0 <= s.token_start < s.token_end <= n:
                raise TraceError(
                    f"{where}: step {s.index} token span [{s.token_start}, {s.token_end}) "
                    f"outside the {n} output tokens"
                )

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def sequence(self) -> list[int]:
        """prompt_ids + output_ids."""
        return [*self.prompt_ids, *self.output_ids]


def build_trace(
    lm: Any,
    example: Any,
    generation: Generation,
    method: SplitMethod = "paragraph",
    answer_rule: str = "last",
    numbered_choices: bool = False,
    **split_kw: Any,
) -> Trace:
    """A ``Trace`` from an example (``fcjax.data.Example``) and its generation.

    Steps come from ``split_steps(generation.text, method)``; token char offsets from
    ``token_char_offsets(lm.tokenizer, output_ids)`` (the generation text is the decode of
    the output ids alone, so no prompt prefix is given); token spans from ``token_spans``.
    Steps that no token touches are dropped and the rest renumbered. The answer is
    ``extract_answer(text, answer_rule)``, scored against the gold with ``score_answer``
    (multiple-choice answers read as option numbers 1..n with ``numbered_choices``); with
    answer_rule="paper" it is ``extract_answer_paper(text)`` scored by ``score`` with the
    example's study dataset (``study_dataset(example.source)``, else its kind).
    """
    if lm.tokenizer is None:
        raise ValueError(f"build_trace: model {lm.name!r} has no tokenizer")
    ids = [int(t) for t in generation.token_ids]
    text = generation.text
    offsets = token_char_offsets(lm.tokenizer, ids)
    if method == "tokens":
        split_kw.setdefault("token_offsets", offsets)
    spans = token_spans(offsets, split_steps(text, method, **split_kw)) if ids else []
    steps = [s for s in spans if s.token_start is not None]
    steps = [dataclasses.replace(s, index=i) for i, s in enumerate(steps)]
    choices = tuple(example.choices) if example.choices else None
    options = list(choices) if choices else None
    if answer_rule == "paper":  # the published rules (--protocol=paper)
        answer = extract_answer_paper(text)
        dataset = study_dataset(str(example.source)) or example.kind
        answer_type = getattr(example, "answer_type", None)
        outcome = score(
            answer,
            example.answer,
            dataset=dataset,
            answer_type=answer_type,
            choices=options,
            numbered=numbered_choices,
        )
        scorable = outcome is not None
    else:
        answer = extract_answer(text, answer_rule)
        outcome = score_answer(answer, example.answer, example.kind, options, numbered_choices)
        scorable = is_scorable(answer, example.kind, options, numbered_choices)
    correct = bool(outcome)
    return Trace(
        example_id=str(example.id),
        prompt_ids=[int(t) for t in generation.prompt_ids],
        output_ids=ids,
        text=text,
        token_logprobs=generation.token_logprobs,
        top_logprobs=generation.top_logprobs,
        steps=steps,
        answer=answer,
        correct=correct,
        kind=example.kind,
        choices=choices,
        token_offsets=[(int(a), int(b)) for a, b in offsets],
        scorable=scorable,
    )


def prefix_tokens(trace: Trace, step: Step) -> int:
    """Number of output tokens in the prefix that precedes ``step``: the index of the first
    token whose char start is >= step.start (all T tokens when there is none).

    The prefix therefore ends at a token boundary at or before the step's first character;
    a token that straddles the step start (rare: paragraph steps begin after a blank line)
    stays in the prefix. Without ``token_offsets`` the step's first token is used.
    """
    if trace.token_offsets is None:
        return int(step.token_start or 0)
    for t, (a, _) in enumerate(trace.token_offsets):
        if a >= step.start:
            return t
    return len(trace.output_ids)
