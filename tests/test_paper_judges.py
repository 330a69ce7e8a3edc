"""--protocol=paper judges and interventions: parsing against the published outputs,
cross-trace batching, prompt contents, the intervention checklists, the judge notes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fcjax.confidence.consistency_judge import (
    PAPER_PROMPT as CONSISTENCY_PAPER,
)
from fcjax.confidence.consistency_judge import (
    build_consistency_prompt,
    consistency_score,
    paper_paragraph,
    parse_verdict,
    parse_verdict_paper,
)
from fcjax.data.interventions import (
    CALIBRATED_PHRASES,
    INTERVENTIONS,
    PAPER_INTERVENTIONS,
    PAPER_PHRASE_ORDER,
    get_intervention,
)
from fcjax.decisiveness.judge import (
    FALLBACK,
    JSON,
    PAPER_EXAMPLES,
    PAPER_PROMPT,
    build_judge_prompt,
    judge_options,
    judge_traces,
    parse_judge_reply,
    parse_judge_reply_paper,
)
from fcjax.protocol import PROTOCOLS, is_paper_consistency_judge, judge_notes

PUBLISHED = json.loads(
    (Path(__file__).parent / "fixtures" / "published" / "published.json").read_text()
)


def _as_list(a: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in a]


# ----------------------------------------------------------------------------- decisiveness


@pytest.mark.parametrize("case", PUBLISHED["decisiveness_parse"], ids=lambda c: repr(c["reply"]))
def test_decisiveness_parse_matches_published(case):
    scores, _ = parse_judge_reply_paper(case["reply"], case["n"])
    assert _as_list(scores) == case["scores"]


def test_decisiveness_parse_in_place():
    """A bad element is missing at its own position; later elements never shift."""
    scores, how = parse_judge_reply_paper('[0.9, 7, "high", 0.1, null]', 5)
    assert how == JSON and _as_list(scores) == [0.9, None, None, 0.1, None]
    # fcjax's own parser refuses the whole list and falls back, shifting 0.1 to position 2
    own, own_how = parse_judge_reply('[0.9, 7, "high", 0.1, null]', 5)
    assert own_how == FALLBACK and _as_list(own)[:2] == [0.9, 0.1]
    # the published fallback reads a numbered list's markers as scores (a reproduced quirk)
    quirk, how = parse_judge_reply_paper("1. 0.2\n2. 0.8", 2)
    assert how == FALLBACK and _as_list(quirk) == [1.0, 0.2]


def test_paper_prompt_scale_and_rules():
    text = build_judge_prompt(["Maybe x is 3.\nOr 4.", "x = 3"], PAPER_PROMPT)[0]["content"]
    values = [float(v) for v in re.findall(r"Rating: ([0-9.]+)", text)]
    assert values == [0.129, 0.224, 0.689, 0.506, 0.504, 1.0, 0.267, 0.011, 0.779, 1.0, 1.0]
    question = next(t for t, v in PAPER_EXAMPLES if v == 0.011)
    assert question.count("?") == 2  # the near-0 example asks itself questions
    assert "likely" in next(t for t, v in PAPER_EXAMPLES if v == 0.267)
    assert "declines to answer the question is rated 1.0" in text  # only punting is 1.0
    assert "no claim" not in text and "plans" not in text  # no "a step with no claim" rule
    assert '1. "Maybe x is 3. Or 4."\n2. "x = 3"' in text  # newlines flattened, numbered
    assert "exactly 2 numbers" in text and "[0.45, 1.0, 0.12]" in text
    for pair in ("almost certain", "very good chance", "probably not", "unlikely"):
        assert pair.lower() in text.lower()


def test_judge_batches_across_traces_in_order():
    traces = [["a0", "a1", "a2"], ["b0"], ["c0", "c1", "c2", "c3"]]
    seen: list[list[str]] = []

    def complete(prompts):
        replies = []
        for p in prompts:
            steps = re.findall(r'^\d+\. "(.*)"$', p[0]["content"], re.MULTILINE)
            seen.append(steps)
            # one bad element per batch: the second
            replies.append(json.dumps([0.5 if i != 1 else 9 for i in range(len(steps))]))
        return replies

    out = judge_traces(traces, complete, 3, PAPER_PROMPT, **judge_options("paper")[1])
    assert seen == [["a0", "a1", "a2"], ["b0", "c0", "c1"], ["c2", "c3"]]
    assert _as_list(out[0].scores) == [0.5, None, 0.5]
    assert _as_list(out[1].scores) == [0.5]
    assert _as_list(out[2].scores) == [None, 0.5, 0.5, None]
    seen.clear()
    judge_traces(traces, complete, 3, PAPER_PROMPT)  # fcjax: a batch never mixes traces
    assert seen == [["a0", "a1", "a2"], ["b0"], ["c0", "c1", "c2"], ["c3"]]


def test_judge_options():
    sampling, judging = judge_options("paper")
    assert sampling == {"temperature": 0.5, "top_p": 0.1}
    assert judging["across_traces"] and judging["parse"] is parse_judge_reply_paper
    assert judge_options("fcjax") == ({}, {})
    with pytest.raises(ValueError, match="judges"):
        judge_options("other")


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("case", PUBLISHED["verdicts"], ids=lambda c: repr(c["reply"]))
def test_verdict_parse_matches_published(case):
    value = parse_verdict_paper(case["reply"])
    assert (0.5 if value is None else value) == case["value"]


def test_paper_verdicts_differ_from_fcjax_where_published_quirks_are():
    assert parse_verdict_paper("N/A") == 0.5  # never offered, still read as 0.5
    assert consistency_score(["Yes", "No", "junk"], parse_verdict_paper) == (1 - 1.5 / 3, 1)
    assert parse_verdict("Not applicable") == 0.5 and parse_verdict_paper("Not applicable") is None


@pytest.mark.parametrize("case", PUBLISHED["paragraphs"], ids=lambda c: repr(c["sample"][:12]))
def test_judged_paragraph_matches_published(case):
    assert paper_paragraph(case["sample"]) == case["context"]


def test_paper_consistency_prompt_is_yes_no_only():
    (m,) = build_consistency_prompt("It is 4.", "x = 4", CONSISTENCY_PAPER)
    assert m["content"].startswith("Context: It is 4.\nAssertion: x = 4\n")
    assert m["content"].endswith("Reply Yes or No:") and "N/A" not in m["content"]


def test_judge_notes():
    paper = PROTOCOLS["paper"]
    for name in ("Qwen/Qwen2.5-1.5B-Instruct", "/models/qwen2.5-1.5b-instruct/"):
        assert is_paper_consistency_judge(name)
    assert not is_paper_consistency_judge("qwen2.5-coder-1.5b-instruct")
    notes = judge_notes(paper, "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct")
    assert len(notes) == 2 and "not the published Qwen/Qwen2.5-1.5B-Instruct" in notes[0]
    assert "gemini" in notes[1]
    assert len(judge_notes(paper, "Qwen/Qwen2.5-1.5B-Instruct", "lexicon")) == 1
    assert len(judge_notes(paper, None, "lexicon")) == 1  # no sampling: no consistency judge
    assert judge_notes(PROTOCOLS["fcjax"], "anything", "lexicon") == []


# ----------------------------------------------------------------------------- interventions

# Each published instruction, and the words of fcjax's paper text that carry it.
CHECKLIST: dict[str, tuple[str, ...]] = {
    "basic": (r"step .* feels uncertain", r"express that uncertainty in words", r"hedging"),
    "genuine": (
        r"honest mirror of your confidence",
        r"hedging language",
        r"evidence is thin",
        r"logic feels speculative",
    ),
    "human": (r"the way a person would", r"doubt or hesitation", r"hard or ambiguous point"),
    "perception": (r"how confident or uncertain you are", r"only by your OWN perception"),
    "self_monitoring": (
        r"confidence changes at every step",
        r"certainty rises",
        r"where it falls",
        r"evidence you find",
    ),
    "self_correction": (
        r"change your mind or fix an earlier step",
        r"say so",
        r"short hedge such as '.+'",
        r"logic shifts",
    ),
    "evidence_gap": (
        r"lack a key piece of information",
        r"show that in your reasoning",
        r"gaps in your knowledge",
        r"hedge such as 'I would be surer if I knew X'",
    ),
    "ms_hedge": (
        r"metacognitive sensitivity",
        r"internal uncertainty",
        r"intrinsic confidence that your answer is correct",
        r"only from the set below",
        r"explicitly whenever you express uncertainty",
    ),
}


@pytest.mark.parametrize("name", list(CHECKLIST))
def test_paper_intervention_checklist(name):
    text = PAPER_INTERVENTIONS[name]
    for item in CHECKLIST[name]:
        assert re.search(item, text), (name, item)
    assert get_intervention(name, "paper") == text != INTERVENTIONS[name]


def test_paper_ms_hedge_lists_every_phrase_in_published_order():
    text = PAPER_INTERVENTIONS["ms_hedge"]
    table = json.loads(re.search(r"\{.*\}", text).group())
    assert list(table) == list(PAPER_PHRASE_ORDER)
    assert table == CALIBRATED_PHRASES
    # fcjax's own text adds "a phrase per claim"; the published one does not
    assert "each claim" in INTERVENTIONS["ms_hedge"] and "each claim" not in text


def test_paper_intervention_set_is_complete():
    assert list(PAPER_INTERVENTIONS) == list(INTERVENTIONS)
    assert PAPER_INTERVENTIONS["blank"] == ""
    with pytest.raises(ValueError, match="intervention texts"):
        get_intervention("basic", "other")
