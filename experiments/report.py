"""Plots and HTML reports: one run (``write_report``), or several side by side.

The pages themselves (trace viewer, inline figures) are built by ``experiments.report_html``;
this module writes them and the PNG plots, and prints the comparison table and, for two or
more runs, the paired differences on shared questions (``paired.md``).

    python -m experiments.report --runs=DIR1,DIR2,... [--out=DIR]

The comparison answers the study's questions from finished runs: does an intervention
change faithfulness (MFG / cMFG* per estimator), do estimators agree, and are later steps
more faithful (F over normalised step position). Runs and ``--out`` are local paths or URLs
(``fcjax.store.fs``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from experiments.config import STAGES
from experiments.report_figures import compare_figures, run_figure_list
from experiments.report_html import compare_page, run_data, run_page
from fcjax import plots
from fcjax.metrics import match_ids, paired_differences
from fcjax.metrics.bootstrap import REPS
from fcjax.metrics.effect import effect_lines, effects_by_condition
from fcjax.store.fs import Location, PathLike, location
from fcjax.store.tables import read_table


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def run_plots(run: Location) -> list[str]:
    """Writes run/plots/<figure>.png for each of the run page's figures (the same panels
    its inline SVG renders); returns their file names."""
    summary = json.loads((run / "summary.json").read_text())
    names = []
    for f in run_figure_list(summary, run_data(run, summary), run):
        plots.save_png(run / "plots" / f"{f.name}.png", f.panels, f.legend, f.title)
        names.append(f"{f.name}.png")
    return names


def write_report(run: PathLike | Location) -> Location:
    """Writes run/report.html (self-contained, with the trace viewer) and run/plots/*.png."""
    run = location(run)
    run_plots(run)
    path = run / "report.html"
    path.write_text(run_page(run))
    return path


def compare_table(runs: Sequence[Location], summaries: Sequence[dict]) -> str:
    """The comparison as a markdown table: accuracy and counts, each estimator's mean C, MFG, cMFG,
    cMFG*, ECE and AUROC, the step-level Spearman correlations, and stage wall times, one
    column per run."""
    names = sorted({n for s in summaries for n in s["estimators"]})
    cols = [r.name for r in runs]
    lines: list[tuple[str, list[str]]] = [
        ("model", [str(s["config"]["model"]) for s in summaries]),
        ("dataset", [str(s["config"]["dataset"]) for s in summaries]),
        ("intervention", [str(s["config"]["intervention"]) for s in summaries]),
        ("examples", [str(s["n_examples"]) for s in summaries]),
        ("accuracy", [_fmt(s["accuracy"]) for s in summaries]),
        ("steps", [str(s["counts"]["steps"]) for s in summaries]),
        (
            "no answer / truncated",
            [f"{s['counts']['no_answer']} / {s['counts']['truncated']}" for s in summaries],
        ),
    ]
    for n in names:
        for key, label in (
            ("mean_conf", "mean C"),
            ("mfg", "MFG"),
            ("cmfg", "cMFG"),
            ("cmfg_star", "cMFG*"),
            ("ece", "ECE"),
            ("auroc", "AUROC"),
        ):
            lines.append(
                (f"{n} {label}", [_fmt(s["estimators"].get(n, {}).get(key)) for s in summaries])
            )
    pairs = sorted({p for s in summaries for p in s.get("agreement", {})})
    for pair in pairs:
        lines.append(
            (
                f"spearman {pair.replace('|', ' ~ ')}",
                [_fmt(s.get("agreement", {}).get(pair, {}).get("spearman")) for s in summaries],
            )
        )
    stages = [st for st in STAGES if any(st in s.get("stage_wall_s", {}) for s in summaries)]
    for st in stages:
        lines.append((f"wall s {st}", [_fmt(s.get("stage_wall_s", {}).get(st)) for s in summaries]))
    width = max(len(label) for label, _ in lines)
    cw = [max(len(c), *(len(v[i]) for _, v in lines)) for i, c in enumerate(cols)]

    def row(label: str, values: Sequence[str]) -> str:
        cells = (v.rjust(w) for v, w in zip(values, cw, strict=True))
        return f"| {label.ljust(width)} | " + " | ".join(cells) + " |"

    out = [row("", cols), row("-" * width, ["-" * w for w in cw])]
    out += [row(label, values) for label, values in lines]
    return "\n".join(out)


def compare(runs: Sequence[PathLike | Location], out: PathLike | Location) -> Location:
    """Several runs side by side; writes out/compare.html (differences per estimator and the
    per-question view), out/compare.txt and out/compare.png."""
    runs, out = [location(r) for r in runs], location(out)
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    names = sorted({n for s in summaries for n in s["estimators"]})
    out.mkdir()
    metrics_fig, traj_fig = compare_figures([r.name for r in runs], summaries, names)
    cmfg_star_panel = [p for p in metrics_fig.panels if p.title == "cMFG*"]
    plots.save_png(out / "compare.png", cmfg_star_panel + list(traj_fig.panels), metrics_fig.legend)
    table = compare_table(runs, summaries)
    page = compare_page(runs, summaries, table)
    (out / "compare.txt").write_text(table + "\n")
    path = out / "compare.html"
    path.write_text(page)
    return path


PAIRED = (
    ("mfg", "MFG"),
    ("cmfg", "cMFG"),
    ("cmfg_star", "cMFG*"),
    ("ece", "ECE"),
    ("brier", "Brier"),
    ("auroc", "AUROC"),
)


def _trace_columns(run: Location, name: str) -> dict[str, np.ndarray]:
    """Per-question F, C and correctness; unscorable traces missing, as in the summaries."""
    ex = read_table(run / "examples.parquet")
    ids = np.asarray(ex["example_id"]).astype(str)
    scored = np.asarray(ex.get("scorable", np.ones(len(ids), bool)), bool)
    return {
        "id": ids,
        "f": np.where(scored, np.asarray(ex[f"faith_{name}"], float), np.nan),
        "c": np.where(scored, np.clip(np.asarray(ex[f"conf_{name}"], float), 0, 1), np.nan),
        "correct": np.asarray(ex["correct"], float),
    }


def paired_table(
    base: PathLike | Location, other: PathLike | Location, reps: int = REPS, seed: int = 0
) -> str:
    """Markdown table of ``other`` - ``base`` per estimator and metric on the questions both
    runs hold (matched by example_id), with paired-bootstrap 95% intervals; ``*`` marks a
    difference whose interval excludes 0."""
    base, other = location(base), location(other)
    summaries = [json.loads((r / "summary.json").read_text()) for r in (base, other)]
    binning = summaries[0].get("config", {}).get("cmfg_binning", "closed")
    names = [n for n in summaries[0]["estimators"] if n in summaries[1]["estimators"]]
    lines = [
        f"Paired differences {other.name} - {base.name} on shared questions "
        f"(95% paired bootstrap, {reps} resamples; * = interval excludes 0)",
        "",
        f"| estimator | metric | n | {base.name} | {other.name} | diff | 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        a, b = _trace_columns(other, name), _trace_columns(base, name)
        ib, ia = match_ids(b["id"], a["id"])  # the base run's example order
        res = paired_differences(
            {k: a[k][ia] for k in ("f", "c", "correct")},
            {k: b[k][ib] for k in ("f", "c", "correct")},
            reps=reps,
            seed=seed,
            binning=binning,
        )
        for key, label in PAIRED:
            r = res[key]
            diff = "–" if r["diff"] is None else f"{r['diff']:+.3f}"
            star = "*" if r["excludes_zero"] else ""
            ci = "–" if r["ci95"] is None else f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            lines.append(
                f"| {name} | {label} | {r['n']} | {_fmt(r['b'])} | {_fmt(r['a'])} "
                f"| {diff}{star} | {ci} |"
            )
    return "\n".join(lines)


def main(argv):
    del argv
    runs_flag, out_flag = flags.FLAGS.runs, flags.FLAGS.out
    if not runs_flag:
        raise app.UsageError("--runs=DIR1,DIR2,... is required")
    runs = [location(r) for r in runs_flag]
    for r in runs:
        if not (r / "summary.json").exists():
            raise app.UsageError(f"{r} has no summary.json (is the run finished?)")
    if len(runs) == 1 and not out_flag:
        print(write_report(runs[0]))
        return
    path = compare(runs, location(out_flag) if out_flag else runs[0] / "compare")
    print((path.parent / "compare.txt").read_text())
    paired = [paired_table(runs[0], r, reps=flags.FLAGS.bootstrap) for r in runs[1:]]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    paired.append(effect_lines(effects_by_condition(summaries)))  # the published figure
    (path.parent / "paired.md").write_text("\n\n".join(paired) + "\n")
    print("\n\n".join(paired))
    print(path)


if __name__ == "__main__":
    flags.DEFINE_list("runs", [], "run directories to compare")
    flags.DEFINE_string("out", "", "where to write compare.html (default: <first run>/compare)")
    flags.DEFINE_integer("bootstrap", REPS, "paired-bootstrap resamples of shared questions")
    app.run(main)
