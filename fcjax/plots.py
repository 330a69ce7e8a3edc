"""Figures drawn once and rendered two ways (the run report's and the probes' plots).

A ``Panel`` (or ``Heatmap``) records its marks in data coordinates; ``svg()`` renders them as
one inline ``<svg>`` with a ``viewBox`` for the HTML pages (CSS scales it to its column;
hovering a mark shows its value, an SVG ``<title>``), and ``draw(ax)`` renders the same marks
on a matplotlib Axes for ``plots/*.png`` (``save_png``). Values that are None or not finite
are drawn by neither.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence

# colour per series (estimator or run), Tableau 10
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def finite(x) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


class Panel:
    """One plot: data coordinates in ``xlim`` x ``ylim`` mapped to a fixed-size viewBox."""

    W, H = 280, 230
    LEFT, RIGHT, TOP, BOTTOM = 44, 10, 24, 40

    def __init__(
        self,
        title: str,
        xlabel: str = "",
        ylabel: str = "",
        xlim: tuple[float, float] = (0.0, 1.0),
        ylim: tuple[float, float] = (0.0, 1.0),
        xticks: Sequence[tuple[float, str]] | None = None,
        yticks: Sequence[float] | None = None,
        width: int = 280,
    ):
        self.W = width
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.xlim, self.ylim = xlim, ylim
        self.xticks = xticks
        self.yticks = yticks
        self.marks: list[tuple[str, dict]] = []

    def x(self, v: float) -> float:
        a, b = self.xlim
        return self.LEFT + (v - a) / ((b - a) or 1) * (self.W - self.LEFT - self.RIGHT)

    def y(self, v: float) -> float:
        a, b = self.ylim
        return self.H - self.BOTTOM - (v - a) / ((b - a) or 1) * (self.H - self.TOP - self.BOTTOM)

    def line(self, xs, ys, stroke="#333", dash=False, width=1.5, tip=None) -> None:
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if finite(x) and finite(y)]
        if len(pts) < 2:
            return self.dots([x for x, _ in pts], [y for _, y in pts], stroke, tip=tip)
        self.marks.append(("line", dict(pts=pts, stroke=stroke, dash=dash, width=width, tip=tip)))

    def dots(self, xs, ys, fill="#333", r=2.2, opacity=1.0, tip=None, tips=None) -> None:
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if finite(x) and finite(y):
                t = tips[i] if tips is not None else tip
                self.marks.append(("dot", dict(x=x, y=y, fill=fill, r=r, opacity=opacity, tip=t)))

    def rect(self, x0, x1, y0, y1, fill, tip="", opacity=0.8, stroke="none") -> None:
        if all(finite(v) for v in (x0, x1, y0, y1)):
            box = dict(x0=x0, x1=x1, y0=y0, y1=y1)
            style = dict(fill=fill, tip=tip, opacity=opacity, stroke=stroke)
            self.marks.append(("rect", {**box, **style}))

    def errorbar(self, x, lo, hi, stroke="#222", tip="") -> None:
        if finite(x) and finite(lo) and finite(hi):
            self.marks.append(("errorbar", dict(x=x, lo=lo, hi=hi, stroke=stroke, tip=tip)))

    def text(self, x, y, s, size=9, anchor="middle", fill="#333", dy=0.0) -> None:
        """``dy``: an offset in points, downwards (negative lifts the text above ``y``)."""
        if finite(x) and finite(y):
            self.marks.append(
                ("text", dict(x=x, y=y, s=s, size=size, anchor=anchor, fill=fill, dy=dy))
            )

    def diagonal(self) -> None:
        self.line([0, 1], [0, 1], stroke="#888", dash=True, width=1)

    # --- SVG -----------------------------------------------------------------------------
    def _svg_mark(self, kind: str, m: dict) -> str:
        title = f"<title>{_esc(m['tip'])}</title>" if m.get("tip") else ""
        if kind == "line":
            d = " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in m["pts"])
            style = ' stroke-dasharray="4 3"' if m["dash"] else ""
            return (
                f'<polyline points="{d}" fill="none" stroke="{m["stroke"]}"'
                f' stroke-width="{m["width"]}"{style}>{title}</polyline>'
            )
        if kind == "dot":
            return (
                f'<circle cx="{self.x(m["x"]):.1f}" cy="{self.y(m["y"]):.1f}" r="{m["r"]}"'
                f' fill="{m["fill"]}" fill-opacity="{m["opacity"]}">{title}</circle>'
            )
        if kind == "rect":
            px0, px1 = sorted((self.x(m["x0"]), self.x(m["x1"])))
            py0, py1 = sorted((self.y(m["y0"]), self.y(m["y1"])))
            return (
                f'<rect x="{px0:.1f}" y="{py0:.1f}" width="{max(px1 - px0, 0.8):.1f}"'
                f' height="{py1 - py0:.1f}" fill="{m["fill"]}" fill-opacity="{m["opacity"]}"'
                f' stroke="{m["stroke"]}" stroke-width="0.5">{title}</rect>'
            )
        if kind == "errorbar":
            px, a, b, st = self.x(m["x"]), self.y(m["lo"]), self.y(m["hi"]), m["stroke"]
            return (
                f'<g class="ci" stroke="{st}" stroke-width="1.2">{title}'
                f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{a:.1f}" y2="{b:.1f}"/>'
                f'<line x1="{px - 3:.1f}" x2="{px + 3:.1f}" y1="{a:.1f}" y2="{a:.1f}"/>'
                f'<line x1="{px - 3:.1f}" x2="{px + 3:.1f}" y1="{b:.1f}" y2="{b:.1f}"/></g>'
            )
        return (
            f'<text x="{self.x(m["x"]):.1f}" y="{self.y(m["y"]) + m["dy"]:.1f}"'
            f' font-size="{m["size"]}" text-anchor="{m["anchor"]}" fill="{m["fill"]}">'
            f"{_esc(m['s'])}</text>"
        )

    def svg(self, legend: Sequence[tuple[str, str]] = ()) -> str:
        x0, x1 = self.LEFT, self.W - self.RIGHT
        y0, y1 = self.TOP, self.H - self.BOTTOM
        axes = [
            f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="#fff"'
            ' stroke="#999" stroke-width="0.8"/>'
        ]
        yticks = self.yticks if self.yticks is not None else _ticks(*self.ylim)
        for v in yticks:
            py = self.y(v)
            axes.append(
                f'<line x1="{x0}" x2="{x1}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>'
                f'<text x="{x0 - 4}" y="{py + 3:.1f}" font-size="9" text-anchor="end">'
                f"{_esc(_label(v))}</text>"
            )
        xticks = (
            self.xticks if self.xticks is not None else [(v, _label(v)) for v in _ticks(*self.xlim)]
        )
        for v, lab in xticks:
            px = self.x(v)
            axes.append(
                f'<text x="{px:.1f}" y="{y1 + 12}" font-size="9" text-anchor="middle">'
                f"{_esc(lab)}</text>"
            )
        axes.append(
            f'<text x="{(x0 + x1) / 2:.1f}" y="{self.H - 8}" font-size="10"'
            f' text-anchor="middle">{_esc(self.xlabel)}</text>'
            f'<text transform="translate(11 {(y0 + y1) / 2:.1f}) rotate(-90)" font-size="10"'
            f' text-anchor="middle">{_esc(self.ylabel)}</text>'
            f'<text x="{(x0 + x1) / 2:.1f}" y="15" font-size="11" font-weight="bold"'
            f' text-anchor="middle">{_esc(self.title)}</text>'
        )
        leg = []
        for i, (name, fill) in enumerate(legend):
            ly = y0 + 6 + 11 * i
            leg.append(
                f'<rect x="{x0 + 6}" y="{ly}" width="8" height="8" fill="{fill}"/>'
                f'<text x="{x0 + 17}" y="{ly + 7.5}" font-size="9">{_esc(name)}</text>'
            )
        return (
            f'<svg class="panel" viewBox="0 0 {self.W} {self.H}" role="img"'
            f' aria-label="{_esc(self.title)}" xmlns="http://www.w3.org/2000/svg">'
            + "".join(axes)
            + "".join(self._svg_mark(kind, m) for kind, m in self.marks)
            + "".join(leg)
            + "</svg>"
        )

    # --- matplotlib ----------------------------------------------------------------------
    def draw(self, ax, legend: Sequence[tuple[str, str]] = ()) -> None:
        """The same marks, axes, ticks and labels on a matplotlib Axes."""
        from matplotlib.patches import Patch, Rectangle

        ax.set(xlim=self.xlim, ylim=self.ylim, xlabel=self.xlabel, ylabel=self.ylabel)
        ax.set_title(self.title, fontsize=9, fontweight="bold")
        yticks = self.yticks if self.yticks is not None else _ticks(*self.ylim)
        ax.set_yticks(list(yticks), [_label(v) for v in yticks], fontsize=7)
        xticks = (
            self.xticks if self.xticks is not None else [(v, _label(v)) for v in _ticks(*self.xlim)]
        )
        ax.set_xticks([v for v, _ in xticks], [lab for _, lab in xticks], fontsize=7)
        ax.grid(axis="y", color="#eee", lw=0.8)
        ax.set_axisbelow(True)
        for kind, m in self.marks:
            if kind == "line":
                xs, ys = zip(*m["pts"], strict=True)
                ax.plot(xs, ys, color=m["stroke"], ls="--" if m["dash"] else "-", lw=m["width"])
            elif kind == "dot":
                ax.plot(m["x"], m["y"], "o", ms=m["r"] * 1.4, color=m["fill"], alpha=m["opacity"])
            elif kind == "rect":
                ax.add_patch(
                    Rectangle(
                        (min(m["x0"], m["x1"]), min(m["y0"], m["y1"])),
                        abs(m["x1"] - m["x0"]),
                        abs(m["y1"] - m["y0"]),
                        facecolor=m["fill"],
                        alpha=m["opacity"],
                        edgecolor="none" if m["stroke"] == "none" else m["stroke"],
                        lw=0.5,
                    )
                )
            elif kind == "errorbar":
                mid, half = (m["lo"] + m["hi"]) / 2, abs(m["hi"] - m["lo"]) / 2
                ax.errorbar(m["x"], mid, yerr=half, fmt="none", ecolor=m["stroke"], capsize=3)
            else:
                ax.annotate(
                    m["s"],
                    (m["x"], m["y"]),
                    xytext=(0, -m["dy"]),
                    textcoords="offset points",
                    ha={"middle": "center", "end": "right"}.get(m["anchor"], "left"),
                    va="bottom" if m["dy"] < 0 else "center",
                    fontsize=m["size"] * 0.8,
                    color=m["fill"],
                )
        if legend:
            handles = [Patch(color=fill, label=name) for name, fill in legend]
            ax.legend(handles=handles, fontsize=7, loc="upper left")


def _ticks(a: float, b: float) -> list[float]:
    if (a, b) == (0.0, 1.0):
        return [0.0, 0.25, 0.5, 0.75, 1.0]
    return [a + (b - a) * i / 4 for i in range(5)]


def _label(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))


class Heatmap:
    """A square matrix in [-1, 1] (blue negative, red positive) with its values written in."""

    def __init__(self, title: str, labels: Sequence[str], matrix, tips):
        self.title, self.labels, self.matrix, self.tips = title, list(labels), matrix, tips

    def svg(self, legend: Sequence[tuple[str, str]] = ()) -> str:
        title, labels, matrix, tips = self.title, self.labels, self.matrix, self.tips
        n = len(labels)
        cell, left, top = 34, 92, 24
        w, h = left + cell * n + 60, top + cell * n + 80
        out = [
            f'<svg class="panel wide" viewBox="0 0 {w} {h}" role="img"'
            f' aria-label="{_esc(title)}" xmlns="http://www.w3.org/2000/svg">',
            f'<text x="{w / 2:.0f}" y="15" font-size="11" font-weight="bold"'
            f' text-anchor="middle">{_esc(title)}</text>',
        ]
        for i in range(n):
            out.append(
                f'<text x="{left - 4}" y="{top + cell * i + cell / 2 + 3}" font-size="9"'
                f' text-anchor="end">{_esc(labels[i])}</text>'
                f'<text transform="translate({left + cell * i + cell / 2 + 3}'
                f' {top + cell * n + 6}) rotate(60)" font-size="9">{_esc(labels[i])}</text>'
            )
            for j in range(n):
                v = matrix[i][j]
                fill = diverging(v) if finite(v) else "#f4f4f4"
                txt = f"{v:.2f}" if finite(v) else "–"
                out.append(
                    f'<g><title>{_esc(tips[i][j])}</title><rect x="{left + cell * j}"'
                    f' y="{top + cell * i}" width="{cell - 1}" height="{cell - 1}"'
                    f' fill="{fill}"/><text x="{left + cell * j + cell / 2 - 0.5}"'
                    f' y="{top + cell * i + cell / 2 + 3}" font-size="9"'
                    f' text-anchor="middle">{txt}</text></g>'
                )
        out.append("</svg>")
        return "".join(out)

    def draw(self, ax, legend: Sequence[tuple[str, str]] = ()) -> None:
        """The same cells, colours and values on a matplotlib Axes."""
        from matplotlib.colors import to_rgb

        n = len(self.labels)
        cells = [
            [to_rgb(diverging(v) if finite(v) else "#f4f4f4") for v in row] for row in self.matrix
        ]
        ax.imshow(cells, interpolation="nearest")
        ax.set_xticks(range(n), self.labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n), self.labels, fontsize=7)
        for i, row in enumerate(self.matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}" if finite(v) else "–", ha="center", va="center", size=7)
        ax.set_title(self.title, fontsize=9, fontweight="bold")


def save_png(path, panels: Sequence[Panel | Heatmap], legend=(), title: str = "") -> None:
    """``panels`` side by side as one PNG at ``path`` (an ``fcjax.store.fs.Location`` or
    anything with ``write_bytes``); the legend goes on the first panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [p.W / 90 if isinstance(p, Panel) else 1.2 + 0.6 * len(p.labels) for p in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(sum(widths), 3.2 if len(widths) > 1 else 3.4), squeeze=False
    )
    for i, (ax, panel) in enumerate(zip(axes[0], panels, strict=True)):
        panel.draw(ax, legend if i == 0 else ())
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())


def diverging(v: float) -> str:
    """-1 blue, 0 white, +1 red."""
    v = max(-1.0, min(1.0, v))
    if v >= 0:
        r, g, b = 255, int(255 - 140 * v), int(255 - 150 * v)
    else:
        r, g, b = int(255 + 150 * v), int(255 + 110 * v), 255
    return f"#{r:02x}{g:02x}{b:02x}"
