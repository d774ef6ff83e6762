"""A line chart drawn with PIL: enough for metric-against-NFE plots without a plotting dependency."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from diffuse.checkpoint import atomic_write

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round-numbered ticks covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _label(v: float) -> str:
    return f"{v:.4g}"


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path, *, title: str, xlabel: str, ylabel: str,
              log_x: bool = False, size: tuple[int, int] = (640, 420)) -> None:
    """One line with markers per series name (points sorted by x), axes with ticks, a legend; written as PNG."""
    font = ImageFont.load_default()
    w, h = size
    left, right, top, bottom = 70, 150, 36, 50
    pts = [p for s in series.values() for p in s]
    if not pts:
        raise ValueError("nothing to plot")
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs, ys = [fx(p[0]) for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y_ticks = _ticks(min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1)
    y0, y1 = y_ticks[0], y_ticks[-1]

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    dr.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for yt in y_ticks:
        _, yy = px(10 ** x0 if log_x else x0, yt)
        dr.line([left - 4, yy, left, yy], fill=(0, 0, 0))
        dr.line([left + 1, yy, w - right - 1, yy], fill=(230, 230, 230))
        dr.text((left - 6, yy), _label(yt), fill=(0, 0, 0), font=font, anchor="rm")
    for xv in sorted({p[0] for p in pts}):
        xx, _ = px(xv, y0)
        dr.line([xx, h - bottom, xx, h - bottom + 4], fill=(0, 0, 0))
        dr.text((xx, h - bottom + 6), _label(xv), fill=(0, 0, 0), font=font, anchor="mt")
    dr.text(((left + w - right) / 2, h - 18), xlabel + (" (log scale)" if log_x else ""), fill=(0, 0, 0), font=font, anchor="mm")
    dr.text((8, top - 20), ylabel, fill=(0, 0, 0), font=font)
    dr.text(((left + w - right) / 2, 12), title, fill=(0, 0, 0), font=font, anchor="mm")
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        line = [px(x, y) for x, y in sorted(s)]
        if len(line) > 1:
            dr.line(line, fill=color, width=2)
        for x, y in line:
            dr.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = top + 8 + 16 * i
        dr.line([w - right + 10, ly, w - right + 30, ly], fill=color, width=2)
        dr.text((w - right + 36, ly), name, fill=(0, 0, 0), font=font, anchor="lm")
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))
