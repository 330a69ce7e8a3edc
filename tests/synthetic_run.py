"""A synthetic finished run directory (the run-directory contract of ../shared/DESIGN.md),
written directly, without a model: examples.parquet, steps.parquet, sampling_samples.parquet
and summary.json with the runner's columns and the summary computed as the runner does.

    python tests/synthetic_run.py OUT --examples=200 --steps=20   # a run for the browser
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fcjax.metrics import (
    auroc,
    brier,
    cmfg,
    cmfg_star,
    ece,
    mfg,
    pairwise_agreement,
    step_faithfulness,
    trajectory_bins,
)
from fcjax.store.tables import write_table_atomic

ESTIMATORS = ("deepconf", "rcc", "sampling", "probe", "forcing")
SENTENCE = (
    "first we add the two numbers and carry the one so the tens digit becomes larger "
    "perhaps I should double check this maybe the answer is clearly correct"
)
WORDS = tuple(SENTENCE.split())


def write_synthetic_run(
    out: Path,
    n_examples: int = 12,
    max_steps: int = 6,
    k: int = 3,
    seed: int = 0,
    ci: bool = True,
    id_prefix: str = "q",
    flip: float = 0.0,
    sampled_steps: int = 3,
    paragraph_words: int = 0,
) -> Path:
    """Writes the run; example i has 1..max_steps steps (example 0 has none, so the page
    must cope with an empty trace). ``flip`` changes that fraction of correctness labels
    (for a second run to compare against)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    ex = {
        k_: []
        for k_ in (
            *("example_id", "question", "gold", "prediction", "correct", "n_steps"),
            *("prompt", "prompt_ids", "output_ids", "text", "finish_reason", "kind"),
        )
    }
    st: dict[str, list] = {
        k_: [] for k_ in ("example_id", "step", "char_start", "char_end", "text", "position")
    }
    samples: dict[str, list] = {
        k_: [] for k_ in ("example_id", "step", "sample", "paragraph", "reply", "consistent")
    }
    q_rng = np.random.default_rng(1234)  # questions and answers shared by runs of any seed
    for i in range(n_examples):
        eid = f"{id_prefix}{i:05d}"
        a, b = (int(x) for x in q_rng.integers(10, 99, 2))
        gold = str(a + b)
        n = 0 if i == 0 else int(rng.integers(max(1, 3 * max_steps // 4), max_steps + 1))
        right = bool(q_rng.random() < 0.6) != bool(rng.random() < flip)
        pred = None if i == 1 else (gold if right else str(a + b + 1))
        parts, text = [], ""
        for j in range(n):
            words = rng.choice(WORDS, size=int(rng.integers(6, 18)))
            step = (
                f"Step {j + 1}: " + " ".join(words) + ("." if j % 3 else " <b>&amp;</b> </script>")
            )
            if j == n - 1 and pred is not None:
                step += f" The answer is {pred}."
            start = len(text)
            text += step
            parts.append((start, len(text), step))
            text += "\n\n"
        for j, (s0, s1, step) in enumerate(parts):
            st["example_id"].append(eid)
            st["step"].append(j)
            st["char_start"].append(s0)
            st["char_end"].append(s1)
            st["text"].append(step)
            st["position"].append(j / (n - 1) if n > 1 else 0.0)
            if j < sampled_steps:  # the sampling estimator scores the first steps only
                for s in range(k):
                    reply = [None, "Yes", "No", "hmm"][int(rng.integers(0, 4))]
                    samples["example_id"].append(eid)
                    samples["step"].append(j)
                    samples["sample"].append(s)
                    words = " ".join(rng.choice(WORDS, size=paragraph_words))
                    samples["paragraph"].append(
                        "" if reply is None else f"continuation {s} of {eid}/{j} {words}".strip()
                    )
                    samples["reply"].append(reply)
                    samples["consistent"].append({"Yes": 1.0, "No": 0.0}.get(reply, np.nan))
        for key, value in (
            ("example_id", eid),
            ("question", f"What is {a} + {b}? <i>show your work</i>"),
            ("gold", gold),
            ("prediction", pred),
            ("correct", pred == gold),
            ("n_steps", n),
            ("prompt", f"user: What is {a} + {b}?"),
            ("prompt_ids", [1, 2, 3]),
            ("output_ids", [4, 5]),
            ("text", text),
            ("finish_reason", "length" if i == 2 else "stop"),
            ("kind", "numeric"),
        ):
            ex[key].append(value)
    n_rows = len(st["step"])
    d = rng.uniform(0, 1, n_rows)
    d[rng.random(n_rows) < 0.05] = np.nan
    st["decisiveness"] = d
    st["decisiveness_lexicon"] = d
    owner = np.repeat(np.arange(n_examples), ex["n_steps"])  # example index of each step row
    correct = np.asarray(ex["correct"], float)
    summary_est = {}
    conf_steps = {}
    for name in ESTIMATORS:
        c = np.clip(0.5 * d + 0.5 * rng.uniform(0, 1, n_rows), 0, 1)
        if name == "sampling":
            scored = np.asarray(st["step"]) < sampled_steps
            c = np.where(scored, c, np.nan)
        if name == "probe":
            c[rng.random(n_rows) < 0.1] = np.nan
        f = step_faithfulness(d, c)
        st[f"conf_{name}"], st[f"faith_{name}"] = c, f
        conf_steps[name] = c
        tc, tf = _trace_means(c, owner, n_examples), _trace_means(f, owner, n_examples)
        ex[f"conf_{name}"], ex[f"faith_{name}"] = tc, tf
        ok, okc = np.isfinite(tc) & np.isfinite(tf), np.isfinite(tc)
        m = {
            "mfg": float(mfg(tf[ok])),
            "cmfg": float(cmfg(tf[ok], tc[ok])),
            "cmfg_star": float(cmfg_star(tf[ok], tc[ok])),
            "ece": float(ece(tc[okc], correct[okc])),
            "brier": float(brier(tc[okc], correct[okc])),
            "auroc": float(auroc(tc[okc], correct[okc])),
            "mean_conf": float(np.mean(tc[okc])),
            "n_traces": int(ok.sum()),
            "n_steps_scored": int(np.isfinite(c).sum()),
        }
        if ci:  # issue 14's fields: a 95% interval per metric, and AUROC's p-value
            for key in ("mfg", "cmfg", "cmfg_star", "ece", "brier", "auroc", "mean_conf"):
                m[f"{key}_ci95"] = [max(0.0, m[key] - 0.08), min(1.0, m[key] + 0.06)]
            m["auroc_p"] = 0.04
        summary_est[name] = m
    write_table_atomic(out / "steps.parquet", st)
    write_table_atomic(out / "examples.parquet", ex)
    write_table_atomic(out / "sampling_samples.parquet", samples)
    traj = trajectory_bins(
        np.asarray(st["position"], float),
        {"decisiveness": d, **conf_steps, **{f"faith_{n}": st[f"faith_{n}"] for n in ESTIMATORS}},
    )
    summary = {
        "n_examples": n_examples,
        "accuracy": float(correct.mean()),
        "estimators": summary_est,
        "agreement": pairwise_agreement({"decisiveness": d, **conf_steps}),
        "trajectory": traj,
        "counts": {
            "no_steps": int(sum(n == 0 for n in ex["n_steps"])),
            "no_answer": int(sum(p is None for p in ex["prediction"])),
            "truncated": 1,
            "steps": n_rows,
            "decisiveness_missing": int(np.isnan(d).sum()),
        },
        "stage_wall_s": {"generate": 12.5, "segment": 0.1, "metrics": 0.4},
        "config": {
            "model": "synthetic",
            "dataset": "arithmetic",
            "intervention": "blank",
            "intervention_role": "user",
            "decisiveness": "lexicon",
            "estimators": list(ESTIMATORS),
        },
    }
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1, allow_nan=False))
    return out


def _trace_means(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Mean of the finite step values of each example (NaN where none)."""
    ok = np.isfinite(values)
    total = np.bincount(owner[ok], weights=values[ok], minlength=n)
    count = np.bincount(owner[ok], minlength=n)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, float | np.floating):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


if __name__ == "__main__":
    args = dict(a.lstrip("-").split("=") for a in sys.argv[2:])
    write_synthetic_run(
        Path(sys.argv[1]),
        n_examples=int(args.get("examples", 12)),
        max_steps=int(args.get("steps", 6)),
        k=int(args.get("k", 3)),
        seed=int(args.get("seed", 0)),
        sampled_steps=int(args.get("sampled_steps", 3)),
        paragraph_words=int(args.get("paragraph_words", 0)),
    )
