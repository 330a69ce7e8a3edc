"""Lexicon decisiveness: a fast, offline baseline for the LLM judge.

D(step) in [0, 1] from the hedges, boosters and calibrated probability phrases a step
contains. The rule, in order:

1. Base. A step with a calibrated phrase (METHOD.md section 6: "almost certain" 0.9204 ...
   "almost no chance" 0.0651) starts at the mean value of the phrases it contains: the
   phrase states the speaker's probability, so it anchors D. Otherwise the base is
   `NEUTRAL` = 0.9: the study's judge rates plain assertions (and statements that punt)
   as decisive, so a step with no cue is decisive, and 0.9 rather than 1.0 leaves room for
   a booster to mark an emphatic step as more decisive still.
2. Hedges multiply D by (1 - w) each, w = the hedge's weight.
3. Boosters move D toward 1: D <- D + (1 - D) * w each.

Weights come in three grades (strong/medium/weak). Matching is case-insensitive, on word
boundaries, multiword phrases allow any whitespace between words, curly apostrophes count
as straight ones, and the longest phrase wins where phrases overlap ("highly unlikely"
is one anchor, not "unlikely" too; "not sure" is a hedge, not the booster "sure").
"""

from __future__ import annotations

import functools
import re

import numpy as np

from fcjax.data.interventions import CALIBRATED_PHRASES

NEUTRAL = 0.9  # D of a step with no cue; see module docstring.
STRONG, MEDIUM, WEAK = 0.5, 0.3, 0.15

ANCHORS: dict[str, float] = dict(CALIBRATED_PHRASES)

HEDGES: dict[str, float] = {
    **dict.fromkeys(
        [
            "not sure",
            "i'm not sure",
            "i am not sure",
            "unsure",
            "not certain",
            "uncertain",
            "i don't know",
            "i do not know",
            "no idea",
            "not confident",
            "confused",
            "i'm confused",
            "hard to say",
            "can't be sure",
            "cannot be sure",
            "doubtful",
            "i doubt",
            "just a guess",
            "i guess",
            "no clue",
        ],
        STRONG,
    ),
    **dict.fromkeys(
        [
            "maybe",
            "perhaps",
            "possibly",
            "might",
            "may be",
            "could be",
            "i think",
            "i believe",
            "i suppose",
            "it seems",
            "seems",
            "seem",
            "appears",
            "wait",
            "hmm",
            "not entirely",
            "not quite",
            "or maybe",
            "let me double-check",
            "double-check",
            "let me check",
            "let me verify",
            "let me reconsider",
            "mistake",
            "i might be wrong",
            "if i recall",
            "it is possible",
            "it's possible",
            "could potentially",
            "potentially",
        ],
        MEDIUM,
    ),
    **dict.fromkeys(
        [
            "should",
            "presumably",
            "apparently",
            "somewhat",
            "kind of",
            "sort of",
            "roughly",
            "suggests",
            "assume",
            "assuming",
            "alternatively",
            "hopefully",
            "tentatively",
            "in theory",
        ],
        WEAK,
    ),
}

BOOSTERS: dict[str, float] = {
    **dict.fromkeys(
        [
            "definitely",
            "certainly",
            "clearly",
            "obviously",
            "undoubtedly",
            "without a doubt",
            "no doubt",
            "for sure",
            "absolutely",
            "of course",
            "i'm sure",
            "i am sure",
            "i'm confident",
            "i am confident",
            "i'm certain",
            "i am certain",
            "guaranteed",
            "unquestionably",
            "beyond doubt",
            "surely",
        ],
        STRONG,
    ),
    **dict.fromkeys(
        [
            "must be",
            "indeed",
            "confirmed",
            "confirms",
            "verified",
            "always",
            "never",
            "exactly",
            "precisely",
            "the answer is",
            "certain",
            "sure",
            "confident",
        ],
        MEDIUM,
    ),
    **dict.fromkeys(["therefore", "thus", "hence", "so the", "it follows"], WEAK),
}


def _phrase_pattern(phrase: str) -> str:
    return r"\s+".join(re.escape(w) for w in phrase.split())


@functools.cache
def _matcher() -> tuple[re.Pattern[str], dict[str, tuple[str, float]]]:
    table: dict[str, tuple[str, float]] = {}
    for cat, lex in (("booster", BOOSTERS), ("hedge", HEDGES), ("anchor", ANCHORS)):
        for phrase, w in lex.items():
            table[phrase] = (cat, w)  # anchors last: an anchor is never also a hedge
    ordered = sorted(table, key=lambda p: (-len(p), p))
    regex = re.compile(
        r"(?<![\w'])(?:" + "|".join(_phrase_pattern(p) for p in ordered) + r")(?![\w'])",
        re.IGNORECASE,
    )
    return regex, table


def find_cues(text: str) -> list[tuple[str, str, float]]:
    """(phrase, category, weight-or-anchor-value) for each cue in `text`, in order."""
    regex, table = _matcher()
    norm = text.replace("\u2019", "'").replace("\u2018", "'")
    out = []
    for m in regex.finditer(norm):
        phrase = " ".join(m.group(0).lower().split())
        cat, w = table[phrase]
        out.append((phrase, cat, w))
    return out


def lexicon_decisiveness(text: str) -> float:
    """D in [0, 1] for one step (rule in the module docstring); NaN for an empty step."""
    if not text or not text.strip():
        return float("nan")
    cues = find_cues(text)
    anchors = [w for _, cat, w in cues if cat == "anchor"]
    d = float(np.mean(anchors)) if anchors else NEUTRAL
    for _, cat, w in cues:
        if cat == "hedge":
            d *= 1.0 - w
    for _, cat, w in cues:
        if cat == "booster":
            d += (1.0 - d) * w
    return float(min(max(d, 0.0), 1.0))


def lexicon_scores(steps: list[str]) -> np.ndarray:
    """`lexicon_decisiveness` of each step, float64 [n_steps]."""
    return np.array([lexicon_decisiveness(s) for s in steps], dtype=np.float64)
