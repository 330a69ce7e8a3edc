"""Text side of fcjax: step segmentation, answer extraction and scoring, token offsets."""

from fcjax.text.answers import (
    AnswerKind,
    extract_answer,
    infer_kind,
    is_scorable,
    score_answer,
)
from fcjax.text.steps import Step, reasoning_span, select_steps, split_steps
from fcjax.text.tokens import token_char_offsets, token_spans

__all__ = [
    "AnswerKind",
    "Step",
    "extract_answer",
    "infer_kind",
    "is_scorable",
    "reasoning_span",
    "score_answer",
    "select_steps",
    "split_steps",
    "token_char_offsets",
    "token_spans",
]
