"""Small inline-SVG figures for the HTML reports (no files, no network, crisp at any width).

Each figure is one ``<svg>`` with a ``viewBox``, so CSS scales it to its column
(``max-width: 100%``); hovering a mark shows its value (an SVG ``<title>``). Values that are
None or not finite are not drawn.
"""

from __future__ import annotations

import html
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
        self.parts: list[str] = []

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
        d = " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in pts)
        style = ' stroke-dasharray="4 3"' if dash else ""
        title = f"<title>{_esc(tip)}</title>" if tip else ""
        self.parts.append(
            f'<polyline points="{d}" fill="none" stroke="{stroke}" stroke-width="{width}"'
            f"{style}>{title}</polyline>"
        )

    def dots(self, xs, ys, fill="#333", r=2.2, opacity=1.0, tip=None, tips=None) -> None:
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if not (finite(x) and finite(y)):
                continue
            t = tips[i] if tips is not None else tip
            title = f"<title>{_esc(t)}</title>" if t else ""
            self.parts.append(
                f'<circle cx="{self.x(x):.1f}" cy="{self.y(y):.1f}" r="{r}" fill="{fill}"'
                f' fill-opacity="{opacity}">{title}</circle>'
            )

    def rect(self, x0, x1, y0, y1, fill, tip="", opacity=0.8, stroke="none") -> None:
        if not all(finite(v) for v in (x0, x1, y0, y1)):
            return
        px0, px1 = sorted((self.x(x0), self.x(x1)))
        py0, py1 = sorted((self.y(y0), self.y(y1)))
        title = f"<title>{_esc(tip)}</title>" if tip else ""
        self.parts.append(
            f'<rect x="{px0:.1f}" y="{py0:.1f}" width="{max(px1 - px0, 0.8):.1f}"'
            f' height="{py1 - py0:.1f}" fill="{fill}" fill-opacity="{opacity}"'
            f' stroke="{stroke}" stroke-width="0.5">{title}</rect>'
        )

    def errorbar(self, x, lo, hi, stroke="#222", tip="") -> None:
        if not (finite(x) and finite(lo) and finite(hi)):
            return
        px, a, b = self.x(x), self.y(lo), self.y(hi)
        title = f"<title>{_esc(tip)}</title>" if tip else ""
        self.parts.append(
            f'<g class="ci" stroke="{stroke}" stroke-width="1.2">{title}'
            f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{a:.1f}" y2="{b:.1f}"/>'
            f'<line x1="{px - 3:.1f}" x2="{px + 3:.1f}" y1="{a:.1f}" y2="{a:.1f}"/>'
            f'<line x1="{px - 3:.1f}" x2="{px + 3:.1f}" y1="{b:.1f}" y2="{b:.1f}"/></g>'
        )

    def text(self, x, y, s, size=9, anchor="middle", fill="#333", dy=0.0) -> None:
        if not (finite(x) and finite(y)):
            return
        self.parts.append(
            f'<text x="{self.x(x):.1f}" y="{self.y(y) + dy:.1f}" font-size="{size}"'
            f' text-anchor="{anchor}" fill="{fill}">{_esc(s)}</text>'
        )

    def diagonal(self) -> None:
        self.line([0, 1], [0, 1], stroke="#888", dash=True, width=1)

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
            + "".join(self.parts)
            + "".join(leg)
            + "</svg>"
        )


def _ticks(a: float, b: float) -> list[float]:
    if (a, b) == (0.0, 1.0):
        return [0.0, 0.25, 0.5, 0.75, 1.0]
    return [a + (b - a) * i / 4 for i in range(5)]


def _label(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))


def heatmap(title: str, labels: Sequence[str], matrix, tips) -> str:
    """A square matrix in [-1, 1] (blue negative, red positive) with its values written in."""
    n = len(labels)
    cell, left, top = 34, 92, 24
    w, h = left + cell * n + 60, top + cell * n + 80
    out = [
        f'<svg class="panel wide" viewBox="0 0 {w} {h}" role="img" aria-label="{_esc(title)}"'
        ' xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{w / 2:.0f}" y="15" font-size="11" font-weight="bold" text-anchor="middle">'
        f"{_esc(title)}</text>",
    ]
    for i in range(n):
        out.append(
            f'<text x="{left - 4}" y="{top + cell * i + cell / 2 + 3}" font-size="9"'
            f' text-anchor="end">{_esc(labels[i])}</text>'
            f'<text transform="translate({left + cell * i + cell / 2 + 3} {top + cell * n + 6})'
            f' rotate(60)" font-size="9">{_esc(labels[i])}</text>'
        )
        for j in range(n):
            v = matrix[i][j]
            fill = diverging(v) if finite(v) else "#f4f4f4"
            txt = f"{v:.2f}" if finite(v) else "–"
            out.append(
                f'<g><title>{_esc(tips[i][j])}</title><rect x="{left + cell * j}"'
                f' y="{top + cell * i}" width="{cell - 1}" height="{cell - 1}" fill="{fill}"/>'
                f'<text x="{left + cell * j + cell / 2 - 0.5}" y="{top + cell * i + cell / 2 + 3}"'
                f' font-size="9" text-anchor="middle">{txt}</text></g>'
            )
    out.append("</svg>")
    return "".join(out)


def diverging(v: float) -> str:
    """-1 blue, 0 white, +1 red."""
    v = max(-1.0, min(1.0, v))
    if v >= 0:
        r, g, b = 255, int(255 - 140 * v), int(255 - 150 * v)
    else:
        r, g, b = int(255 + 150 * v), int(255 + 110 * v), 255
    return f"#{r:02x}{g:02x}{b:02x}"
