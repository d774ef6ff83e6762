"""The end of a `diffuse eval -m` sweep: every job's metrics.json gathered into summary.csv and summary.md, a
table on stdout, and one PNG per metric plotting it against NFE with a line per sampler, in the sweep dir.

Hydra calls SweepSummary (configured under hydra.callbacks in eval.yaml) once the sweep ends. It reads what
the jobs wrote rather than what they returned, so it works with any launcher; only metrics.json files written
since the sweep started count, so a reused sweep dir does not mix in older results.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from diffuse.io import atomic_write

# Columns of the summary, in this order when present; the metric values follow.
_INFO = ("job", "sampler", "steps", "nfe", "seed", "guidance_scale", "classifier_scale", "n", "features")


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times have a coarser clock on some file systems

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        summarize(Path(str(config.hydra.sweep.dir)), since=self.started)


def collect(sweep_dir: Path, since: float = 0.0) -> list[dict]:
    rows = []
    for f in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        if f.stat().st_mtime < since:
            continue
        try:
            res = json.loads(f.read_text())
        except ValueError:
            continue
        row = {"job": f.parent.name, **{k: res[k] for k in _INFO if k in res}, **res.get("metrics", {})}
        rows.append(row)
    return rows


def summarize(sweep_dir: Path, since: float = 0.0) -> list[dict]:
    from diffuse.console import console

    rows = collect(sweep_dir, since)
    if not rows:
        console.print(f"sweep summary: no metrics.json in {sweep_dir}")
        return rows
    columns = [c for c in _INFO if any(c in r for r in rows)]
    metrics = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in columns]
    columns += metrics

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(sweep_dir / "summary.csv", lambda tmp: tmp.write_text(buf.getvalue()))
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    atomic_write(sweep_dir / "summary.md", lambda tmp: tmp.write_text("\n".join(md) + "\n"))

    from rich.table import Table

    # The table shows what varies; what every job shares goes on one line below it.
    shown = [
        c
        for c in columns
        if c == "job" or c in metrics and not c.endswith("_subset_size") or len({_cell(r.get(c)) for r in rows}) > 1
    ]
    table = Table(title=f"sweep {sweep_dir}", title_justify="left")
    for c in shown:
        table.add_column(c, justify="left" if c in ("sampler", "features") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*[_cell(r.get(c), 4) for c in shown])
    console.print(table)
    common = [f"{c}={_cell(rows[0].get(c))}" for c in columns if c not in shown and rows[0].get(c) is not None]
    if common:
        console.print("all jobs: " + ", ".join(common), markup=False)

    for name in [m for m in metrics if not m.endswith(("_std", "_subset_size"))]:
        plotted = plot_metric(rows, name, sweep_dir / f"{name}_vs_nfe.png")
        if plotted:
            console.print(f"plot: {plotted}")
    console.print(f"summary: {sweep_dir / 'summary.csv'}")
    return rows


def plot_metric(rows: list[dict], metric: str, path: Path) -> Path | None:
    """metric against NFE, one line per sampler; None when the jobs carry no NFE (scored samples= files)."""
    from diffuse.plot import line_plot

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("nfe") and r.get(metric) is not None:
            series.setdefault(str(r.get("sampler", "?")), []).append((float(r["nfe"]), float(r[metric])))
    if not series:
        return None
    nfes = [x for s in series.values() for x, _ in s]
    line_plot(
        series, path, title=f"{metric} against NFE", xlabel="NFE", ylabel=metric, log_x=max(nfes) / min(nfes) >= 4
    )
    return path


def _cell(v: Any, digits: int = 6) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)
