"""The report pages' figures (``Figure``): drawn once as ``fcjax.plots`` panels, rendered
inline in the HTML pages and as ``plots/*.png``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fcjax import plots as svg
from fcjax.metrics import cmfg_star, reliability_bins
from fcjax.store.fs import Location, PathLike, location
from fcjax.store.tables import read_table
from probes.figures import PROBE_CAPTION, layer_panel

# summary metrics per estimator: key, label, how to read it
METRICS = (
    ("mean_conf", "mean C", "mean trace confidence"),
    ("mfg", "MFG", "mean faithfulness 1 - |D - C| (higher: D tracks C)"),
    ("cmfg", "cMFG", "MFG averaged over confidence bins"),
    ("cmfg_star", "cMFG*", "equal-count bins, width-weighted (the headline)"),
    ("ece", "ECE", "calibration error (lower is better)"),
    ("brier", "Brier", "squared error of C vs correctness (lower is better)"),
    ("auroc", "AUROC", "does C rank correct above wrong traces (0.5 = chance)"),
)
SCATTER_MAX = 1500  # steps drawn as dots; more are drawn as a density grid


def fmt(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if svg.finite(x) else "–"


def _esc(s: object) -> str:
    import html

    return html.escape(str(s), quote=True)


class Figure(NamedTuple):
    """One figure of a run: its panels, drawn once; ``plots/<name>.png`` and the report's
    inline SVG are both rendered from them."""

    name: str
    title: str
    caption: str
    panels: Sequence[svg.Panel | svg.Heatmap]
    size: str = ""
    legend: Sequence[tuple[str, str]] = ()


def _svgs(panels: Sequence[svg.Panel | svg.Heatmap]) -> str:
    return "".join(p.svg() for p in panels)


def figure(
    title: str,
    caption: str,
    panels: Sequence[svg.Panel | svg.Heatmap],
    size: str = "",
    legend: Sequence[tuple[str, str]] = (),
) -> str:
    """A titled block of panels (wrapping to the page width) with a one-line caption;
    ``size`` "wide" or "half" gives each panel more room than a per-estimator panel."""
    cls = f"panels {size}".strip()
    keys = "".join(
        f'<span class="key" style="background:{fill}"></span>{_esc(name)}' for name, fill in legend
    )
    return (
        f'<figure><h3>{_esc(title)}</h3><div class="{cls}">{_svgs(panels)}</div>'
        f"<figcaption>{f'<span class=legend>{keys}</span> ' if keys else ''}"
        f"{_esc(caption)}</figcaption></figure>"
    )


def metric_panels(
    labels: Sequence[str], series: Sequence[tuple[str, Sequence[dict]]]
) -> list[svg.Panel]:
    """One panel per metric: bars per estimator (one colour per series, e.g. per run) with
    95% intervals from ``<metric>_ci95`` where the summary has them."""
    panels = []
    for key, label, _ in METRICS:
        if key == "mean_conf":
            continue
        n, m = len(labels), max(len(series), 1)
        p = svg.Panel(
            label,
            ylabel=label,
            xlim=(0, n),
            xticks=[(i + 0.5, lab[:9]) for i, lab in enumerate(labels)],
        )
        width = 0.8 / m
        for j, (run_name, per_est) in enumerate(series):
            for i, est in enumerate(per_est):
                v = est.get(key)
                ci = est.get(f"{key}_ci95")
                x0 = i + 0.1 + j * width
                tip = f"{labels[i]} {label} = {fmt(v)}" + (f" ({run_name})" if run_name else "")
                if isinstance(ci, list | tuple) and len(ci) == 2:
                    tip += f", 95% CI [{fmt(ci[0])}, {fmt(ci[1])}]"
                p.rect(x0, x0 + width, 0, v, svg.colour(j if len(series) > 1 else i), tip)
                if isinstance(ci, list | tuple) and len(ci) == 2:
                    p.errorbar(x0 + width / 2, ci[0], ci[1], tip=tip)
        panels.append(p)
    return panels


def scatter_panels(data: dict) -> list[svg.Panel]:
    """Per estimator, D against C of every step (a density grid beyond ``SCATTER_MAX``)."""
    st, out = data["steps"], []
    d = _arr(st["d"])
    for i, n in enumerate(data["estimators"]):
        c = _arr(st["conf"][n])
        ok = np.isfinite(c) & np.isfinite(d)
        p = svg.Panel(f"{n} ({int(ok.sum())} steps)", f"C ({n})", "D")
        if ok.sum() > SCATTER_MAX:
            _density(p, c[ok], d[ok], svg.colour(i))
        else:
            p.dots(c[ok], d[ok], svg.colour(i), opacity=0.6, tips=_dot_tips(data, ok, c, d))
        p.diagonal()
        out.append(p)
    return out


def reliability_panels(data: dict) -> list[svg.Panel]:
    """Per estimator, accuracy per tenth of trace confidence, with its number of traces."""
    ex, out = data["examples"], []
    correct = np.asarray(ex["correct"], np.float64)
    for i, n in enumerate(data["estimators"]):
        b = reliability_bins(_arr(ex["conf"][n]), correct)
        p = svg.Panel(f"{n} ({int(b['count'].sum())} traces)", "trace confidence", "accuracy")
        for j in range(len(b["count"])):
            lo, hi, k = b["edges"][j], b["edges"][j + 1], int(b["count"][j])
            if k == 0:
                continue
            acc = b["accuracy"][j]
            p.rect(
                lo + 0.005,
                hi - 0.005,
                0,
                acc,
                svg.colour(i),
                f"C in [{lo:.1f}, {hi:.1f}): {k} traces, accuracy {fmt(acc)}, "
                f"mean C {fmt(b['mean_conf'][j])}",
            )
            p.text((lo + hi) / 2, max(acc, 0.0), f"n={k}", size=7, dy=-3)
        p.diagonal()
        out.append(p)
    return out


def cmfg_bin_panels(data: dict) -> list[svg.Panel]:
    """Per estimator, the cMFG* bins: confidence range, mean F and number of traces."""
    ex, out = data["examples"], []
    for i, n in enumerate(data["estimators"]):
        f, c = _arr(ex["faith"][n]), _arr(ex["conf"][n])
        ok = np.isfinite(f) & np.isfinite(c)
        p = svg.Panel(f"{n} ({int(ok.sum())} traces)", "trace confidence", "mean F")
        if ok.any():
            value, b = cmfg_star(f[ok], np.clip(c[ok], 0, 1), return_bins=True)
            p.title = f"{n}: cMFG* {fmt(value)}"
            for lo, hi, mf, k in zip(b["lower"], b["upper"], b["mean_f"], b["count"], strict=True):
                tip = f"C in [{lo:.3f}, {hi:.3f}]: {int(k)} traces, mean F {fmt(mf)}"
                p.rect(lo, max(hi, lo + 0.01), 0, mf, svg.colour(i), tip, stroke="#333")
                p.text((lo + max(hi, lo + 0.01)) / 2, mf, f"{int(k)}", size=7, dy=-3)
        out.append(p)
    return out


# title, caption and panel builder of the figures drawn per estimator
PER_ESTIMATOR = (
    (
        "decisiveness_vs_confidence",
        "Decisiveness D vs internal confidence C, per step",
        "Each mark is a step: on the dashed diagonal it sounds as sure as the model is; above "
        "it, it sounds more decisive than the model's confidence (darker cells hold more steps).",
        scatter_panels,
    ),
    (
        "reliability",
        "Reliability diagrams (trace level)",
        "Bars are the accuracy of the traces whose confidence falls in each tenth, n the number "
        "of traces in it; a calibrated estimator's bars reach the diagonal.",
        reliability_panels,
    ),
    (
        "cmfg_star_bins",
        "cMFG* bins",
        "Traces sorted by confidence in equal-count bins: bar width is the bin's confidence "
        "range, height its mean faithfulness, the number its traces; cMFG* is the "
        "width-weighted mean height.",
        cmfg_bin_panels,
    ),
)


def probe_layer_panel(path: PathLike | Location) -> svg.Panel | None:
    """The probe layer table's panel (``probes.figures.layer_panel``) of a run, if any."""
    path = location(path)
    if not path.exists():
        return None
    table = read_table(path)
    return layer_panel(table) if len(table.get("layer", ())) else None


def run_figure_list(summary: dict, data: dict, run: PathLike | Location | None = None) -> list:
    """A run's figures (``Figure``), in page order."""
    names = data["estimators"]
    out = [
        Figure(
            "metrics",
            "Faithfulness and calibration per estimator",
            "Bar height is the summary's value for each estimator; a whisker is its 95% "
            "interval where the summary has one; hover a bar for the numbers.",
            metric_panels(names, [("", [summary["estimators"][n] for n in names])]),
        )
    ]
    out += [
        Figure(name, title, caption, build(data)) for name, title, caption, build in PER_ESTIMATOR
    ]
    probe = probe_layer_panel(location(run) / "probes" / "layers.parquet") if run else None
    if probe:
        out.append(
            Figure(
                "probe_layers",
                "Probe by layer",
                PROBE_CAPTION,
                [probe],
                size="wide",
                legend=[("AUROC", svg.colour(0)), ("ECE", svg.colour(1))],
            )
        )
    traj = summary.get("trajectory") or {}
    if traj.get("mean"):
        edges = np.asarray(traj["edges"], float)
        centers = ((edges[:-1] + edges[1:]) / 2).tolist()
        left = svg.Panel("D and C over the trace", "step position (0 first, 1 last)", "value")
        right = svg.Panel("faithfulness F over the trace", "step position", "F")
        legend = []
        for key, values in traj["mean"].items():
            base = key.removeprefix("faith_")
            i = names.index(base) if base in names else -1
            stroke = "#111" if i < 0 else svg.colour(i)
            panel = right if key.startswith("faith_") else left
            panel.line(centers, values, stroke, dash=(key == "decisiveness"), tip=key)
            panel.dots(centers, values, stroke, tips=[f"{key}: {fmt(v)}" for v in values])
            if not key.startswith("faith_"):
                legend.append((key, stroke))
        out.append(
            Figure(
                "trajectory",
                "Trajectories",
                "Mean over steps in each tenth of the trace (0 = first step, 1 = last); the "
                "dashed black line is D.",
                [left, right],
                size="half",
                legend=legend,
            )
        )
    agreement = summary.get("agreement") or {}
    keys = ["decisiveness", *names]
    mat = [[1.0 if a == b else None for b in keys] for a in keys]
    tips = [[f"{a} vs {b}" for b in keys] for a in keys]
    for i, a in enumerate(keys):
        for j, b in enumerate(keys):
            pair = agreement.get(f"{a}|{b}") or agreement.get(f"{b}|{a}")
            if pair and pair.get("spearman") is not None:
                mat[i][j] = pair["spearman"]
                tips[i][j] = f"{a} vs {b}: Spearman {fmt(pair['spearman'])}, n={pair.get('n')}"
    out.append(
        Figure(
            "estimator_correlation",
            "Agreement between estimators",
            "Spearman correlation of the step values of each pair (red: rank steps alike, "
            "blue: opposite, white: unrelated).",
            [svg.Heatmap("Spearman (steps)", keys, mat, tips)],
            size="heat",
        )
    )
    return out


def run_figures(summary: dict, data: dict, run: PathLike | Location | None = None) -> str:
    """The run page's figures as HTML."""
    return "".join(
        figure(f.title, f.caption, f.panels, f.size, f.legend)
        for f in run_figure_list(summary, data, run)
    )


def _arr(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _dot_tips(data: dict, ok: np.ndarray, c: np.ndarray, d: np.ndarray) -> list[str]:
    ex = data["examples"]
    owner = np.repeat(np.arange(len(ex["id"])), ex["n_steps"])
    steps = data["steps"]["step"]
    return [
        f"{ex['id'][owner[r]]} step {steps[r]}: C {fmt(c[r])}, D {fmt(d[r])}" if ok[r] else ""
        for r in range(len(c))
    ]


def _density(p: svg.Panel, x: np.ndarray, y: np.ndarray, fill: str, bins: int = 20) -> None:
    h, _, _ = np.histogram2d(np.clip(x, 0, 1), np.clip(y, 0, 1), bins=bins, range=[[0, 1], [0, 1]])
    top = h.max() or 1
    for i in range(bins):
        for j in range(bins):
            if h[i, j]:
                p.rect(
                    i / bins,
                    (i + 1) / bins,
                    j / bins,
                    (j + 1) / bins,
                    fill,
                    f"C {i / bins:.2f}-{(i + 1) / bins:.2f}, D {j / bins:.2f}-{(j + 1) / bins:.2f}:"
                    f" {int(h[i, j])} steps",
                    opacity=0.15 + 0.85 * h[i, j] / top,
                )


CAPTION_METRICS = (
    "One colour per run; whiskers are 95% intervals where the summaries have them; hover a "
    "bar for its value."
)
CAPTION_TRAJ = (
    "Mean step faithfulness F in each tenth of the trace, one line per run (colours as above)."
)


def compare_figures(
    labels: Sequence[str], summaries: Sequence[dict], names: Sequence[str]
) -> tuple[Figure, Figure]:
    """The comparison's figures: each metric per estimator and run, and F over the trace."""
    per_metric = metric_panels(
        names,
        [
            (lab, [s["estimators"].get(n, {}) for n in names])
            for lab, s in zip(labels, summaries, strict=True)
        ],
    )
    legend = [(lab, svg.colour(j)) for j, lab in enumerate(labels)]
    traj_panels = []
    for n in names:
        p = svg.Panel(f"{n}: F over the trace", "step position", "F")
        for j, (lab, s) in enumerate(zip(labels, summaries, strict=True)):
            traj = s.get("trajectory") or {}
            values = (traj.get("mean") or {}).get(f"faith_{n}")
            if values:
                e = np.asarray(traj["edges"], float)
                centers = ((e[:-1] + e[1:]) / 2).tolist()
                p.line(centers, values, svg.colour(j), tip=f"{lab}: faith_{n}")
                p.dots(centers, values, svg.colour(j), tips=[f"{lab}: {fmt(v)}" for v in values])
        traj_panels.append(p)
    return (
        Figure("metrics", "Metrics per estimator and run", CAPTION_METRICS, per_metric, "", legend),
        Figure("trajectory", "Faithfulness over the trace", CAPTION_TRAJ, traj_panels, "", legend),
    )
