"""--protocol=paper against the published pipeline's own outputs.

tests/fixtures/published/published.json holds what the published functions (yale-nlp/
faithful_lrm at bc5fe95) return on the cases in tests/fixtures/published/make_fixtures.py,
which ran them from a checkout in a throwaway venv. fcjax's paper-protocol functions must
give the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fcjax.data.datasets import paper_subset
from fcjax.metrics.trajectory import trajectory_bin
from fcjax.text.answers import extract_answer_paper, paper_accuracy, score
from fcjax.text.steps import paper_spans, paper_step_draw, split_steps

PUBLISHED = json.loads(
    (Path(__file__).parent / "fixtures" / "published" / "published.json").read_text()
)


def test_fixture_is_the_published_commit():
    assert PUBLISHED["source"] == "yale-nlp/faithful_lrm bc5fe95"


@pytest.mark.parametrize("case", PUBLISHED["answers"][::13], ids=lambda c: repr(c["text"][:30]))
def test_extraction_matches_published(case):
    assert extract_answer_paper(case["text"]) == case["extracted"]


def test_scoring_matches_published():
    assert len(PUBLISHED["answers"]) > 300
    for case in PUBLISHED["answers"]:
        got = score(
            extract_answer_paper(case["text"]),
            case["gold"],
            dataset=case["dataset"],
            answer_type=case["answer_type"],
        )
        assert got == case["correct"], case


def test_every_scorer_gives_each_outcome():
    """The fixture is not degenerate: each published scorer returns True and False on it,
    and the ones that can refuse return None on some case."""
    outcomes: dict[str, set] = {}
    for case in PUBLISHED["answers"]:
        outcomes.setdefault(case["dataset"], set()).add(case["correct"])
    assert outcomes["legalbench"] == {True, False}  # yes/no is never excluded
    for dataset in ("aime", "supergpqa", "musr"):
        assert outcomes[dataset] == {True, False, None}
    assert {True, False} <= outcomes["hle"]


def test_accuracy_denominator_matches_published():
    for row in PUBLISHED["accuracy"]:
        acc, denominator = paper_accuracy(row["correct"])
        assert denominator == row["denominator"]
        assert acc == pytest.approx(row["n_correct"] / row["denominator"])
    assert any(r["n_none"] > 0 for r in PUBLISHED["accuracy"])


@pytest.mark.parametrize("case", PUBLISHED["steps"], ids=lambda c: repr(c["text"][:20]))
def test_segmentation_matches_published(case):
    assert [list(s) for s in paper_spans(case["text"])] == case["spans"]
    steps = split_steps(case["text"], "paper")
    assert [s.text for s in steps] == [s[2] for s in case["spans"]]
    for s in steps:  # fcjax's Step invariant: the span is the stripped text
        assert case["text"][s.start : s.end] == s.text


def test_step_draw_matches_published():
    draw = PUBLISHED["step_draw"]
    assert paper_step_draw(draw["n_steps"], 20, 42) == draw["selected"]
    # the draw is one stream: dropping an earlier long example changes a later one
    later = paper_step_draw(draw["n_steps"][2:], 20, 42)
    assert later[1] != draw["selected"][3]


def test_subset_matches_published():
    for case in PUBLISHED["subset"]:
        assert paper_subset(case["n_rows"], case["n"], 42) == case["order"]


def test_trajectory_bin_matches_published():
    rows = PUBLISHED["trajectory"]["rows"]
    n_steps: dict[int, int] = {}
    for r in rows:
        n_steps[r["idx"]] = max(n_steps.get(r["idx"], 0), r["step"] + 1)
    position = [r["step"] / (n_steps[r["idx"]] - 1) if n_steps[r["idx"]] > 1 else 0.0 for r in rows]
    np.testing.assert_array_equal(position, [r["position"] for r in rows])
    got = trajectory_bin(position, PUBLISHED["trajectory"]["n_bins"], closed="right")
    assert got.tolist() == [r["bin"] for r in rows]
    left = trajectory_bin(position, 20, closed="left")
    assert (left != got).any()  # fcjax's left-closed bins differ on edge positions


def test_summary_under_paper_accuracy_and_trajectory():
    """Accuracy over scorable traces only, and right-closed trajectory bins, under paper;
    fcjax's protocol counts an unscorable trace as wrong and closes bins on the left."""
    from fcjax.metrics import summarize

    steps = {
        "example_id": ["e1", "e1", "e1", "e2", "e3"],
        "position": np.array([0.0, 0.5, 1.0, 0.0, 0.0]),
        "decisiveness": np.array([0.2, 0.4, 0.6, 0.8, 1.0]),
    }
    examples = {
        "example_id": ["e1", "e2", "e3"],
        "correct": np.array([True, False, False]),
        "scorable": np.array([True, True, False]),
        "n_steps": np.array([3, 1, 1]),
        "prediction": ["3", "4", ""],
        "finish_reason": ["eos", "eos", "eos"],
    }
    paper = summarize(steps, examples, {}, protocol="paper")
    own = summarize(steps, examples, {}, protocol="fcjax")
    assert paper["accuracy"] == pytest.approx(1 / 2) and own["accuracy"] == pytest.approx(1 / 3)
    # 0.5 of 20 bins: the published right-closed bins put it in bin 9, fcjax's in bin 10
    assert paper["trajectory"]["count"][9] == 1 and paper["trajectory"]["count"][10] == 0
    assert own["trajectory"]["count"][10] == 1 and own["trajectory"]["count"][9] == 0


@pytest.mark.parametrize(
    ("prediction", "gold", "dataset", "answer_type", "want"),
    [
        ("x = 1, so 12", "112", "aime", None, True),  # every digit as one integer
        ("twelve", "12", "aime", None, None),  # no digit: not scorable
        ("", "Paris", "hle", "exactMatch", True),  # containment either way
        ("paris, france", "Paris", "hle", "exactMatch", True),
        ("Lyon", "Paris", "hle", "exactMatch", False),
        ("b) the second", "B", "hle", "multipleChoice", True),
        ("C", "B", "hle", "multipleChoice", False),
        ("Between 2 and 3, I pick 3", "C", "supergpqa", None, False),  # the first integer
        ("Option 2 of 4", "B", "musr", None, True),
        ("the second one", "B", "musr", None, None),
        ("Yes, it does", "Yes", "legalbench", None, True),
        ("yes or no", "No", "legalbench", None, False),  # both words: whole-answer compare
        ("maybe", "No", "legalbench", None, False),  # never None
    ],
)
def test_each_published_scorer_by_hand(prediction, gold, dataset, answer_type, want):
    assert score(prediction, gold, dataset=dataset, answer_type=answer_type) is want


def test_score_own_kinds_and_errors():
    assert score("(B)", "B", dataset="letter", choices=["x", "y"]) is True
    assert score("no idea", "B", dataset="letter", choices=["x", "y"]) is None  # unscorable
    assert score("3", "4", dataset="numeric") is False
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        score("1", "1", dataset="gsm9k")
    with pytest.raises(ValueError, match="answer_type"):
        score("1", "1", dataset="hle", answer_type="free")
    with pytest.raises(ValueError, match="option letter"):
        score("1", "yes", dataset="musr")
