"""The loop of the commands that turn each input image into results of its own (inpaint, edit, upsample). Image i's
results are on disk before image i + 1 starts, so the gaps between images are the safe points of a stop request;
the command's record then lists the images done and those never started, for the user to run again on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffuse.console import console, progress_bar
from diffuse.images import save_png
from diffuse.io import write_json
from diffuse.signals import StopRequest


def each_image(
    paths: Sequence[Path],
    n: int,
    work: Callable[[int], tuple[torch.Tensor, Any]],
    out: Path,
    stop: StopRequest,
    progress: str | None = None,
) -> list:
    """work(i) -> (the n results of input i, uint8 n x C x H x W, and what the command keeps of them) for each
    input in turn, until a stop is requested; result j of paths[i] is written as out/STEM_jj.png. Returns what was
    kept, one entry per image done (the first ones of `paths`). `progress`: the description of a progress bar that
    counts results (None: no bar)."""
    kept = []
    with progress_bar(progress is not None) as bar:
        task = bar.add_task(progress or "", total=len(paths) * n)
        for i, path in enumerate(paths):
            if stop.requested:
                break
            results, keep = work(i)
            for j in range(n):
                save_png(results[j], out / f"{path.stem}_{j:02d}.png")
            kept.append(keep)
            bar.advance(task, n)
    return kept


def write_record(
    out: Path, name: str, info: dict, paths: Sequence[Path], done: int, stop: StopRequest, what: str
) -> dict | None:
    """out/NAME holds `info`; when a stop came before paths[done:], it lists them as not_done too, and the stop's
    line ("DONE of ALL {what} OUT; ...") is printed. Returns the stopped command's result, or None when every image
    was done."""
    left = len(paths) - done
    if left:
        info["not_done"] = [str(p) for p in paths[done:]]
    write_json(out / name, info)
    if not left:
        return None
    console.print(
        stop.line(
            f"{done} of {len(paths)} {what} {out}; the other {left} are listed in {name} (not_done): run again on them"
        ),
        markup=False,
    )
    return {**info, "stopped": True}
