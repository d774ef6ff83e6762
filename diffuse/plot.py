"""Line charts drawn with PIL: metric-against-NFE plots (eval sweeps, tuned schedules) and a training run's
curves.png, without a plotting dependency (the base install stays small, and a chart redrawn at every log step
costs milliseconds, not a plotting library's import)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from diffuse.io import atomic_write

COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


@dataclass
class Series:
    points: list[tuple[float, float]]
    label: str | None = None  # None: not in the legend
    color: tuple[int, int, int] | None = None  # None: the next palette colour
    style: str = "line+markers"  # line | dots | line+markers


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)
    xlabel: str = ""
    ylabel: str = ""
    log_x: bool = False
    log_y: bool = False
    data_ticks: bool = False  # an x tick at every x value (a handful of NFEs) rather than round numbers


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round-numbered ticks covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step - 1e-9)) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks inside [lo, hi] (both > 0): decades, or 1-2-5 (then every digit) when fewer than three decades fit."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0**e for e in range(a, b + 1) for m in mults if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3:
            return ticks
    # Less than a factor of ~3 from end to end: round numbers on a linear scale, placed on the log axis.
    return [t for t in _ticks(lo, hi) if lo <= t <= hi] or [lo, hi]


def _label(v: float) -> str:
    return f"{v:.4g}"


class _Axis:
    """One axis: data value -> [0, 1], with its ticks."""

    def __init__(self, values: list[float], log: bool, round_ends: bool):
        self.log = log and all(v > 0 for v in values)
        f = self.f
        lo, hi = min(map(f, values)), max(map(f, values))
        if hi == lo:
            lo, hi = (
                lo - (0.5 if self.log else max(abs(lo), 1.0) * 0.5),
                hi + (0.5 if self.log else max(abs(hi), 1.0) * 0.5),
            )
        if self.log:
            pad = 0.04 * (hi - lo)
            self.lo, self.hi = lo - pad, hi + pad
            self.ticks = _log_ticks(10**self.lo, 10**self.hi)
        elif round_ends:  # the axis ends on round ticks
            self.ticks = _ticks(lo, hi)
            self.lo, self.hi = self.ticks[0], self.ticks[-1]
        else:
            pad = 0.04 * (hi - lo)
            self.lo, self.hi = lo - pad, hi + pad
            self.ticks = [t for t in _ticks(self.lo, self.hi) if self.lo <= t <= self.hi]

    def f(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, v: float) -> float:
        return (self.f(v) - self.lo) / (self.hi - self.lo)


def _draw_panel(
    dr: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    panel: Panel,
    font,
    *,
    legend_outside: bool = False,
    round_y: bool = True,
) -> None:
    """The panel inside box (left, top, right, bottom of the whole panel, labels included)."""
    x_left, y_top, x_right, y_bottom = box
    left, top = x_left + 70, y_top + 36
    right = x_right - (150 if legend_outside else 16)
    bottom = y_bottom - 50
    pts = [p for s in panel.series for p in s.points if math.isfinite(p[0]) and math.isfinite(p[1])]
    dr.text(((left + right) / 2, y_top + 12), panel.title, fill=(0, 0, 0), font=font, anchor="mm")
    dr.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    if not pts:
        dr.text(((left + right) / 2, (top + bottom) / 2), "no data yet", fill=(127, 127, 127), font=font, anchor="mm")
        return
    ax = _Axis([p[0] for p in pts], panel.log_x, round_ends=False)
    ay = _Axis([p[1] for p in pts], panel.log_y, round_ends=round_y)
    frame = (left, top, right, bottom)
    _draw_ticks(dr, frame, ax, ay, sorted({p[0] for p in pts}) if panel.data_ticks else ax.ticks, font)
    if panel.xlabel:
        dr.text(
            ((left + right) / 2, y_bottom - 18),
            panel.xlabel + (" (log scale)" if ax.log else ""),
            fill=(0, 0, 0),
            font=font,
            anchor="mm",
        )
    if panel.ylabel or ay.log:
        dr.text((x_left + 8, top - 20), panel.ylabel + (" (log scale)" if ay.log else ""), fill=(0, 0, 0), font=font)
    _draw_series(dr, frame, ax, ay, panel.series, font, legend_outside)


def _draw_ticks(dr: ImageDraw.ImageDraw, frame, ax: _Axis, ay: _Axis, x_ticks: list[float], font) -> None:
    """The y ticks with their grid lines, the x ticks, and the frame (left, top, right, bottom) drawn over both."""
    left, top, right, bottom = frame
    for yt in ay.ticks:
        yy = bottom - ay(yt) * (bottom - top)
        dr.line([left - 4, yy, left, yy], fill=(0, 0, 0))
        dr.line([left + 1, yy, right - 1, yy], fill=(230, 230, 230))
        dr.text((left - 6, yy), _label(yt), fill=(0, 0, 0), font=font, anchor="rm")
    for xv in x_ticks:
        xx = left + ax(xv) * (right - left)
        dr.line([xx, bottom, xx, bottom + 4], fill=(0, 0, 0))
        dr.text((xx, bottom + 6), _label(xv), fill=(0, 0, 0), font=font, anchor="mt")
    dr.rectangle([left, top, right, bottom], outline=(0, 0, 0))  # over the grid lines that meet it


def _draw_series(
    dr: ImageDraw.ImageDraw, frame, ax: _Axis, ay: _Axis, series: list[Series], font, legend_outside: bool
) -> None:
    """Each series' line and markers inside the frame (left, top, right, bottom), and the legend of those labelled."""
    left, top, right, bottom = frame

    def px(x: float, y: float) -> tuple[float, float]:
        return left + ax(x) * (right - left), bottom - ay(y) * (bottom - top)

    shown = 0
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        line = [
            px(x, y) for x, y in sorted(s.points) if math.isfinite(x) and math.isfinite(y) and (not ay.log or y > 0)
        ]
        if "line" in s.style and len(line) > 1:
            dr.line(line, fill=color, width=2)
        r = 1.5 if s.style == "dots" else 3
        if s.style != "line":
            for x, y in line:
                dr.ellipse([x - r, y - r, x + r, y + r], fill=color)
        if s.label is None:
            continue
        ly = top + 8 + 16 * shown
        lx = right + 10 if legend_outside else right - 130
        dr.line([lx, ly, lx + 20, ly], fill=color, width=2)
        dr.text((lx + 26, ly), s.label, fill=(0, 0, 0), font=font, anchor="lm")
        shown += 1


def panels_plot(panels: list[Panel], path: Path, *, columns: int = 2, panel_size: tuple[int, int] = (480, 300)) -> None:
    """Panels on a grid of `columns`, written as one PNG (atomically: a reader never sees half a chart)."""
    font = ImageFont.load_default()
    pw, ph = panel_size
    rows = math.ceil(len(panels) / columns)
    img = Image.new("RGB", (pw * min(columns, len(panels)), ph * rows), "white")
    dr = ImageDraw.Draw(img)
    for k, panel in enumerate(panels):
        x0, y0 = (k % columns) * pw, (k // columns) * ph
        _draw_panel(dr, (x0, y0, x0 + pw, y0 + ph), panel, font)
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    size: tuple[int, int] = (640, 420),
) -> None:
    """One line with markers per series name (points sorted by x), a tick at each x value, a legend on the right;
    written as PNG."""
    if not any(series.values()):
        raise ValueError("nothing to plot")
    panel = Panel(
        title,
        [Series(list(s), name) for name, s in series.items()],
        xlabel=xlabel,
        ylabel=ylabel,
        log_x=log_x,
        data_ticks=True,
    )
    img = Image.new("RGB", size, "white")
    _draw_panel(ImageDraw.Draw(img), (0, 0, *size), panel, ImageFont.load_default(), legend_outside=True)
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))
