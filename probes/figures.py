"""The probe layer table as a figure (``fcjax.plots``): the run report's panel and
``plots/probe_layers.png`` are both rendered from ``layer_panel``."""

from __future__ import annotations

import math

import numpy as np

from fcjax import plots

PROBE_CAPTION = (
    "Cross-fitted AUROC (solid, with its 95% interval dashed and the permutation-null band "
    "in grey) and ECE (dashed) of the first probe family on each layer's step hidden states, "
    "and the AUROC of any other family; 0.5 AUROC is chance; ▼ marks layers the folds chose."
)


def _fmt(x: float) -> str:
    return f"{x:.3f}" if np.isfinite(x) else "–"


def layer_panel(table: dict, title: str | None = None, chosen: int | None = None) -> plots.Panel:
    """Per layer: the first family's AUROC with its interval and null band, and its ECE; the
    AUROC of every other family; ▼ over layers the folds chose (``times_chosen``) or over
    ``chosen`` (the final probe's layer)."""
    fams = np.asarray(table.get("family", ["linear"] * len(table["layer"])), str)
    families = list(dict.fromkeys(fams.tolist()))
    layers_all = np.asarray(table["layer"], float)
    top = int(max(layers_all.max(), 1))
    step = max(1, math.ceil(top / 8))
    ticks = [(float(v), str(v)) for v in range(0, top + 1, step)]
    first = families[0]
    p = plots.Panel(
        title or f"{first} probe by layer",
        "layer",
        "AUROC / ECE",
        xlim=(0.0, top),
        xticks=ticks,
        width=560,
    )
    p.line([0, layers_all.max()], [0.5, 0.5], stroke="#aaa", width=0.8)
    for f, family in enumerate(families):
        on = fams == family
        t = {k: np.asarray(v)[on] for k, v in table.items()}
        layers, n = t["layer"].astype(float), int(on.sum())
        colour = plots.colour(0 if f == 0 else f + 1)
        keys = ("auroc_lo", "auroc_hi", "null_lo", "null_hi") if f == 0 else ()
        for key in keys:
            if key in t and np.isfinite(np.asarray(t[key], float)).any():
                band = key.startswith("null")
                p.line(
                    layers.tolist(),
                    np.asarray(t[key], float).tolist(),
                    "#999" if band else colour,
                    dash=True,
                    width=0.7,
                    tip="null band" if band else "95% interval",
                )
        why = np.asarray(t.get("auroc_ci_absent", [""] * n), str)
        lo = np.asarray(t.get("auroc_lo", np.full(n, np.nan)), float)
        hi = np.asarray(t.get("auroc_hi", np.full(n, np.nan)), float)
        interval = [  # the layer table says why an interval is absent (e.g. --bootstrap=0)
            f"; no 95% interval: {w}" if w else f"; 95% interval {_fmt(a)}-{_fmt(b)}"
            for w, a, b in zip(why, lo, hi, strict=True)
        ]
        series = [("auroc", colour, False)] + ([("ece", plots.colour(1), True)] if f == 0 else [])
        for key, stroke, dash in series:
            values = np.asarray(t[key], float).tolist()
            label = key if f == 0 else f"{family} {key}"
            p.line(layers.tolist(), values, stroke, dash=dash, tip=label)
            tips = [
                f"layer {int(x)}: {label} {_fmt(v)}" for x, v in zip(layers, values, strict=True)
            ]
            if key == "auroc":
                tips = [a + b for a, b in zip(tips, interval, strict=True)]
            p.dots(layers.tolist(), values, stroke, r=2.5, tips=tips)
        if f == 0:
            times = np.asarray(t.get("times_chosen", np.zeros(n)), float)
            marked = {float(x) for x, k in zip(layers, times, strict=True) if k > 0}
            if chosen is not None:
                marked.add(float(chosen))
            for x in sorted(marked):
                p.text(x, 0.97, "▼", size=9, fill="#444")
    return p


def transfer_panel(table: dict, title: str) -> plots.Panel:
    """AUROC per layer of each (evaluation run, family) of a transfer table, with its 95%
    interval (dashed)."""
    layers_all = np.asarray(table["layer"], float)
    top = int(max(layers_all.max(), 1))
    step = max(1, math.ceil(top / 8))
    ticks = [(float(v), str(v)) for v in range(0, top + 1, step)]
    p = plots.Panel(title, "layer", "AUROC on evaluation run", (0.0, top), xticks=ticks, width=560)
    p.line([0, top], [0.5, 0.5], stroke="#aaa", width=0.8)
    runs, fams = np.asarray(table["eval_run"], str), np.asarray(table["family"], str)
    for i, (run, family) in enumerate(
        dict.fromkeys(zip(runs.tolist(), fams.tolist(), strict=True))
    ):
        on = (runs == run) & (fams == family)
        layers, colour = layers_all[on].tolist(), plots.colour(i)
        label = f"{family} on {run.rstrip('/').rsplit('/', 1)[-1]}"
        for key in ("auroc_lo", "auroc_hi"):
            p.line(layers, np.asarray(table[key], float)[on].tolist(), colour, dash=True, width=0.7)
        values = np.asarray(table["auroc"], float)[on].tolist()
        p.line(layers, values, colour, tip=label)
        p.dots(
            layers,
            values,
            colour,
            tips=[
                f"{label}, layer {int(x)}: {_fmt(v)}" for x, v in zip(layers, values, strict=True)
            ],
        )
    return p
