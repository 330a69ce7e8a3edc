"""The HTML reports: one run (``run_page``) and several runs side by side (``compare_page``).

Each page is one self-contained file (inline CSS, JS and SVG; no network, works from
``file://``). The run's tables go in as one compact columnar JSON block, read by
``report_assets/viewer.js``, which builds the example list a page at a time and only the
opened trace's steps. ``#ex=ID`` (run page) or ``#q=ID`` (compare page) in the URL opens
that trace. After loading, the page writes what it rendered into ``#fcjax-selfcheck``
(JSON: load time, rows, errors) for the browser test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources

import numpy as np

from experiments.report_figures import (
    METRICS,
    PER_ESTIMATOR,
    _esc,
    _svgs,
    compare_figures,
    figure,
    fmt,
    run_figures,
)
from experiments.rundir import STAGES
from fcjax import plots as svg
from fcjax.store.fs import Location, PathLike, location
from fcjax.store.tables import read_table

COUNTS = (
    ("steps", "steps in all traces"),
    ("no_steps", "traces with no steps"),
    ("no_answer", "traces with no extracted answer"),
    ("truncated", "traces cut off at --max_new_tokens"),
    ("decisiveness_missing", "steps without a decisiveness score D"),
)
LOWER_BETTER = ("ece", "brier")
SAMPLE_CHARS = 400  # each stored continuation is cut to this many characters in the page
SAMPLE_BUDGET = 8_000_000  # characters of continuations embedded per page, at most


def _values(a, digits: int = 4) -> list:
    """Floats rounded for the page; None where missing."""
    arr = np.round(np.asarray(a, np.float64), digits)
    return [None if math.isnan(v) or math.isinf(v) else v for v in arr.tolist()]


def _col(table: dict, key: str, n: int) -> np.ndarray:
    return np.asarray(table[key], np.float64) if key in table else np.full(n, np.nan)


def _asset(name: str) -> str:
    return (resources.files("experiments") / "report_assets" / name).read_text(encoding="utf-8")


# --- data -----------------------------------------------------------------------------------
def run_data(run: PathLike | Location, summary: dict) -> dict:
    """The run's examples, steps and stored continuations as columnar JSON-ready lists.

    Steps are ordered by example (as in examples.parquet), then step; example i's steps are
    rows ``step0[i] .. step0[i] + n_steps[i]``. Continuations (``samples``) are ordered by
    step row; ``row`` gives each one's step row.
    """
    run = location(run)
    examples = read_table(run / "examples.parquet")
    steps = read_table(run / "steps.parquet")
    names = list(summary["estimators"])
    ids = [str(e) for e in examples["example_id"]]
    n_ex = len(ids)
    position = {e: i for i, e in enumerate(ids)}
    step_ex = [str(e) for e in steps["example_id"]]
    step_no = np.asarray(steps["step"], np.int64)
    unknown = sorted(set(step_ex) - set(position))
    if unknown:
        raise ValueError(f"{run / 'steps.parquet'}: example ids {unknown[:5]} not in examples")
    ex_of_row = np.asarray([position[e] for e in step_ex], np.int64)
    order = np.lexsort((step_no, ex_of_row))
    counts = np.bincount(ex_of_row, minlength=n_ex)
    step0 = (np.cumsum(counts) - counts).astype(int).tolist()
    n_rows = len(step_ex)
    texts = list(steps["text"])
    d = _col(steps, "decisiveness", n_rows)
    data = {
        "estimators": names,
        "examples": {
            "id": ids,
            "question": [str(q) for q in examples["question"]],
            "gold": [None if g is None else str(g) for g in examples["gold"]],
            "prediction": [None if p is None else str(p) for p in examples["prediction"]],
            "correct": [bool(c) for c in examples["correct"]],
            "n_steps": counts.astype(int).tolist(),
            "finish": [str(f) for f in examples.get("finish_reason", [""] * n_ex)],
            "step0": step0,
            "conf": {n: _values(_col(examples, f"conf_{n}", n_ex)) for n in names},
            "faith": {n: _values(_col(examples, f"faith_{n}", n_ex)) for n in names},
        },
        "steps": {
            "step": step_no[order].tolist(),
            "text": [str(texts[r]) for r in order],
            "d": _values(d[order]),
            "conf": {n: _values(_col(steps, f"conf_{n}", n_rows)[order]) for n in names},
            "faith": {n: _values(_col(steps, f"faith_{n}", n_rows)[order]) for n in names},
        },
    }
    path = run / "sampling_samples.parquet"
    if "sampling" in names and path.exists():
        data["samples"] = _samples(path, step_ex, step_no, order)
    return data


def _samples(path: Location, step_ex, step_no, order) -> dict:
    kept = read_table(path)
    new_row = np.empty(len(order), np.int64)
    new_row[order] = np.arange(len(order))
    index = {
        (e, int(s)): int(new_row[r]) for r, (e, s) in enumerate(zip(step_ex, step_no, strict=True))
    }
    rows = [
        index.get((str(e), int(s))) for e, s in zip(kept["example_id"], kept["step"], strict=True)
    ]
    keep = sorted(
        (r, int(k), i)
        for i, (r, k) in enumerate(zip(rows, kept["sample"], strict=True))
        if r is not None
    )
    out: dict = {"row": [], "text": [], "reply": [], "consistent": [], "omitted": 0}
    budget = SAMPLE_BUDGET
    consistent = np.asarray(kept["consistent"], np.float64)
    for r, _, i in keep:
        text = str(kept["paragraph"][i] or "")[:SAMPLE_CHARS]
        budget -= len(text)
        if budget < 0:
            out["omitted"] += 1
            continue
        out["row"].append(r)
        out["text"].append(text)
        reply = kept["reply"][i]
        out["reply"].append(None if reply is None else str(reply)[:80])
        # 1 consistent, 0 not, 0.5 the judge's N/A, None unparsed
        out["consistent"].append(None if math.isnan(consistent[i]) else float(consistent[i]))
    return out


def _json_block(element_id: str, obj) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("</", "<\\/").replace("<!--", "<\\!--")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


# --- tables ---------------------------------------------------------------------------------
def _metric_cell(m: dict, key: str) -> str:
    ci = m.get(f"{key}_ci95")
    v = fmt(m.get(key))
    if isinstance(ci, list | tuple) and len(ci) == 2 and svg.finite(m.get(key)):
        interval = f"[{fmt(ci[0])}, {fmt(ci[1])}]"
        return f'<td title="95% interval {interval}">{v}<small> {interval}</small></td>'
    return f"<td>{v}</td>"


def metrics_table(summary: dict) -> str:
    head = "".join(f'<th title="{_esc(tip)}">{_esc(label)}</th>' for _, label, tip in METRICS)
    rows = []
    for n, m in summary["estimators"].items():
        cells = "".join(_metric_cell(m, k) for k, _, _ in METRICS)
        extra = f"<td>{fmt(m.get('auroc_p'))}</td>" if "auroc_p" in m else ""
        rows.append(f"<tr><th>{_esc(n)}</th>{cells}{extra}<td>{m.get('n_traces', '–')}</td></tr>")
    p_head = (
        "<th title='p-value of AUROC against 0.5'>AUROC p</th>"
        if any("auroc_p" in m for m in summary["estimators"].values())
        else ""
    )
    return (
        f'<table class="num"><tr><th>estimator</th>{head}{p_head}<th>traces</th></tr>'
        f"{''.join(rows)}</table>"
    )


def counts_table(summaries: Sequence[dict], names: Sequence[str]) -> str:
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = [
        "<tr><td>examples</td>" + "".join(f"<td>{s['n_examples']}</td>" for s in summaries),
        "<tr><td>accuracy</td>" + "".join(f"<td>{fmt(s['accuracy'])}</td>" for s in summaries),
    ]
    keys = [k for k, _ in COUNTS]
    keys += sorted({k for s in summaries for k in s.get("counts", {})} - set(keys))
    labels = dict(COUNTS)
    for k in keys:
        rows.append(
            f"<tr><td>{_esc(labels.get(k, k.replace('_', ' ')))}</td>"
            + "".join(f"<td>{s.get('counts', {}).get(k, '–')}</td>" for s in summaries)
        )
    return f'<table class="num"><tr><th></th>{head}</tr>{"</tr>".join(rows)}</tr></table>'


def agreement_table(summary: dict) -> str:
    rows = "".join(
        f"<tr><td>{_esc(k.replace('|', ' ~ '))}</td><td>{fmt(v.get('spearman'))}</td>"
        f"<td>{fmt(v.get('kendall'))}</td><td>{v.get('n')}</td></tr>"
        for k, v in (summary.get("agreement") or {}).items()
    )
    return (
        '<table class="num"><tr><th>pair (steps)</th><th>Spearman</th><th>Kendall</th>'
        f"<th>steps</th></tr>{rows}</table>"
    )


def times_table(summaries: Sequence[dict], names: Sequence[str]) -> str:
    seen = {k for s in summaries for k in s.get("stage_wall_s", {})}
    stages = [st for st in STAGES if st in seen] + sorted(seen - set(STAGES))
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{_esc(st)}</td>"
        + "".join(f"<td>{fmt(s.get('stage_wall_s', {}).get(st), 1)}</td>" for s in summaries)
        + "</tr>"
        for st in stages
    )
    return f'<table class="num"><tr><th>stage (s)</th>{head}</tr>{rows}</table>'


def _page(title: str, body: str, blocks: Sequence[str]) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_asset('report.css')}</style></head>"
        f'<body>{body}<pre id="fcjax-selfcheck" hidden></pre>{"".join(blocks)}'
        f"<script>{_asset('viewer.js')}</script></body></html>"
    )


def _describe(summary: dict) -> str:
    cfg = summary.get("config", {})
    return (
        f"{_esc(cfg.get('model'))} on {_esc(cfg.get('dataset'))}, intervention "
        f"<b>{_esc(cfg.get('intervention'))}</b> ({_esc(cfg.get('intervention_role'))}), "
        f"D from <b>{_esc(cfg.get('decisiveness'))}</b>"
    )


# --- pages ----------------------------------------------------------------------------------
def run_page(run: PathLike | Location) -> str:
    """The report of one finished run."""
    run = location(run)
    summary = json.loads((run / "summary.json").read_text())
    data = run_data(run, summary)
    data["title"] = run.name
    samples = data.get("samples")
    note = ""
    if samples and samples["omitted"]:
        note = (
            f"<p class='note'>{samples['omitted']} sampled continuations are not embedded "
            "(page size budget); all are in sampling_samples.parquet.</p>"
        )
    body = f"""<header><h1>fcjax run <code>{_esc(run.name)}</code></h1>
<p>{_describe(summary)}. {summary["n_examples"]} examples, accuracy {fmt(summary["accuracy"])}.</p>
<nav><a href="#summary">Summary</a> · <a href="#figures">Figures</a> ·
<a href="#traces">Traces</a> · <a href="#config">Config</a></nav></header>
<section id="summary"><h2>Summary</h2>
<h3>Faithfulness and calibration per estimator</h3>{metrics_table(summary)}
<p class="caption">Trace level: C is the trace confidence, F the mean step faithfulness
1 - |D - C|; hover a column name for how to read it.</p>
<div class="row"><div><h3>Counts</h3>{counts_table([summary], ["this run"])}</div>
<div><h3>Agreement</h3>{agreement_table(summary)}</div>
<div><h3>Stage wall time</h3>{times_table([summary], ["this run"])}</div></div></section>
<section id="figures"><h2>Figures</h2>{run_figures(summary, data, run)}</section>
<section id="traces"><h2>Traces</h2>{note}
<p class="caption">Click a row (or a column name to sort) to read its trace step by step;
the link of an opened trace (#ex=ID) reopens it.</p><div id="viewer"></div></section>
<section id="config"><h2>Config</h2><details><summary>flags of this run</summary>
<pre>{_esc(json.dumps(summary.get("config", {}), indent=1))}</pre></details></section>"""
    return _page(f"fcjax run {run.name}", body, [_json_block("fcjax-data", data)])


def compare_page(
    runs: Sequence[PathLike | Location], summaries: Sequence[dict], markdown: str
) -> str:
    """Several runs side by side: figures, differences per estimator, changed traces."""
    runs = [location(r) for r in runs]
    labels = [r.name for r in runs]
    names = sorted({n for s in summaries for n in s["estimators"]})
    runs_rows = "".join(
        f"<tr><th>{_esc(lab)}</th><td>{_describe(s)}</td><td>{s['n_examples']}</td>"
        f"<td>{fmt(s['accuracy'])}</td><td><code>{_esc(r)}</code></td></tr>"
        for lab, r, s in zip(labels, runs, summaries, strict=True)
    )
    diff_head = "".join(f"<th>{_esc(lab)}</th>" for lab in labels) + "".join(
        f"<th>Δ {_esc(lab)} − {_esc(labels[0])}</th>" for lab in labels[1:]
    )
    diff_rows = []
    for n in names:
        for key, label, tip in METRICS:
            vals = [s["estimators"].get(n, {}) for s in summaries]
            cells = "".join(_metric_cell(v, key) for v in vals)
            base = vals[0].get(key)
            for v in vals[1:]:
                x = v.get(key)
                delta = x - base if svg.finite(x) and svg.finite(base) else None
                better = delta is not None and (delta < 0 if key in LOWER_BETTER else delta > 0)
                cls = (
                    ""
                    if not delta or key == "mean_conf"
                    else (" class='up'" if better else " class='down'")
                )
                cells += f"<td{cls}>{'–' if delta is None else f'{delta:+.3f}'}</td>"
            diff_rows.append(
                f"<tr><th>{_esc(n)}</th><td title='{_esc(tip)}'>{label}</td>{cells}</tr>"
            )
    metrics_fig, traj_fig = compare_figures(labels, summaries, names)
    payloads, missing = [], []
    for lab, r, s in zip(labels, runs, summaries, strict=True):
        if (r / "examples.parquet").exists() and (r / "steps.parquet").exists():
            payloads.append({**run_data(r, s), "title": lab})
        else:
            payloads.append(None)
            missing.append(lab)
    per_run = "".join(
        f"<figure><h3>{_esc(title)}</h3>"
        + "".join(
            f'<div class="runrow"><h4>{_esc(lab)}</h4><div class="panels">'
            f"{_svgs(build(data))}</div></div>"
            for lab, data in zip(labels, payloads, strict=True)
            if data is not None
        )
        + f"<figcaption>{_esc(caption)} One row per run.</figcaption></figure>"
        for _, title, caption, build in PER_ESTIMATOR
        if any(payloads)
    )
    note = (
        f"<p class='note'>No tables (examples.parquet, steps.parquet) in: "
        f"{_esc(', '.join(missing))}; those runs are left out of the per-question view.</p>"
        if missing
        else ""
    )
    body = f"""<header><h1>fcjax: {len(runs)} runs side by side</h1>
<nav><a href="#runs">Runs</a> · <a href="#differences">Differences</a> ·
<a href="#figures">Figures</a> · <a href="#questions">Per question</a></nav></header>
<section id="runs"><h2>Runs</h2><table><tr><th>run</th><th>setting</th><th>examples</th>
<th>accuracy</th><th>directory</th></tr>{runs_rows}</table>
<h3>Counts</h3>{counts_table(summaries, labels)}</section>
<section id="differences"><h2>Differences per estimator</h2>
<p class="caption">Each run's value (95% interval where its summary has one) and its
difference from the first run: green where it is better than {_esc(labels[0])} (higher,
or lower for ECE and Brier), red where worse.</p>
<table class="num"><tr><th>estimator</th><th>metric</th>{diff_head}</tr>{"".join(diff_rows)}
</table></section>
<section id="figures"><h2>Figures</h2>
{figure(metrics_fig.title, metrics_fig.caption, metrics_fig.panels, legend=metrics_fig.legend)}
{figure(traj_fig.title, traj_fig.caption, traj_fig.panels, legend=traj_fig.legend)}
{per_run}
<h3>Stage wall time</h3>{times_table(summaries, labels)}
<details><summary>All figures as text (compare.txt)</summary><pre>{_esc(markdown)}</pre></details>
</section>
<section id="questions"><h2>Per question</h2>{note}
<p class="caption">One row per question present in the runs; "flipped" marks a question
whose correctness differs from {_esc(labels[0])}, Δ C the largest change of a trace
confidence. Click a row to read its traces side by side (#q=ID).</p>
<div id="viewer"></div></section>"""
    return _page(
        "fcjax comparison",
        body,
        [_json_block("fcjax-data", {"compare": True, "runs": payloads, "labels": labels})],
    )
