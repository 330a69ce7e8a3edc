"""fcjax.decisiveness (lexicon, LLM judge) and the sampling-consistency judge parse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fcjax.confidence.consistency_judge import (
    build_consistency_prompt,
    consistency_score,
    parse_verdict,
)
from fcjax.data.interventions import CALIBRATED_PHRASES
from fcjax.decisiveness import judge, lexicon
from fcjax.decisiveness.lexicon import find_cues, lexicon_decisiveness

# ----------------------------------------------------------------------------- lexicon


def test_plain_step_gets_neutral_default():
    assert lexicon_decisiveness("So 5 * 12 = 60.") == pytest.approx(lexicon.NEUTRAL)
    assert np.isnan(lexicon_decisiveness("  \n"))


@pytest.mark.parametrize(
    ("hedged", "plain", "boosted"),
    [
        ("Maybe x is 3.", "x is 3.", "Clearly x is 3."),
        (
            "I think the answer is B, but I'm not sure.",
            "The option is B.",
            "The option is definitely B.",
        ),
        (
            "Hmm, wait, perhaps the total is 40?",
            "The total is 40.",
            "Without a doubt the total is 40.",
        ),
    ],
)
def test_monotone_hedged_plain_boosted(hedged, plain, boosted):
    h, p, b = (lexicon_decisiveness(t) for t in (hedged, plain, boosted))
    assert 0.0 <= h < p < b <= 1.0


def test_more_hedges_lower():
    one = lexicon_decisiveness("Maybe it is 7.")
    two = lexicon_decisiveness("Maybe it is 7, or perhaps 8.")
    assert two < one
    # Hand computation of the documented rule: 0.9 * (1 - 0.3) * (1 - 0.3).
    assert two == pytest.approx(0.9 * 0.7 * 0.7)


@pytest.mark.parametrize("phrase", sorted(CALIBRATED_PHRASES))
def test_anchor_phrases_near_their_values(phrase):
    d = lexicon_decisiveness(f"Given the numbers, it is {phrase.upper()} that n is even.")
    assert d == pytest.approx(CALIBRATED_PHRASES[phrase], abs=1e-9)


def test_longest_match_and_boundaries():
    assert [c[0] for c in find_cues("It is highly unlikely.")] == ["highly unlikely"]
    assert [c[0] for c in find_cues("I'm   not\nsure here")] == ["i'm not sure"]
    assert [c[0] for c in find_cues("I\u2019m not sure")] == ["i'm not sure"]
    assert find_cues("The mightiest perhapsy unclear clearlyness") == []  # word boundaries
    assert lexicon_decisiveness("Probably not.") == pytest.approx(0.2468)


def test_two_anchors_average_and_hedge_on_anchor():
    d = lexicon_decisiveness("A is likely; B is unlikely.")
    assert d == pytest.approx((0.7091 + 0.2118) / 2)
    hedged = lexicon_decisiveness("Maybe it is likely.")
    assert hedged == pytest.approx(0.7091 * 0.7)


def test_possibility_is_a_hedge():
    """A hedge missed on real SmolLM2 traces ("It is possible for a silverfish to ...")."""
    text = "It is possible for a silverfish to reach the top."
    assert lexicon.lexicon_decisiveness(text) == pytest.approx(lexicon.NEUTRAL * 0.7)
    assert lexicon.find_cues("It\u2019s  possible.")[0][:2] == ("it's possible", "hedge")


def test_lexicons_disjoint_and_scores_vector():
    assert not set(lexicon.HEDGES) & set(lexicon.BOOSTERS)
    assert not set(CALIBRATED_PHRASES) & (set(lexicon.HEDGES) | set(lexicon.BOOSTERS))
    out = lexicon.lexicon_scores(["Clearly 3.", "", "Maybe 3."])
    assert out.shape == (3,) and np.isnan(out[1]) and out[0] > out[2]


# ----------------------------------------------------------------------------- judge


def test_build_judge_prompt():
    steps = ["First, add 2 and 3.\nThat gives 5.", "Maybe the answer is 5?"]
    (msg,) = judge.build_judge_prompt(steps)
    body = msg["content"]
    assert msg["role"] == "user"
    # steps flattened, quoted and numbered
    assert '1. "First, add 2 and 3. That gives 5."\n2. "Maybe the answer is 5?"' in body
    assert "2 numbered steps" in body and "JSON array of 2 numbers" in body
    # the calibration scale is the ms_hedge phrase table, and the hedges are ordered by value
    for phrase, value in CALIBRATED_PHRASES.items():
        assert f'- "{phrase}": {value:.2f}' in body
    order = judge.hedge_order().split(" > ")
    assert order[0] == '"almost certain"' and order[-1] == '"almost no chance"'
    assert order.index('"improbable"') < order.index('"highly unlikely"')  # 0.17 > 0.11
    assert "makes no claim" in body and "is rated 1.0" in body
    assert judge.reply_budget(2) == 50 and judge.reply_budget(20) == 240
    with pytest.raises(ValueError):
        judge.build_judge_prompt([])


def test_judge_prompt_from_file(tmp_path):
    from fcjax.text.templates import TemplateError, load_template

    good = tmp_path / "d.txt"
    good.write_text("Rate these {n} steps as a JSON list: {steps}")
    template = load_template(good, judge.REQUIRED)
    (msg,) = judge.build_judge_prompt(["a", "b\nc"], template)
    assert msg["content"] == 'Rate these 2 steps as a JSON list: 1. "a"\n2. "b c"'
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate these steps: {steps}")
    with pytest.raises(TemplateError, match=r"bad.txt: missing placeholder \{n\}"):
        load_template(bad, judge.REQUIRED)


@pytest.mark.parametrize(
    ("reply", "expected", "how"),
    [
        # valid JSON
        ("[0.1, 1, 0.0]", [0.1, 1.0, 0.0], "json"),
        ("  \n[0.5,0.25,0.75]\n ", [0.5, 0.25, 0.75], "json"),
        ("```json\n[0.2, 0.4, 0.6]\n```", [0.2, 0.4, 0.6], "json"),
        ("<think>step 2 hedges</think>\n[1.0, 0.3, 0.9]", [1.0, 0.3, 0.9], "json"),
        # JSON in prose: read by the fallback
        (
            "Here are the ratings: [0.9, 1.0, 0.25]. I hope this helps.",
            [0.9, 1.0, 0.25],
            "fallback",
        ),
        # bare numbers, list markers skipped
        ("0.8, 0.35, 1.0", [0.8, 0.35, 1.0], "fallback"),
        ("1. 0.7\n2. 0.2\n3. 1.0", [0.7, 0.2, 1.0], "fallback"),
        ("Step 1: 0.95\nStep 2: 0.5\nStep 3: 0.05", [0.95, 0.5, 0.05], "fallback"),
        # out-of-range numbers are skipped, in-range kept in order
        ("[0.1, 1.2, 0.3]", [0.1, 0.3, np.nan], "fallback"),
        ('["0.1", "0.2", "0.3"]', [0.1, 0.2, 0.3], "fallback"),
        # too few: the rest missing; too many: truncated
        ("[0.4, 0.6]", [0.4, 0.6, np.nan], "fallback"),
        ("[0.1, 0.2, 0.3, 0.4, 0.5]", [0.1, 0.2, 0.3], "fallback"),
        ("[0.1, 0.2,", [0.1, 0.2, np.nan], "fallback"),
        # nothing usable
        ("I cannot rate these.", [np.nan] * 3, "failed"),
        ("[true, false, true]", [np.nan] * 3, "failed"),
        ("", [np.nan] * 3, "failed"),
        (None, [np.nan] * 3, "failed"),
    ],
)
def test_parse_judge_reply(reply, expected, how):
    scores, got = judge.parse_judge_reply(reply, 3)
    np.testing.assert_array_equal(scores, expected)
    assert got == how


def fake_complete(bad_batch: int | None = None, prose_batch: int | None = None):
    """A judge that scores each step by its length, fails on one batch and wraps another in
    prose; records calls."""
    calls: list[list] = []

    def complete(prompts):
        calls.append(prompts)
        replies = []
        for b, msgs in enumerate(prompts):
            body = msgs[-1]["content"].split("Steps:\n", 1)[1].split("\n\n")[0]
            texts = [line.split(". ", 1)[1].strip('"') for line in body.splitlines()]
            scores = json.dumps([len(t) / 100 for t in texts])
            if b == bad_batch:
                replies.append("I cannot rate these.")
            else:
                replies.append(f"Sure: {scores}" if b == prose_batch else scores)
        return replies

    return complete, calls


def test_judge_decisiveness_batches_bad_and_fallback_batches():
    steps = [f"t{'x' * i}" for i in range(45)]  # lengths 1..45 -> scores .01..0.45
    complete, calls = fake_complete(bad_batch=1, prose_batch=2)
    scores, fallback, failed = judge.judge_decisiveness(steps, complete, batch_size=20)
    assert len(calls) == 1 and len(calls[0]) == 3  # batches of 20, 20, 5 in one call
    expected = np.array([len(s) / 100 for s in steps])
    np.testing.assert_allclose(scores[:20], expected[:20])
    assert np.isnan(scores[20:40]).all()
    np.testing.assert_allclose(scores[40:], expected[40:])
    assert (fallback, failed) == (1, 1)


def test_judge_traces_one_call_batches_never_mix_traces():
    traces = [[f"a{'x' * i}" for i in range(3)], [], [f"b{'y' * i}" for i in range(25)]]
    complete, calls = fake_complete(bad_batch=1)  # the second prompt: trace 2's first 20 steps
    (s0, f0, n0), (s1, f1, n1), (s2, f2, n2) = judge.judge_traces(traces, complete, batch_size=20)
    assert len(calls) == 1
    assert [p[-1]["content"].split(" numbers")[0].rsplit("only a ", 1)[1] for p in calls[0]] == [
        "JSON array of 3",
        "JSON array of 20",
        "JSON array of 5",
    ]
    np.testing.assert_allclose(s0, [len(t) / 100 for t in traces[0]])
    assert s1.shape == (0,) and n0 == n1 == 0 and f0 == f1 == f2 == 0
    assert np.isnan(s2[:20]).all() and n2 == 1
    np.testing.assert_allclose(s2[20:], [len(t) / 100 for t in traces[2][20:]])


def test_judge_decisiveness_edge_cases():
    complete, calls = fake_complete()
    scores, fallback, failed = judge.judge_decisiveness([], complete)
    assert scores.shape == (0,) and fallback == failed == 0 and calls == []
    with pytest.raises(ValueError, match="replies"):
        judge.judge_decisiveness(["a"], lambda prompts: [])


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ("Yes", 0.0),
        ("no", 1.0),
        ("N/A", 0.5),
        ("n/a - the context is about something else", 0.5),
        ("Not applicable.", 0.5),
        ("**Yes**, the statement follows.", 0.0),
        ("  - NO.", 1.0),
        ("> `yes`", 0.0),
        ("Answer: No", 1.0),
        ("<think>Is it yes? Hmm.</think>\nNo", 1.0),
        ("Nope", None),
        ("Not consistent", None),
        ("Yesterday it was", None),
        ("NA", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict(reply, value):
    assert parse_verdict(reply) == value


def test_consistency_score():
    score, n = consistency_score(["Yes", "Yes", "No", "garbled"])
    # values 0, 0, 1, 0.5 -> 1 - 1.5 / 4
    assert score == pytest.approx(1 - 1.5 / 4) and n == 1
    score, n = consistency_score(["Yes", "N/A"])  # N/A is 0.5 but parsed
    assert score == pytest.approx(0.75) and n == 0
    assert consistency_score(["Yes"] * 10) == (1.0, 0)
    assert consistency_score(["No"] * 3) == (0.0, 0)
    score, n = consistency_score([])
    assert np.isnan(score) and n == 0


def test_build_consistency_prompt(tmp_path):
    (m,) = build_consistency_prompt("  We get 12.\n", "The total is 12.")
    assert m["role"] == "user"
    assert "Context:\nWe get 12.\n" in m["content"]
    assert "Statement:\nThe total is 12." in m["content"]
    assert "Yes, No, or N/A" in m["content"] and "not contradict" not in m["content"]
    (m,) = build_consistency_prompt("c", "a", "Does {assertion} follow from {context}?")
    assert m["content"] == "Does a follow from c?"
    with pytest.raises(ValueError, match=r"missing placeholder \{context\}"):
        build_consistency_prompt("c", "a", "Is {assertion} true?")
