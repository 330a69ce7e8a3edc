"""fcjax.decisiveness (lexicon, LLM judge) and the sampling-consistency judge parse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fcjax.confidence.consistency_judge import (
    build_consistency_prompt,
    consistency_score,
    parse_yes_no,
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
    steps = ["First, add 2 and 3.", "Maybe the answer is 5?"]
    msgs = judge.build_judge_prompt(steps)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "0.0" in msgs[0]["content"] and "1.0" in msgs[0]["content"]
    assert "hedging" in msgs[0]["content"] and "punts" in msgs[0]["content"]
    shot = json.loads(msgs[2]["content"])
    assert len(shot) == len(judge.FEW_SHOT) and all(0 <= v <= 1 for v in shot)
    last = msgs[-1]["content"]
    assert "Step 1:\nFirst, add 2 and 3." in last and "Step 2:\nMaybe the answer is 5?" in last
    assert "JSON list of 2 numbers" in last
    folded = judge.build_judge_prompt(steps, system_role=False)
    assert folded[0]["role"] == "user" and folded[0]["content"].startswith(msgs[0]["content"])
    with pytest.raises(ValueError):
        judge.build_judge_prompt([])


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("[0.1, 1, 0.0]", [0.1, 1.0, 0.0]),
        ("  \n[0.5,0.25,0.75]\n ", [0.5, 0.25, 0.75]),
        ("```json\n[0.2, 0.4, 0.6]\n```", [0.2, 0.4, 0.6]),
        ("```\n[1.0, 1.0, 0.9]\n```", [1.0, 1.0, 0.9]),
    ],
)
def test_parse_valid(reply, expected):
    np.testing.assert_array_equal(judge.parse_judge_reply(reply, 3), expected)


@pytest.mark.parametrize(
    "reply",
    [
        "[0.1, 0.2]",  # wrong length
        "[0.1, 0.2, 0.3, 0.4]",
        "[0.1, 1.2, 0.3]",  # out of range
        "[0.1, -0.1, 0.3]",
        "Here are the scores: [0.1, 0.2, 0.3]",  # prose
        "[0.1, 0.2, 0.3] I hope this helps.",
        '["0.1", "0.2", "0.3"]',  # strings
        '[0.1, "NaN", 0.3]',
        "[0.1, NaN, 0.3]",  # bare NaN literal
        "[0.1, Infinity, 0.3]",
        "[[0.1], [0.2], [0.3]]",  # nested
        "[0.1, [0.2], 0.3]",
        "[true, false, true]",  # booleans are not scores
        "[0.1, 0.2, null]",
        "[0.1, 0.2,",  # truncated
        "",
        "0.1, 0.2, 0.3",
    ],
)
def test_parse_malformed_all_nan(reply):
    out = judge.parse_judge_reply(reply, 3)
    assert out.shape == (3,) and np.isnan(out).all()


def fake_complete(bad_batch: int | None = None):
    """A judge that scores each step by its length, fails on one batch; records calls."""
    calls: list[list] = []

    def complete(prompts):
        calls.append(prompts)
        replies = []
        for b, msgs in enumerate(prompts):
            body = msgs[-1]["content"]
            n = body.count("Step ")
            texts = [body.split(f"Step {i + 1}:\n")[1].split("\n\n")[0] for i in range(n)]
            scores = [len(t) / 100 for t in texts]
            replies.append("I cannot rate these." if b == bad_batch else json.dumps(scores))
        return replies

    return complete, calls


def test_judge_decisiveness_batches_and_bad_batch():
    steps = [f"t{'x' * i}" for i in range(45)]  # lengths 1..45 -> scores .01..0.45
    complete, calls = fake_complete(bad_batch=1)
    scores, n_unparsed = judge.judge_decisiveness(steps, complete, batch_size=20)
    assert len(calls) == 1 and len(calls[0]) == 3  # batches of 20, 20, 5 in one call
    expected = np.array([len(s) / 100 for s in steps])
    np.testing.assert_allclose(scores[:20], expected[:20])
    assert np.isnan(scores[20:40]).all()
    np.testing.assert_allclose(scores[40:], expected[40:])
    assert n_unparsed == 1


def test_judge_traces_one_call_batches_never_mix_traces():
    traces = [[f"a{'x' * i}" for i in range(3)], [], [f"b{'y' * i}" for i in range(25)]]
    complete, calls = fake_complete(bad_batch=1)  # the second prompt: trace 2's first 20 steps
    (s0, n0), (s1, n1), (s2, n2) = judge.judge_traces(traces, complete, batch_size=20)
    assert len(calls) == 1 and [p[-1]["content"].count("Step ") for p in calls[0]] == [3, 20, 5]
    np.testing.assert_allclose(s0, [len(t) / 100 for t in traces[0]])
    assert s1.shape == (0,) and n0 == n1 == 0
    assert np.isnan(s2[:20]).all() and n2 == 1
    np.testing.assert_allclose(s2[20:], [len(t) / 100 for t in traces[2][20:]])


def test_judge_decisiveness_edge_cases():
    complete, calls = fake_complete()
    scores, n = judge.judge_decisiveness([], complete)
    assert scores.shape == (0,) and n == 0 and calls == []
    with pytest.raises(ValueError, match="replies"):
        judge.judge_decisiveness(["a"], lambda prompts: [])


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ("Yes", 0.0),
        ("no", 1.0),
        ("**Yes**, the assertion follows.", 0.0),
        ("  - NO.", 1.0),
        ("> `yes`", 0.0),
        ("Answer: No", 1.0),
        ("<think>Is it yes? Hmm.</think>\nNo", 1.0),
        ("Nope", None),
        ("Not consistent", None),
        ("Yesterday it was", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_yes_no(reply, value):
    assert parse_yes_no(reply) == value


def test_consistency_score():
    score, n = consistency_score(["Yes", "Yes", "No", "garbled"])
    # values 0, 0, 1, 0.5 -> 1 - 1.5 / 4
    assert score == pytest.approx(1 - 1.5 / 4) and n == 1
    assert consistency_score(["Yes"] * 10) == (1.0, 0)
    assert consistency_score(["No"] * 3) == (0.0, 0)
    score, n = consistency_score([])
    assert np.isnan(score) and n == 0


def test_build_consistency_prompt():
    (m,) = build_consistency_prompt("  We get 12.\n", "The total is 12.")
    assert m["role"] == "user"
    assert (
        "Context:\nWe get 12.\n" in m["content"] and "Assertion:\nThe total is 12." in m["content"]
    )
    assert "Yes or No" in m["content"]
