"""Compares fcjax's MATH/AIME answer scorer with math-verify on the shared golds.

    pip install math-verify   # not an fcjax dependency
    python -m experiments.compare_math_verify [--data=DIR]   # default: fcjax.data.data_dir()

For every gold: (1) equivalent surface forms a model may write (dollars, \\dfrac,
\\left/\\right, spaces, a/b for \\frac{a}{b}, a decimal for a terminating fraction, thousands
separators, a trailing ".0") must score as correct; (2) a different gold of the same set and
the gold with its last digit changed must score as wrong. Prints per scorer the pass rates,
the agreement of the two scorers and the time per call.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from absl import app, flags

from fcjax.data.datasets import data_dir
from fcjax.text.answers import score_answer


def variants(gold: str) -> list[str]:
    """Equivalent ways to write ``gold``: typographic ones (dollars, spaces, \\dfrac,
    \\left/\\right) and mathematical ones (a/b, a decimal, (A)/(B) for \\frac{A}{B},
    \\sqrt n, a commuted two-term sum, thousands separators, a trailing ".0")."""
    out = {f"${gold}$", f" {gold} ", gold.replace("\\frac", "\\dfrac")}
    if "\\left" not in gold and "(" in gold:
        out.add(gold.replace("(", "\\left(").replace(")", "\\right)"))
    out.add(re.sub(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", gold))
    out.add(re.sub(r"\\sqrt\{(\d+)\}", r"\\sqrt \1", gold))
    m = re.fullmatch(r"([^+\-{}()\\,]+|\\sqrt\{\d+\})\+([^+\-{}()\\,]+|\\sqrt\{\d+\})", gold)
    if m:
        out.add(f"{m.group(2)}+{m.group(1)}")
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        out.add(f"{m.group(1)}{m.group(2)}/{m.group(3)}")
        f = Fraction(int(m.group(2)), int(m.group(3)))
        d = f.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        if d == 1:
            out.add(m.group(1) + str(float(f)))
    if re.fullmatch(r"-?\d+", gold):
        out.add(gold + ".0")
        if len(gold.lstrip("-")) > 3:
            out.add(f"{int(gold):,}")
    out.discard(gold)
    return sorted(out)


def wrong(gold: str, other: str) -> list[str]:
    """Answers that are not ``gold``: another gold and ``gold`` with its last digit changed."""
    out = [other] if other.replace(" ", "") != gold.replace(" ", "") else []
    digits = [i for i, ch in enumerate(gold) if ch.isdigit()]
    if digits:
        i = digits[-1]
        out.append(gold[:i] + str((int(gold[i]) + 1) % 10) + gold[i + 1 :])
    return out


def main(argv: Sequence[str]) -> None:
    del argv
    from math_verify import parse, verify

    data = Path(flags.FLAGS.data) if flags.FLAGS.data else data_dir()

    def ours(pred: str, gold: str, kind: str) -> bool:
        return score_answer(pred, gold, kind)

    def math(text: str) -> str:  # math-verify reads LaTeX between dollars
        text = text.strip()
        return text if len(text) > 1 and text[0] == text[-1] == "$" else f"${text}$"

    def theirs(pred: str, gold: str, kind: str) -> bool:
        return bool(verify(parse(math(gold)), parse(math(pred))))

    for name, kind in (("math500.jsonl", "math"), ("aime_1983_2024.jsonl", "numeric")):
        rows = [json.loads(line) for line in (data / name).read_text().splitlines()]
        golds = [str(r["answer"]) for r in rows]
        pos = [(v, g) for g in golds for v in [g, *variants(g)]]
        neg = [(w, g) for i, g in enumerate(golds) for w in wrong(g, golds[(i + 7) % len(golds)])]
        print(f"{name}: {len(golds)} golds, {len(pos)} equivalent forms, {len(neg)} wrong answers")
        results = {}
        for label, fn in (("fcjax", ours), ("math-verify", theirs)):
            t0 = time.perf_counter()
            p = [fn(v, g, kind) for v, g in pos]
            n = [fn(w, g, kind) for w, g in neg]
            dt = (time.perf_counter() - t0) / (len(pos) + len(neg))
            results[label] = (p, n)
            same = sum(ok for ok, (v, g) in zip(p, pos, strict=True) if v == g)
            print(
                f"  {label:12s} equivalent accepted {sum(p)}/{len(p)} "
                f"({100 * sum(p) / len(p):.1f}%), self {same}/{len(golds)}, "
                f"wrong rejected {len(n) - sum(n)}/{len(n)}, {1000 * dt:.2f} ms/call"
            )
        (po, no), (pm, nm) = results["fcjax"], results["math-verify"]
        agree = sum(a == b for a, b in zip(po + no, pm + nm, strict=True))
        print(f"  agreement {agree}/{len(po) + len(no)}")
        only_ours = [pos[i] for i in range(len(pos)) if po[i] and not pm[i]]
        only_mv = [pos[i] for i in range(len(pos)) if pm[i] and not po[i]]
        false_ours = [neg[i] for i in range(len(neg)) if no[i]]
        false_mv = [neg[i] for i in range(len(neg)) if nm[i]]
        for title, items in (
            ("accepted by fcjax only", only_ours),
            ("accepted by math-verify only", only_mv),
            ("wrong accepted by fcjax", false_ours),
            ("wrong accepted by math-verify", false_mv),
        ):
            print(f"  {title}: {len(items)}", "; ".join(f"{v!r} vs {g!r}" for v, g in items[:6]))


if __name__ == "__main__":
    flags.DEFINE_string("data", None, "folder of math500.jsonl and aime_1983_2024.jsonl")
    app.run(main)
