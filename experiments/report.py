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

import io
import json
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from absl import app, flags

from experiments.config import STAGES
from experiments.report_html import compare_page, reliability_bins, run_page
from fcjax.metrics import cmfg_star, match_ids, paired_differences
from fcjax.metrics.bootstrap import REPS
from fcjax.metrics.effect import effect_lines, effects_by_condition
from fcjax.store.fs import Location, PathLike, location
from fcjax.store.tables import read_table


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def _save(fig, path: Location) -> str:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    return path.name


def run_plots(run: Location) -> list[str]:
    """Writes run/plots/*.png; returns their file names."""
    summary = json.loads((run / "summary.json").read_text())
    steps = read_table(run / "steps.parquet")
    examples = read_table(run / "examples.parquet")
    names = list(summary["estimators"])
    plots = run / "plots"
    out = []
    d = np.asarray(steps["decisiveness"], float)
    correct = np.asarray(examples["correct"], float)
    cols = max(len(names), 1)

    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        c = np.asarray(steps[f"conf_{name}"], float)
        ok = np.isfinite(c) & np.isfinite(d)
        ax.scatter(c[ok], d[ok], s=6, alpha=0.5)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"C ({name})", ylabel="D", title=name)
    out.append(_save(fig, plots / "decisiveness_vs_confidence.png"))

    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        bins = reliability_bins(np.asarray(examples[f"conf_{name}"], float), correct)
        ax.bar(bins["edges"][:-1] + 0.05, bins["accuracy"], width=0.09, alpha=0.7)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=name)
    out.append(_save(fig, plots / "reliability.png"))

    traj = summary.get("trajectory", {})
    if traj:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        centers = (np.asarray(traj["edges"][:-1]) + np.asarray(traj["edges"][1:])) / 2
        for key, values in traj["mean"].items():
            ax = axes[1] if key.startswith("faith_") else axes[0]
            ax.plot(centers, np.asarray(values, float), marker=".", label=key)
        axes[0].set(title="D and C over the trace", xlabel="step position", ylim=(0, 1))
        axes[1].set(title="faithfulness F", xlabel="step position", ylim=(0, 1))
        for ax in axes:
            ax.legend(fontsize=7)
        out.append(_save(fig, plots / "trajectory.png"))

    keys = ["decisiveness", *names]
    mat = np.eye(len(keys))
    for i, a in enumerate(keys):
        for j, b in enumerate(keys):
            pair = summary["agreement"].get(f"{a}|{b}") or summary["agreement"].get(f"{b}|{a}")
            if pair is not None and pair.get("spearman") is not None:
                mat[i, j] = pair["spearman"]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(keys), 0.8 + 0.7 * len(keys)))
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    for i in range(len(keys)):
        for j in range(len(keys)):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title("Spearman between estimators (steps)")
    out.append(_save(fig, plots / "estimator_correlation.png"))

    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        c = np.asarray(examples[f"conf_{name}"], float)
        f = np.asarray(examples[f"faith_{name}"], float)
        ok = np.isfinite(c) & np.isfinite(f)
        if ok.sum() == 0:
            continue
        value, bins = cmfg_star(f[ok], np.clip(c[ok], 0, 1), return_bins=True)
        lower, width = np.asarray(bins["lower"]), np.asarray(bins["width"])
        ax.bar(
            lower,
            bins["mean_f"],
            width=np.maximum(width, 0.01),
            align="edge",
            alpha=0.7,
            edgecolor="k",
        )
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="trace confidence",
            ylabel="mean F",
            title=f"{name}: cMFG*={value:.3f}",
        )
    out.append(_save(fig, plots / "cmfg_star_bins.png"))
    return out


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
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / max(len(runs), 1)
    for i, (r, s) in enumerate(zip(runs, summaries, strict=True)):
        vals = [s["estimators"].get(n, {}).get("cmfg_star") or np.nan for n in names]
        axes[0].bar(np.arange(len(names)) + i * width, vals, width, label=r.name)
        traj = s.get("trajectory", {})
        if traj:
            centers = (np.asarray(traj["edges"][:-1]) + np.asarray(traj["edges"][1:])) / 2
            for n in names:
                key = f"faith_{n}"
                if key in traj["mean"]:
                    axes[1].plot(
                        centers,
                        np.asarray(traj["mean"][key], float),
                        marker=".",
                        label=f"{r.name}:{n}",
                    )
    axes[0].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    axes[0].set(ylabel="cMFG*", ylim=(0, 1), title="cMFG* per estimator")
    axes[1].set(xlabel="step position", ylabel="F", ylim=(0, 1), title="faithfulness over steps")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    _save(fig, out / "compare.png")
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
        ia, ib = match_ids(a["id"], b["id"])
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
