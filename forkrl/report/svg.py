"""Inline SVG charts drawn in Python: line charts with bands and bar charts, with axes, ticks and labels.

No charting library and no script: hover values come from SVG ``<title>`` elements (the browser's tooltip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .markup import Safe, esc, join

PALETTE = ("#1f6fd1", "#d4502a", "#2a9d55", "#8a4fc7", "#c28a00", "#1aa3b5", "#8c564b")
MAX_HOVER_POINTS = 150  # per series: enough to read values, few enough to keep the file small


@dataclass(frozen=True)
class Series:
    """One line: ``ys`` may hold None (a gap); ``lo``/``hi`` draw a shaded band around it."""

    name: str
    xs: list
    ys: list
    color: str = PALETTE[0]
    lo: list | None = None
    hi: list | None = None
    markers: bool = False


def nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """Ticks at multiples of a 1-2-2.5-5 × 10^e step, about ``n`` intervals, covering [lo, hi].

    E.g. (0, 1) → 0, 0.2, …, 1; (1, 60, integer) → 0, 20, 40, 60; (3, 3) → 2.6, 2.8, …, 3.4
    (±10% around a flat line)."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        pad = abs(lo) * 0.1 if lo else 1.0
        lo, hi = (lo - pad, hi + pad) if lo else (0.0, 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag * (1 + 1e-9))
    if integer:
        step = max(1.0, round(step))
    start = math.floor(lo / step + 1e-9) * step
    count = math.ceil(hi / step - 1e-9) - math.floor(lo / step + 1e-9)
    return [round(start + i * step, 12) for i in range(int(count) + 1)]


def tick_label(v: float) -> str:
    if abs(v) >= 10000:
        return f"{v / 1000:g}k"
    return f"{round(v, 10):g}"


class Frame:
    """The plot rectangle inside a ``width`` × ``height`` SVG and the data → pixel maps."""

    def __init__(self, width, height, xr, yr, *, log2x=False, margin=(12, 14, 36, 56)):
        self.w, self.h = width, height
        self.top, self.right, self.bottom, self.left = margin
        self.log2x = log2x
        self.x0, self.x1 = (math.log2(v) for v in xr) if log2x else xr
        self.y0, self.y1 = yr

    def px(self, x: float) -> float:
        x = math.log2(x) if self.log2x else x
        span = (self.x1 - self.x0) or 1.0
        return self.left + (x - self.x0) / span * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.h - self.bottom - (y - self.y0) / span * (self.h - self.top - self.bottom)


def _finite(v) -> bool:
    return v is not None and not isinstance(v, bool) and math.isfinite(v)


def _runs(xs, ys) -> list[list[tuple[float, float]]]:
    """Contiguous stretches of finite points (a None breaks the line)."""
    runs, cur = [], []
    for x, y in zip(xs, ys):
        if _finite(y):
            cur.append((x, y))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _axes(f: Frame, xticks, yticks, xlabel: str, ylabel: str) -> Safe:
    out = []
    for y in yticks:
        py = f.py(y)
        out.append(f'<line class="grid" x1="{f.left}" x2="{f.w - f.right}" y1="{py:.1f}" y2="{py:.1f}"/>'
                   f'<text x="{f.left - 5}" y="{py + 3.5:.1f}" text-anchor="end">{esc(tick_label(y))}</text>')
    base = f.h - f.bottom
    for x in xticks:
        px = f.px(x)
        out.append(f'<line class="axis" x1="{px:.1f}" x2="{px:.1f}" y1="{base}" y2="{base + 4}"/>'
                   f'<text x="{px:.1f}" y="{base + 15}" text-anchor="middle">{esc(tick_label(x))}</text>')
    out.append(f'<line class="axis" x1="{f.left}" x2="{f.w - f.right}" y1="{base}" y2="{base}"/>'
               f'<line class="axis" x1="{f.left}" x2="{f.left}" y1="{f.top}" y2="{base}"/>')
    mid_x, mid_y = (f.left + f.w - f.right) / 2, (f.top + base) / 2
    out.append(f'<text class="label" x="{mid_x:.1f}" y="{f.h - 4}" text-anchor="middle">{esc(xlabel)}</text>'
               f'<text class="label" transform="translate(13 {mid_y:.1f}) rotate(-90)" '
               f'text-anchor="middle">{esc(ylabel)}</text>')
    return Safe("".join(out))


def _band(f: Frame, s: Series) -> Safe:
    out, run = [], []
    for x, lo, hi in list(zip(s.xs, s.lo, s.hi)) + [(None, None, None)]:
        if _finite(lo) and _finite(hi):
            run.append((x, lo, hi))
            continue
        if run:
            pts = [(x, h) for x, _, h in run] + [(x, lo_) for x, lo_, _ in reversed(run)]
            poly = " ".join(f"{f.px(px):.1f},{f.py(py):.1f}" for px, py in pts)
            out.append(f'<polygon class="band" points="{poly}" fill="{s.color}"/>')
        run = []
    return Safe("".join(out))


def _line(f: Frame, s: Series) -> Safe:
    out = []
    runs = _runs(s.xs, s.ys)
    for run in runs:
        if len(run) > 1:
            pts = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in run)
            out.append(f'<polyline class="line" points="{pts}" stroke="{s.color}"/>')
    points = [p for run in runs for p in run]
    for run in runs:
        if s.markers or len(run) == 1 or len(points) <= 30:
            out += [f'<circle class="dot" cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="2.6" fill="{s.color}"/>'
                    for x, y in run]
    stride = max(1, math.ceil(len(points) / MAX_HOVER_POINTS))
    for x, y in points[::stride]:
        tip = esc(f"{s.name} · {tick_label(x)}: {y:.4g}")
        out.append(f'<circle class="hit" cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="6"><title>{tip}</title></circle>')
    return Safe("".join(out))


def _vspan(f: Frame, x0: float, x1: float, label: str) -> Safe:
    a, b = f.px(x0), f.px(x1)
    return Safe(f'<rect class="vspan" x="{a:.1f}" y="{f.top}" width="{max(b - a, 2):.1f}" '
            f'height="{f.h - f.top - f.bottom}"/><text class="vlabel" x="{(a + b) / 2:.1f}" y="{f.top + 10}" '
            f'text-anchor="middle">{esc(label)}</text>')


def line_chart(series: list[Series], *, xlabel: str, ylabel: str, log2x: bool = False, xticks=None,
               y_range=None, y_zero: bool = False, width: int = 360, height: int = 200, vspans=(),
               x_extent=()) -> Safe:
    """An SVG line chart of ``series`` (gaps at None, shaded lo–hi bands) with gridlines, ticks and labels.

    ``y_range`` fixes the y axis (e.g. (0, 1) for a probability); ``y_zero`` extends it down to 0;
    ``vspans`` shades ``(x0, x1, label)`` intervals (e.g. where two curves cross); ``x_extent`` values are
    kept inside the x axis (a stage's first and last step, so sparse series line up with dense ones)."""
    xs = [x for s in series for x, y in zip(s.xs, s.ys) if _finite(y)] + list(x_extent)
    ys = [y for s in series for y in s.ys if _finite(y)]
    ys += [v for s in series if s.lo for v in (s.lo + s.hi) if _finite(v)]
    xticks = list(xticks) if xticks is not None else nice_ticks(min(xs), max(xs), 5, integer=True)
    if y_range is not None:
        yticks = nice_ticks(*y_range, 5)
    else:
        yticks = nice_ticks(min(ys + [0.0] if y_zero else ys), max(ys), 4)
    f = Frame(width, height, (xticks[0], xticks[-1]), (yticks[0], yticks[-1]), log2x=log2x)
    body = [_vspan(f, *v) for v in vspans] + [_axes(f, xticks, yticks, xlabel, ylabel)]
    body += [_band(f, s) for s in series if s.lo is not None and s.hi is not None]
    body += [_line(f, s) for s in series]
    return _svg(width, height, ylabel, body)


def bar_chart(labels: list[str], values: list[float], *, xlabel: str, ylabel: str, color: str = PALETTE[0],
              width: int = 360, height: int = 200) -> Safe:
    """Vertical bars with their values written above them."""
    yticks = nice_ticks(0, max(values + [1]), 4, integer=all(float(v).is_integer() for v in values))
    f = Frame(width, height, (0, len(labels)), (yticks[0], yticks[-1]))
    body = [_axes(f, [], yticks, xlabel, ylabel)]
    slot = f.px(1) - f.px(0)
    for i, (label, v) in enumerate(zip(labels, values)):
        x, y = f.px(i) + slot * 0.18, f.py(v)
        bw, base = slot * 0.64, f.py(0)
        body.append(Safe(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{base - y:.1f}" fill="{color}">'
                    f'<title>{esc(f"{label}: {tick_label(v)}")}</title></rect>'
                    f'<text x="{x + bw / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">{esc(tick_label(v))}</text>'
                    f'<text x="{x + bw / 2:.1f}" y="{base + 15}" text-anchor="middle">{esc(label)}</text>'))
    return _svg(width, height, ylabel, body)


def _svg(width: int, height: int, title: str, body) -> Safe:
    return Safe(f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
                f'aria-label="{esc(title)}">{join(body)}</svg>')
