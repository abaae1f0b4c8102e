"""Plots as inline SVG: line/scatter charts and grouped bars, with no plotting library and no script.

A report must open anywhere, offline, years later: the page carries its plots as SVG markup, styled
by the page's CSS classes (`dk-*`), each point with a `<title>` tooltip giving its exact figures.
Layout is computed here, in user units of a fixed viewBox, so the browser only scales it.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from html import escape
from typing import Sequence

#: Okabe-Ito colours: distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("circle", "square", "diamond", "triangle")

WIDTH, HEIGHT = 640, 360
#: plot area margins: left holds tick labels and the axis title, bottom likewise; right holds the legend
LEFT, RIGHT, TOP, BOTTOM = 72, 200, 34, 52
#: characters of a legend line that fit beside the plot (a longer label wraps onto more lines, never cut)
LEGEND_CHARS = 24
LEGEND_ROW = 16


def _height(labels: Sequence[str]) -> int:
    """The plot's height: the default, or taller when the legend needs the room."""
    return max(HEIGHT, TOP + LEGEND_ROW * sum(len(_wrapped(label)) for label in labels) + BOTTOM)


def _wrapped(label: str) -> list[str]:
    """A legend label in lines that fit beside the plot, at spaces where it can, whole in any case."""
    return textwrap.wrap(label, LEGEND_CHARS, break_on_hyphens=False) or [label]


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    #: the point's exact figures, shown on hover
    note: str = ""
    #: an interval around y (drawn as a bar), e.g. a speedup's 95% interval
    low: float | None = None
    high: float | None = None
    #: drawn hollow: a figure too noisy to read closely (the note says why)
    noisy: bool = False


@dataclass(frozen=True)
class Series:
    label: str
    points: tuple[Point, ...]
    #: join the points (sorted by x) with a line
    line: bool = True
    #: draw a marker at each point (off for a line that only joins points drawn by other series)
    markers: bool = True


@dataclass(frozen=True)
class Axis:
    label: str
    log: bool = False


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    if high <= low:
        low, high = (low - 1, high + 1) if low == 0 else (low - abs(low) * 0.5, high + abs(high) * 0.5)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten covering [low, high] (positive values only), with 2 and 5 between them when
    the range spans two decades or fewer (else a plot has only two or three labels)."""
    start, stop = math.floor(math.log10(low)), math.ceil(math.log10(high))
    if start == stop:
        stop += 1
    steps = (1, 2, 5) if stop - start <= 2 else (1,)
    ticks = [m * 10.0 ** k for k in range(start, stop) for m in steps] + [10.0 ** stop]
    # trim to the values' neighbourhood: the first tick at or below low, the last at or above high
    first = max(i for i, t in enumerate(ticks) if t <= low * (1 + 1e-9))
    last = min(i for i, t in enumerate(ticks) if t >= high * (1 - 1e-9))
    if first == last:  # one value on a tick: show its neighbours too
        first, last = max(first - 1, 0), min(last + 1, len(ticks) - 1)
    return ticks[first:last + 1]


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:g}"


class _Scale:
    def __init__(self, axis: Axis, values: Sequence[float], start: float, end: float):
        self.log = axis.log
        if self.log:
            positive = [v for v in values if v > 0] or [1.0]
            self.ticks = log_ticks(min(positive), max(positive))
            self.low, self.high = math.log10(self.ticks[0]), math.log10(self.ticks[-1])
        else:
            self.ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
            self.low, self.high = self.ticks[0], self.ticks[-1]
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.start + (v - self.low) / (self.high - self.low) * (self.end - self.start)


def _marker(shape: str, x: float, y: float, colour: str, note: str, cls: str = "dk-point", hollow: bool = False) -> str:
    title = f"<title>{escape(note)}</title>" if note else ""
    # a noisy figure is outlined, not filled
    paint = f'fill="#fff" stroke="{colour}" stroke-width="1.5"' if hollow else f'fill="{colour}"'
    cls += " dk-noisy" if hollow else ""
    if shape == "circle":
        body = f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="4" {paint}>{title}</circle>'
    elif shape == "square":
        body = f'<rect class="{cls}" x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" {paint}>{title}</rect>'
    else:
        pts = ([(x, y - 5), (x + 5, y), (x, y + 5), (x - 5, y)] if shape == "diamond"
               else [(x, y - 5), (x + 5, y + 4), (x - 5, y + 4)])
        coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        body = f'<polygon class="{cls}" points="{coords}" {paint}>{title}</polygon>'
    return body


def _frame(plot_id: str, title: str, x_axis: Axis, y_axis: Axis, xs: _Scale | None, ys: _Scale,
           x_labels: Sequence[tuple[float, str]], height: int) -> list[str]:
    """The svg element's opening, title, plot area, grid, ticks and axis titles."""
    right, bottom = WIDTH - RIGHT, height - BOTTOM
    out = [
        f'<svg id="{escape(plot_id)}" class="dk-plot" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f'<text class="dk-title" x="{LEFT}" y="20">{escape(title)}</text>',
        f'<rect class="dk-area" x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}"/>',
    ]
    for tick in ys.ticks:
        y = ys(tick)
        out.append(f'<line class="dk-grid" x1="{LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="dk-tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{format_tick(tick)}</text>')
    for x, label in x_labels:
        out.append(f'<text class="dk-tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>')
    if xs is not None:
        for tick in xs.ticks:
            out.append(f'<line class="dk-grid" x1="{xs(tick):.1f}" x2="{xs(tick):.1f}" y1="{TOP}" y2="{bottom}"/>')
    out.append(f'<text class="dk-axis" x="{(LEFT + right) / 2:.1f}" y="{height - 12}" text-anchor="middle">'
               f'{escape(x_axis.label)}{" (log)" if x_axis.log else ""}</text>')
    out.append(f'<text class="dk-axis" transform="translate(16 {(TOP + bottom) / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_axis.label)}{" (log)" if y_axis.log else ""}</text>')
    return out


def _legend(labels: Sequence[str]) -> list[str]:
    out = ['<g class="dk-legend">']
    x, row = WIDTH - RIGHT + 14, 0
    for i, label in enumerate(labels):
        y = TOP + 8 + LEGEND_ROW * row
        lines = _wrapped(label)
        row += len(lines)
        out.append(_marker(MARKERS[i // len(PALETTE) % len(MARKERS)], x, y, PALETTE[i % len(PALETTE)], label, "dk-key"))
        spans = "".join(f'<tspan x="{x + 10}" dy="{0 if k == 0 else LEGEND_ROW}">{escape(line)}</tspan>'
                        for k, line in enumerate(lines))
        out.append(f'<text x="{x + 10}" y="{y + 4}" data-label="{escape(label)}">{spans}<title>{escape(label)}</title>'
                   "</text>")
    out.append("</g>")
    return out


def line_plot(plot_id: str, title: str, series: Sequence[Series], x_axis: Axis, y_axis: Axis) -> str:
    """Points (and lines) of each series, one colour and marker per series, legend on the right."""
    points = [p for s in series for p in s.points]
    height = _height([s.label for s in series])
    xs = _Scale(x_axis, [p.x for p in points], LEFT, WIDTH - RIGHT)
    ys = _Scale(y_axis, [v for p in points for v in (p.y, p.low, p.high) if v is not None], height - BOTTOM, TOP)
    out = _frame(plot_id, title, x_axis, y_axis, xs, ys, [(xs(t), format_tick(t)) for t in xs.ticks], height)
    for i, s in enumerate(series):
        colour, shape = PALETTE[i % len(PALETTE)], MARKERS[i // len(PALETTE) % len(MARKERS)]
        ordered = sorted(s.points, key=lambda p: p.x)
        if s.line and len(ordered) > 1:
            path = " ".join(f"{xs(p.x):.1f},{ys(p.y):.1f}" for p in ordered)
            out.append(f'<polyline class="dk-line" points="{path}" stroke="{colour}"/>')
        if not s.markers:
            continue
        out += [f'<line class="dk-interval" x1="{xs(p.x):.1f}" x2="{xs(p.x):.1f}" y1="{ys(p.low):.1f}" '
                f'y2="{ys(p.high):.1f}" stroke="{colour}"/>' for p in ordered if p.low is not None and p.high is not None]
        out += [_marker(shape, xs(p.x), ys(p.y), colour, p.note, hollow=p.noisy) for p in ordered]
    out += _legend([s.label for s in series])
    out.append("</svg>")
    return "\n".join(out)


def bar_plot(plot_id: str, title: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
             y_axis: Axis, notes: Sequence[Sequence[str]] = ()) -> str:
    """Grouped bars: one group per configuration, one bar per series (e.g. per profile) in each."""
    values = [v for _, vs in series for v in vs]
    height = _height([label for label, _ in series])
    ys = _Scale(y_axis, [0.0, *values] if not y_axis.log else values, height - BOTTOM, TOP)
    band = (WIDTH - RIGHT - LEFT) / max(len(groups), 1)
    bar = band * 0.8 / max(len(series), 1)
    labels = [(LEFT + band * (g + 0.5), str(g + 1)) for g in range(len(groups))]
    out = _frame(plot_id, title, Axis("configuration (numbered in the table below)"), y_axis, None, ys, labels, height)
    base = ys(ys.ticks[0]) if y_axis.log else ys(0.0)
    for i, (label, vs) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        for g, value in enumerate(vs):
            x = LEFT + band * g + band * 0.1 + bar * i
            top = ys(value)
            note = notes[i][g] if notes else f"{label}: {value:g}"
            out.append(f'<rect class="dk-point dk-bar" x="{x:.1f}" y="{min(top, base):.1f}" width="{bar:.1f}" '
                       f'height="{abs(base - top):.1f}" fill="{colour}"><title>{escape(note)}</title></rect>')
    out += _legend([label for label, _ in series])
    out.append("</svg>")
    return "\n".join(out)
