"""Decisiveness D(step): the local LLM judge and the lexicon baseline."""

from fcjax.decisiveness.judge import (
    build_judge_prompt,
    judge_decisiveness,
    judge_traces,
    parse_judge_reply,
)
from fcjax.decisiveness.lexicon import (
    BOOSTERS,
    HEDGES,
    find_cues,
    lexicon_decisiveness,
    lexicon_scores,
)

__all__ = [
    "BOOSTERS",
    "HEDGES",
    "build_judge_prompt",
    "find_cues",
    "judge_decisiveness",
    "judge_traces",
    "lexicon_decisiveness",
    "lexicon_scores",
    "parse_judge_reply",
]
