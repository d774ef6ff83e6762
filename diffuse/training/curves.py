"""curves.png: a training run's metrics.jsonl as a picture, redrawn at each log step by rank 0. Loss on a log axis
(each interval's mean as a faint dot, a centred running mean through them), learning rate, images/s, and the in-training
evaluation (trainer.eval_every) when there is one."""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffuse.plot import COLORS, Panel, Series, panels_plot

# Dots beyond this many are thinned (evenly, by stride) before drawing: a long run stays a few milliseconds a redraw.
MAX_POINTS = 2000


def complete_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each complete line of a metrics.jsonl: a half-written last line, or one that is no JSON
    object, is none."""
    out = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and isinstance(rec, dict):
            out.append((line, rec))
    return out


def read_records(path: Path) -> list[dict]:
    """The complete records of a metrics.jsonl (a half-written last line is not one)."""
    if not path.is_file():
        return []
    return [rec for _, rec in complete_lines(path) if isinstance(rec.get("step"), int)]


def smooth(values: list[float], half: int) -> list[float]:
    """Centred running mean over i-h..i+h, the window narrowed symmetrically at the ends (h = min(half, i, n-1-i)):
    the whole history is redrawn each time, so the line need not lag as a running average of the past does, and a
    straight trend comes out as it is, ends included."""
    n = len(values)
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        out.append((sums[i + h + 1] - sums[i - h]) / (2 * h + 1))
    return out


def smoothing_half_width(n: int) -> int:
    """A window of about a tenth of the points: a flat line would hide a short run, a noisy one a long."""
    return max(1, n // 20)


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    stride = math.ceil(len(points) / MAX_POINTS)
    return points[::stride] if stride > 1 else points


def curve_panels(records: list[dict]) -> list[Panel]:
    train = [r for r in records if "loss" in r]
    loss = [
        (r["step"], r["loss"])
        for r in train
        if isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"]) and r["loss"] > 0
    ]
    panels = []
    p = Panel("training loss", xlabel="step", log_y=True)
    if loss:
        steps, values = zip(*loss)
        smoothed = [math.exp(v) for v in smooth([math.log(v) for v in values], smoothing_half_width(len(values)))]
        p.series = [
            Series(_thin(loss), "per interval", (150, 184, 220), "dots"),
            Series(_thin(list(zip(steps, smoothed))), "smoothed", COLORS[0], "line"),
        ]
    panels.append(p)
    panels.append(
        Panel(
            "learning rate",
            [Series(_thin([(r["step"], r["lr"]) for r in train if "lr" in r]), None, COLORS[2], "line")],
            xlabel="step",
        )
    )
    ips = Panel(
        "images/s",
        [
            Series(
                _thin([(r["step"], r["images_per_s"]) for r in train if "images_per_s" in r]), None, COLORS[1], "line"
            )
        ],
        xlabel="step",
    )
    skipped = [(r["step"], r["skipped"]) for r in train if r.get("skipped")]
    if skipped:  # steps skipped for a non-finite loss: marked where they happened
        ips.title = f"images/s ({sum(s for _, s in skipped)} step(s) skipped, in red)"
        top = max((r["images_per_s"] for r in train if "images_per_s" in r), default=1.0)
        ips.series.append(Series([(s, top) for s, _ in skipped], None, COLORS[3], "dots"))
    panels.append(ips)
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    if evals:
        last = evals[-1]["eval"]
        pts = [(r["step"], r["eval"]["fid"]) for r in evals if isinstance(r["eval"].get("fid"), (int, float))]
        what = f"FID of the EMA model (n={last.get('n')}, {last.get('features')} features)"
        panels.append(Panel(what, [Series(pts, None, COLORS[4])], xlabel="step"))
    return panels


def write_curves(records: list[dict], path: Path) -> None:
    panels = curve_panels(records)
    panels_plot(panels, path, columns=2 if len(panels) == 4 else 3, panel_size=(440, 280))
