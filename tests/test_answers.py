"""Answer extraction and scoring: every row of every shared dataset, plus edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcjax.text import extract_answer, infer_kind, score_answer

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_FILES = sorted(DATA_DIR.glob("*.jsonl")) if DATA_DIR.is_dir() else []


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _wrong(gold: str, kind: str, choices: list[str] | None) -> list[str]:
    """Answers a model could give that differ from the gold answer."""
    if kind == "letter":
        other = (ord(gold) - ord("A") + 1) % len(choices)
        return [f"Answer: ({chr(ord('A') + other)})", choices[other]]
    if kind == "yesno":
        return ["No" if gold.lower() == "yes" else "Yes"]
    if kind == "numeric":
        value = float(gold) + 1
        return [str(int(value)) if value.is_integer() else str(value)]
    return [gold + "+1", gold + "x"]


def _right(gold: str, kind: str, choices: list[str] | None) -> list[str]:
    """Ways a model writes the gold answer, as full generations."""
    texts = [
        f"<think>Let me work.\n\nDone.</think>\nSo the result is \\boxed{{{gold}}}.",
        f"We compute things.\n\nFinal answer: {gold}",
    ]
    if kind == "letter":
        index = ord(gold) - ord("A")
        texts += [
            f"Thinking...\n\nAnswer: ({gold})",
            f"Thinking...\n\n**Final Answer:** {choices[index]}",
        ]
    return texts


@pytest.mark.skipif(not DATA_FILES, reason="shared data directory not present")
@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.stem)
def test_every_dataset_row_scores_right_and_wrong(path: Path) -> None:
    failures = []
    for line_no, row in enumerate(_rows(path), start=1):
        gold, choices = row["answer"], row["choices"]
        kind = infer_kind(gold, choices)
        for text in _right(gold, kind, choices):
            if not score_answer(extract_answer(text), gold, kind, choices):
                failures.append((line_no, "right", text[-80:], extract_answer(text)))
        for wrong in _wrong(gold, kind, choices):
            for text in (f"\\boxed{{{wrong}}}", f"Final answer: {wrong}"):
                if score_answer(extract_answer(text), gold, kind, choices):
                    failures.append((line_no, "wrong", text[-80:], gold))
    assert not failures, f"{path.name}: {len(failures)} failures, e.g. {failures[:5]}"


def test_infer_kind() -> None:
    assert infer_kind("C", ["a", "b", "c"]) == "letter"
    assert infer_kind("Yes", None) == "yesno"
    assert infer_kind("no", None) == "yesno"
    assert infer_kind("-18", None) == "numeric"
    assert infer_kind("0.25", None) == "numeric"
    assert infer_kind("\\frac{1}{2}", None) == "math"
    assert infer_kind("1,000", None) == "math"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x \\boxed{\\frac{a}{\\sqrt{b}}} y", "\\frac{a}{\\sqrt{b}}"),
        ("\\boxed{1} then \\boxed{{2}}", "{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed {12}", "12"),
        ("first \\boxed{3} then unclosed \\boxed{4", "3"),
        ("<think>\\boxed{1}</think> The answer is \\boxed{2}", "2"),
        ("<think>\\boxed{1}</think>\nno box here, sorry", "no box here, sorry"),
        ("<think>\\boxed{1}</think>\n\n", "1"),
        ("blah\nFinal answer: 42.\nThanks!", "42"),
        ("blah\n**Final Answer:** **C**\n", "C"),
        ("Answer: (B)\nsome trailing line", "(B)"),
        ("final answer:\n  17\n", "17"),
        ("line one\n\n  last line here.  \n\n", "last line here"),
        ("3.14.", "3.14"),
    ],
)
def test_extract_answer_cases(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "   \n\n ", "\\boxed{}"])
def test_extract_answer_empty_is_none(text: str) -> None:
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("18.0", "18", True),
        ("$18", "18", True),
        ("$1,234.00", "1234", True),
        ("18 dollars", "18", True),
        ("\\text{18 eggs}", "18", True),
        ("25\\%", "25", True),
        ("She makes 18 per day.", "18", True),
        ("-7", "-7", True),
        ("−7", "-7", True),
        ("17.999999", "18", False),
        ("19", "18", False),
        ("no number", "18", False),
        (None, "18", False),
    ],
)
def test_score_numeric(prediction: str | None, gold: str, expected: bool) -> None:
    assert score_answer(prediction, gold, "numeric") is expected


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("1/2", "\\frac{1}{2}", True),
        ("0.5", "\\frac{1}{2}", True),
        ("$\\frac{3}{4}$", "\\tfrac34", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
        ("90", "90^\\circ", True),
        ("90 degrees", "90^\\circ", True),
        ("\\text{Evelyn}", "Evelyn", True),
        ("10080", "10,\\!080", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),  # sympy
        ("x + 1", "1+x", True),  # sympy
        ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),  # sympy
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        ("(3,4)", "(3,4]", False),
        ("\\sqrt{7}", "\\sqrt{8}", False),
        ("2^{9999999}", "2", False),  # guarded: never evaluated
        (None, "1", False),
    ],
)
def test_score_math(prediction: str | None, gold: str, expected: bool) -> None:
    assert score_answer(prediction, gold, "math") is expected


CHOICES = ["Red is first.", "Blue is first.", "Green is first.", "Gold is first."]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("(C)", True),
        ("C)", True),
        ("C.", True),
        ("C", True),
        ("c", True),
        ("Answer: C", True),
        ("The answer is (C).", True),
        ("(C) Green is first.", True),
        ("green is first", True),
        ("\\text{(C)}", True),
        ("(B)", False),
        ("Blue is first.", False),
        ("E", False),
        ("I think so", False),
    ],
)
def test_score_letter(prediction: str, expected: bool) -> None:
    assert score_answer(prediction, "C", "letter", CHOICES) is expected


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Yes", "Yes", True),
        ("yes, because it is cold", "Yes", True),
        ("True", "yes", True),
        ("The answer is no.", "No", True),
        ("false", "No", True),
        ("No", "Yes", False),
        ("Nope", "No", False),
        ("maybe", "Yes", False),
    ],
)
def test_score_yesno(prediction: str, gold: str, expected: bool) -> None:
    assert score_answer(prediction, gold, "yesno") is expected


def test_bad_gold_raises_clear_error() -> None:
    with pytest.raises(ValueError, match="numeric gold"):
        score_answer("1", "abc", "numeric")
    with pytest.raises(ValueError, match="unknown answer kind"):
        score_answer("1", "1", "fraction")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_extract_answer_never_crashes(text: str) -> None:
    result = extract_answer(text)
    assert result is None or isinstance(result, str)


_MATHY = st.text(alphabet="0123456789+-*/^()[]{}.,$\\ abcxyzfracsqrtpi", max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.none(), st.text(), _MATHY),
    st.sampled_from(["numeric", "math", "letter", "yesno"]),
)
def test_score_answer_never_crashes(prediction: str | None, kind: str) -> None:
    gold = {"numeric": "18", "math": "\\frac{1}{2}", "letter": "B", "yesno": "Yes"}[kind]
    choices = CHOICES if kind == "letter" else None
    assert score_answer(prediction, gold, kind, choices) in (True, False)


def test_first_boxed_rule_and_numbered_choices():
    from fcjax.text.answers import is_scorable

    text = "First try \\boxed{12}. Hmm, no: \\boxed{14}."
    assert extract_answer(text) == "14"
    assert extract_answer(text, rule="first") == "12"
    with pytest.raises(ValueError, match="rule"):
        extract_answer(text, rule="middle")
    choices = ["red", "blue", "green"]
    for pred in ("2", "(2)", "2.", "Option 2", "blue"):
        assert score_answer(pred, "B", "letter", choices, numbered=True), pred
    assert not score_answer("3", "B", "letter", choices, numbered=True)
    assert not score_answer("B", "B", "letter", choices, numbered=True)  # options were numbers
    assert score_answer("B", "B", "letter", choices)  # fcjax: letters
    # scorable: the answer names an option / a number / yes or no
    assert is_scorable("2", "letter", choices, numbered=True)
    assert not is_scorable("4", "letter", choices, numbered=True)
    assert not is_scorable(None, "numeric")
    assert is_scorable("no idea", "numeric")  # an answer, scored wrong
    assert is_scorable("Yes", "yesno") and not is_scorable("maybe", "yesno")
