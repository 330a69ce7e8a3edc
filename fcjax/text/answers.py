"""Final-answer extraction and scoring per dataset kind (METHOD.md section 1).

`extract_answer` pulls the model's final answer out of a generation; `score_answer` compares
it with a gold answer according to the dataset kind (`infer_kind`).

Why not math-verify (measured with `python -m experiments.compare_math_verify`, math-verify
0.9.0, on ../shared/data math500.jsonl and aime_1983_2024.jsonl): of 2078 equivalent
rewrites of the 500 MATH-500 golds (dollars, \\dfrac, \\left/\\right, a/b, decimals,
(A)/(B), \\sqrt n, commuted sums), this scorer accepts 2066 and math-verify 2068 (it also
reads (A)/(B) inside tuples and intervals; this scorer instead reads mixed numbers); both
accept every gold against itself. But math-verify accepts 9 of 987 wrong answers (another
digit in a base subscript, 52_9 for 52_8; .0000673 for .0000672, within its tolerance), this
scorer none, and it is about 8x slower. On AIME both agree on all 5598 cases. A wrong
answer scored correct biases accuracy and every calibration figure, so this scorer stays.
"""

from __future__ import annotations

import math
import re
import string
from typing import Literal

AnswerKind = Literal["numeric", "math", "letter", "yesno"]

_NUMBER_RE = re.compile(r"-?\d+(\.\d+)?")


def infer_kind(answer: str, choices: list[str] | None) -> AnswerKind:
    """Scoring kind of a gold answer: letter (has choices), yesno, numeric, else math."""
    if choices:
        return "letter"
    stripped = answer.strip()
    if stripped.lower() in ("yes", "no"):
        return "yesno"
    if _NUMBER_RE.fullmatch(stripped):
        return "numeric"
    return "math"


# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE_RE = re.compile(
    r"^[\s>#*_\-]*(?:the\s+)?(?:final\s+)?answer\s*(?:\*\*|__)?\s*(?:is\s*:?|:)(?P<rest>.*)$",
    re.IGNORECASE,
)


def _braced(text: str, open_idx: int) -> str | None:
    """Content of the brace group whose '{' is at `open_idx` (nesting aware), None if open."""
    depth = 0
    for i in range(open_idx, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
    return None


def _last_boxed(text: str, first: bool = False) -> str | None:
    """Content of the last (or with ``first``, the first) closed `\\boxed{...}` /
    `\\fbox{...}` in `text`."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    closing: dict[int, int] = {}  # '{' index -> matching '}' index, one linear pass
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
    for match in matches if first else reversed(matches):
        open_idx = match.end() - 1
        if open_idx in closing:
            return text[open_idx + 1 : closing[open_idx]]
    return None


def _clean_answer(value: str) -> str:
    """Strip markdown emphasis, whitespace and a trailing period."""
    value = value.replace("**", "").replace("__", "").strip()
    if value.endswith(".") and not value.endswith(".."):
        value = value[:-1].rstrip()
    return value


def _extract_from(text: str, first_boxed: bool = False) -> str | None:
    boxed = _last_boxed(text, first_boxed)
    if boxed is not None:
        return boxed.strip() or None
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        match = _ANSWER_LINE_RE.match(lines[i])
        if match is None:
            continue
        rest = _clean_answer(match.group("rest"))
        if rest:
            return rest
        following = [ln for ln in lines[i + 1 :] if ln.strip()]
        if following:
            return _clean_answer(following[0]) or None
    for line in reversed(lines):
        if line.strip():
            return _clean_answer(line) or None
    return None


ANSWER_RULES = ("last", "first")


def extract_answer(text: str, rule: str = "last") -> str | None:
    """Final answer of a generation, or None when there is none.

    Order: the last `\\boxed{...}` (or `\\fbox{...}`, braces may nest; the FIRST one with
    rule="first", the published rule), else the last line `Final answer: ...` /
    `Answer: ...` (case-insensitive, markdown `**` and a trailing period removed), else the
    last non-empty line. The text after the last `</think>` is searched first; the whole
    text when that part gives nothing.
    """
    if rule not in ANSWER_RULES:
        raise ValueError(f"extract_answer: rule must be one of {ANSWER_RULES}, got {rule!r}")
    if not text or not text.strip():
        return None
    first = rule == "first"
    if "</think>" in text:
        tail = text.rsplit("</think>", 1)[1]
        found = _extract_from(tail, first)
        if found is not None:
            return found
    return _extract_from(text, first)


# ----------------------------------------------------------------------------- normalisation

_NUM_TOKEN_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{")


def _strip_text_commands(s: str) -> str:
    """Replace `\\text{x}` (and similar) by `x`, nesting aware."""
    for _ in range(20):
        match = _TEXT_CMD_RE.search(s)
        if match is None:
            break
        content = _braced(s, match.end() - 1)
        if content is None:
            s = s[: match.start()] + s[match.end() :]
        else:
            s = s[: match.start()] + content + s[match.end() + len(content) + 1 :]
    return s


def _normalize_math(s: str) -> str:
    """Canonical string form of a LaTeX answer (for string comparison)."""
    s = s.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _strip_text_commands(s)
    s = s.replace("−", "-")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = re.sub(r"\\circ", "", s)
    s = re.sub(r"\s*(?:degrees|degree)\s*$", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s)
    # \frac12 -> \frac{1}{2}; \frac{a}b -> \frac{a}{b}; \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\w)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\frac(\w)(\{)", r"\\frac{\1}\2", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)
    s = s.rstrip(".")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    # a/b with plain numbers -> \frac{a}{b}
    frac = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if frac:
        s = f"{frac.group(1)}\\frac{{{frac.group(2)}}}{{{frac.group(3)}}}"
    return s


def _to_float(s: str) -> float | None:
    """Parse a plain number ('1,234.5', '-.5', '18.0'), else None."""
    s = s.strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return float(s)
    frac = re.fullmatch(r"(-?)\\frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s)
    if frac and float(frac.group(3)) != 0:
        value = float(frac.group(2)) / float(frac.group(3))
        return -value if frac.group(1) else value
    return None


def _numeric_value(s: str) -> float | None:
    """Number in a numeric prediction: the whole thing when it is a number (units, $, % and
    thousands separators removed), else the last number in the sentence."""
    t = _strip_text_commands(s).replace("\\$", "").replace("$", "").replace("−", "-")
    t = t.replace("\\%", "").replace("%", "").replace("\\!", "").replace("\\,", "")
    t = t.strip().rstrip(".").strip()
    t = re.sub(r"\\[dt]frac", r"\\frac", t)
    whole = re.sub(r"(?<=\d)\s*[A-Za-z][A-Za-z\s\^\d/.]*$", "", t).strip()
    value = _to_float(whole.replace(" ", ""))
    if value is not None:
        return value
    numbers = _NUM_TOKEN_RE.findall(t)
    if not numbers:
        return None
    return float(numbers[-1].replace(",", ""))


def _close(a: float, b: float) -> bool:
    """Integers compare exactly (so 1000000000 != 1000000001); other values within 1e-9."""
    if a.is_integer() and b.is_integer():
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# ----------------------------------------------------------------------------- sympy check

_SAFE_EXPR_RE = re.compile(r"[0-9a-zA-Z+\-*/^()., ]+")
_ALLOWED_WORDS = {"sqrt", "pi"}
_EXPONENT_RE = re.compile(
    r"\^\s*(?:\(\s*-?(?:\d{1,2}|[A-Za-z])\s*\)|-?(?:\d{1,2}|[A-Za-z])(?![\d(.]))"
)


def _latex_to_plain(s: str) -> str | None:
    """Very small LaTeX -> sympy-syntax conversion for normalised strings; None if unsure."""
    for _ in range(10):
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    s = s.replace("\\pi", " pi ").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("{", "(").replace("}", ")")
    if "\\" in s or not _SAFE_EXPR_RE.fullmatch(s):
        return None
    words = set(re.findall(r"[A-Za-z]{2,}", s))
    if not words <= _ALLOWED_WORDS:
        return None
    # Refuse anything that could take long to evaluate: at most two powers, each with a
    # one-letter or two-digit exponent, never a power of a power without parentheses.
    if s.count("^") > 2 or len(s) > 120:
        return None
    exponents = list(_EXPONENT_RE.finditer(s))
    if len(exponents) != s.count("^") or any(s[m.end() : m.end() + 1] == "^" for m in exponents):
        return None
    if re.search(r"\d{30,}", s):
        return None
    return s


def _sympy_equal(a: str, b: str) -> bool:
    """Symbolic equivalence of two normalised answers; False whenever unsure."""
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            convert_xor,
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:  # pragma: no cover - sympy is a dependency
        return False
    plain_a, plain_b = _latex_to_plain(a), _latex_to_plain(b)
    if plain_a is None or plain_b is None or "," in plain_a or "," in plain_b:
        return False
    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor)
    # Every letter is a plain symbol (so "N", "S", "O" never reach sympy functions).
    names = {ch: sympy.Symbol(ch) for ch in string.ascii_letters}
    names.update({"pi": sympy.pi, "i": sympy.I, "e": sympy.E, "sqrt": sympy.sqrt})
    try:
        expr_a = parse_expr(plain_a, local_dict=dict(names), transformations=transformations)
        expr_b = parse_expr(plain_b, local_dict=dict(names), transformations=transformations)
        return bool(sympy.simplify(expr_a - expr_b) == 0)
    except Exception:  # any parse/eval failure means "not shown equal"
        return False


# ----------------------------------------------------------------------------- scoring

_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Za-z])\)?[.:]?$"),
    re.compile(r"^\(([A-Z])\)"),
    re.compile(r"^([A-Z])[).:](?:\s|$)"),
    re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-Z])\)?(?:[\s.,:;)]|$)", re.IGNORECASE),
)


def _norm_option(s: str) -> str:
    s = s.replace("**", "").strip().lower()
    s = re.sub(r"\s+", " ", s)
    return s.rstrip(".").strip()


_NUMBERED_RE = re.compile(r"^(?:option\s*)?\(?(\d{1,2})\)?[.:]?(?:\s|$)", re.IGNORECASE)


def _letter_of(prediction: str, choices: list[str] | None, numbered: bool = False) -> str | None:
    p = _strip_text_commands(prediction).replace("**", "").replace("$", "").strip()
    if numbered:  # options shown as 1..n: "2", "(2)", "2.", "Option 2" or the option text
        match = _NUMBERED_RE.match(p)
        if match and choices and 1 <= int(match.group(1)) <= len(choices):
            return chr(ord("A") + int(match.group(1)) - 1)
        candidates = {_norm_option(prediction), _norm_option(p)} - {""}
        for i, option in enumerate(choices or []):
            if _norm_option(option) in candidates:
                return chr(ord("A") + i)
        return None
    if choices:
        candidates = {_norm_option(prediction), _norm_option(p)} - {""}
        for i, option in enumerate(choices):
            if _norm_option(option) in candidates:
                return chr(ord("A") + i)
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(p)
        if match:
            letter = match.group(1).upper()
            if choices and ord(letter) - ord("A") >= len(choices):
                continue
            return letter
    return None


_YES = {"yes": True, "true": True, "no": False, "false": False}


def _yesno_of(prediction: str) -> bool | None:
    p = _strip_text_commands(prediction).replace("**", "").strip().lower()
    first = re.match(r"^\W*([a-z]+)", p)
    if first and first.group(1) in _YES:
        return _YES[first.group(1)]
    match = re.search(r"answer\s*(?:is|:)\s*:?\W*(yes|no|true|false)\b", p)
    if match:
        return _YES[match.group(1)]
    return None


def score_answer(
    prediction: str | None,
    gold: str,
    kind: AnswerKind,
    choices: list[str] | None = None,
    numbered: bool = False,
) -> bool:
    """Whether `prediction` (an `extract_answer` result) matches `gold` for this kind.

    numeric: compared as floats ($, thousands separators, %, units removed; the last number
    of a sentence). math: normalised LaTeX string match, then sympy equivalence for simple
    expressions. letter: "(C)", "C)", "C.", "Answer: C", "C" or the option text itself; with
    ``numbered`` (options shown as 1..n) "3", "(3)", "3.", "Option 3" or the option text.
    yesno: yes/no/true/false as the first word or the answer word. None is never correct.
    """
    if prediction is None:
        return False
    if kind == "numeric":
        gold_value = _numeric_value(gold)
        pred_value = _numeric_value(prediction)
        if gold_value is None:
            raise ValueError(f"score_answer: numeric gold answer {gold!r} has no number")
        return pred_value is not None and _close(pred_value, gold_value)
    if kind == "math":
        norm_pred, norm_gold = _normalize_math(prediction), _normalize_math(gold)
        if norm_pred == norm_gold:
            return True
        value_pred, value_gold = _to_float(norm_pred), _to_float(norm_gold)
        if value_pred is not None and value_gold is not None:
            return _close(value_pred, value_gold)
        return _sympy_equal(norm_pred, norm_gold)
    if kind == "letter":
        gold_letter = _letter_of(gold, choices)
        if gold_letter is None:
            raise ValueError(f"score_answer: letter gold answer {gold!r} is not a letter")
        return _letter_of(prediction, choices, numbered) == gold_letter
    if kind == "yesno":
        gold_bool = _yesno_of(gold)
        if gold_bool is None:
            raise ValueError(f"score_answer: yes/no gold answer {gold!r} is not yes or no")
        return _yesno_of(prediction) is gold_bool
    raise ValueError(f"score_answer: unknown answer kind {kind!r}")


def is_scorable(
    prediction: str | None,
    kind: AnswerKind,
    choices: list[str] | None = None,
    numbered: bool = False,
) -> bool:
    """Whether a prediction can be scored at all: there is one, and for multiple choice it
    names an option, for yes/no it says yes or no. A numeric or math answer is always
    comparable (one without a number is scored wrong). Unscorable traces are left out of the
    summaries."""
    if prediction is None:
        return False
    if kind == "letter":
        return _letter_of(prediction, choices, numbered) is not None
    if kind == "yesno":
        return _yesno_of(prediction) is not None
    return True


# ----------------------------------------------------------------------------- published rules
# Under --protocol=paper answers are read and scored as the published pipeline does, quirks
# included (docs/PROTOCOL.md lists each one): the extraction order below, and one scorer
# per study dataset that may return None ("cannot be scored"; left out of the accuracy).

_PAPER_FINAL_LINE = re.compile(r"^\s*final\s*answer\s*[:\-]\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_PAPER_ANSWER_LINE = re.compile(r"^\s*answer\s*[:\-]\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_PAPER_BOXED = re.compile(r"\\boxed\{(.+?)\}")

PAPER_DATASETS = ("aime", "hle", "supergpqa", "musr", "legalbench")
HLE_ANSWER_TYPES = ("exactMatch", "multipleChoice")


def study_dataset(source: str) -> str | None:
    """Which of the study's datasets (``PAPER_DATASETS``) an example source or dataset name
    is, by name ("aime_1983_2024.jsonl" and "aime" are "aime", "cais/hle" and "hle_text"
    "hle", ...); None for the others (gsm8k, math500, ...)."""
    low = source.lower()
    return next((name for name in PAPER_DATASETS if name in low), None)


def extract_answer_paper(text: str) -> str:
    """The published answer rule, over the WHOLE text (think block included): the first
    "Final answer:" (or "-") line, else the first "Answer:" line, else the first
    ``\\boxed{...}`` (non-nested: it ends at the first "}"), else the last non-empty line,
    else the stripped text (so "" rather than None). Case-insensitive; a line's leading
    whitespace may include blank lines, so "Answer:" followed by "12" on the next line reads
    "12"."""
    for pattern in (_PAPER_FINAL_LINE, _PAPER_ANSWER_LINE, _PAPER_BOXED):
        match = pattern.search(text)
        if match:
            return match.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text.strip()


def _digits_int(s: str) -> int | None:
    digits = re.sub(r"[^0-9]", "", s.strip())
    return int(digits) if digits else None


def _score_aime(pred: str, gold: str) -> bool | None:
    """Every digit of the prediction read as one integer ("1, 2" is 12); None without one."""
    p, g = _digits_int(pred), _digits_int(gold)
    return None if p is None or g is None else p == g


def _option_number(gold: str) -> int:
    g = gold.strip()
    if g.isdigit():
        return int(g)
    if len(g) == 1 and g.isalpha():
        return ord(g.upper()) - ord("A") + 1
    raise ValueError(
        f"score: multiple-choice gold {gold!r} is neither an option letter nor a number"
    )


def _score_option_number(pred: str, gold: str) -> bool | None:
    """The first integer of the prediction against the gold option number (1-based; a gold
    letter A, B, ... is converted); None when the prediction has no digit."""
    match = re.search(r"\d+", pred)
    return None if match is None else int(match.group()) == _option_number(gold)


def _score_substring(pred: str, gold: str) -> bool:
    """Case-insensitive containment either way (so an empty prediction matches any gold)."""
    p, g = pred.lower().strip(), str(gold).lower().strip()
    return g in p or p in g


def _score_hle(pred: str, gold: str, answer_type: str | None) -> bool:
    if answer_type == "multipleChoice":
        first = re.compile(r"^\s*([A-Z0-9])\b")
        p, g = pred.strip().upper(), gold.strip().upper()
        mp, mg = first.match(p), first.match(g)
        return (mp.group(1) if mp else p) == (mg.group(1) if mg else g)
    return _score_substring(pred, gold)


def _score_yes_no(pred: str, gold: str) -> bool:
    """Yes or No as a whole word (exactly one of them), else the whole prediction compared
    with the gold; never None."""
    p, g = pred.strip().lower(), gold.strip().lower()
    yes, no = re.search(r"\byes\b", p), re.search(r"\bno\b", p)
    if yes and not no:
        return g == "yes"
    if no and not yes:
        return g == "no"
    return p == g


def score(
    prediction: str | None,
    gold: str,
    *,
    dataset: str,
    answer_type: str | None = None,
    choices: list[str] | None = None,
    numbered: bool = False,
) -> bool | None:
    """Whether ``prediction`` is right: True, False, or None when it cannot be scored.

    ``dataset`` picks the scorer. The study's five (``PAPER_DATASETS``) score as the published
    code: "aime" every digit as one integer; "hle" by ``answer_type`` ("multipleChoice": the
    first letter or digit, upper-cased, else the whole answer; otherwise "exactMatch",
    containment either way); "supergpqa" and "musr" the first integer against the gold option
    number (a gold letter counts from A = 1); "legalbench" yes/no, never None. fcjax's own
    kinds ("numeric", "math", "letter", "yesno") score with ``score_answer`` and are None
    when ``is_scorable`` says so (``choices`` and ``numbered`` as there).
    """
    if dataset in ("numeric", "math", "letter", "yesno"):
        if not is_scorable(prediction, dataset, choices, numbered):  # type: ignore[arg-type]
            return None
        return score_answer(prediction, gold, dataset, choices, numbered)  # type: ignore[arg-type]
    if dataset not in PAPER_DATASETS:
        raise ValueError(
            f"score: unknown dataset {dataset!r}; valid: "
            f"{', '.join(PAPER_DATASETS)}, numeric, math, letter, yesno"
        )
    if dataset == "hle" and answer_type not in (None, *HLE_ANSWER_TYPES):
        raise ValueError(
            f"score: HLE answer_type must be one of {HLE_ANSWER_TYPES}, got {answer_type!r}"
        )
    pred = "" if prediction is None else prediction
    if dataset == "aime":
        return _score_aime(pred, gold)
    if dataset == "hle":
        return _score_hle(pred, gold, answer_type)
    if dataset == "legalbench":
        return _score_yes_no(pred, gold)
    return _score_option_number(pred, gold)


def paper_accuracy(correct: list[bool | None]) -> tuple[float | None, int]:
    """(accuracy, denominator) as published: correct over the scorable answers only (None
    left out); accuracy None when none is scorable."""
    scored = [c for c in correct if c is not None]
    return (sum(scored) / len(scored) if scored else None), len(scored)
