"""Text side of fcjax: step segmentation, answer extraction and scoring, token offsets."""

from fcjax.text.answers import (
    AnswerKind,
    extract_answer,
    extract_answer_paper,
    infer_kind,
    is_scorable,
    score,
    score_answer,
)
from fcjax.text.steps import (
    Step,
    paper_spans,
    paper_step_draw,
    reasoning_span,
    select_steps,
    split_steps,
)
from fcjax.text.tokens import token_char_offsets, token_spans

__all__ = [
    "AnswerKind",
    "Step",
    "extract_answer",
    "extract_answer_paper",
    "infer_kind",
    "is_scorable",
    "paper_spans",
    "paper_step_draw",
    "reasoning_span",
    "score",
    "score_answer",
    "select_steps",
    "split_steps",
    "token_char_offsets",
    "token_spans",
]
