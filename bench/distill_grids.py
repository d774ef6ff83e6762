"""Side-by-side grids of a teacher and its distilled student from the same x_T: the teacher by DDIM at 50 steps and
at the student's steps, the student at its own. Each panel is what `diffuse sample ckpt=... seed=0` draws.

    python -m bench.distill_grids --teacher outputs/quickstart --student outputs/quickstart_distill \
        --out docs/distill_shapes.png [--n 16] [--n-rms 256]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.commands import sample
from diffuse.checkpoint import (
    load_checkpoint,
    resolve_ckpt_path,
)


def panel(
    ckpt: Path, steps: int | None, n: int, grid_n: int, work: Path, sampler: str = "ddim"
) -> tuple[Image.Image, dict, np.ndarray]:
    over = [
        f"ckpt={ckpt}",
        f"n={n}",
        f"grid_n={grid_n}",
        "seed=0",
        f"sampler={sampler}",
        "runtime.device=cpu",
        "save_images=false",
        "save_npz=true",
    ]
    info = sample([*over, *([f"steps={steps}"] if steps else [])], work)
    return Image.open(work / "grid.png").convert("RGB"), info, np.load(work / "samples.npz")["arr_0"].astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--out", default="docs/distill_shapes.png")
    ap.add_argument("--n", type=int, default=16, help="images in each grid")
    ap.add_argument("--steps", type=int, default=None, help="the student's steps (default: those it records)")
    ap.add_argument(
        "--n-rms", type=int, default=256, help="images over which each panel's RMS distance to the 50-step one is taken"
    )
    args = ap.parse_args()
    made = load_checkpoint(resolve_ckpt_path(args.student)).config[
        "sampling"
    ]  # a progressive student: ddim; CD/ECT: consistency
    student_steps = args.steps or made["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        n = max(args.n, args.n_rms)
        shots = [
            (f"teacher, DDIM {50} steps", *panel(Path(args.teacher), 50, n, args.n, Path(tmp) / "a")),
            (
                f"teacher, DDIM {student_steps} steps",
                *panel(Path(args.teacher), student_steps, n, args.n, Path(tmp) / "b"),
            ),
            (
                f"student ({made['sampler']}), {student_steps} steps",
                *panel(Path(args.student), args.steps, n, args.n, Path(tmp) / "c", made["sampler"]),
            ),
        ]
    w, h = shots[0][1].size
    label_h, gap = 18, 8
    sheet = Image.new("RGB", (len(shots) * w + (len(shots) - 1) * gap, h + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img, info, _) in enumerate(shots):
        x = i * (w + gap)
        sheet.paste(img, (x, label_h))
        draw.text((x + 2, 3), f"{label} (NFE {info['nfe']})", fill="black")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    ref = shots[0][3]
    print(
        f"wrote {args.out}; RMS distance (0-255) to the teacher's 50-step images from the same x_T, over {len(ref)} images:"
    )
    for label, _, info, x in shots[1:]:
        print(f"  {label}: NFE {info['nfe']}, RMS {np.sqrt(((x - ref) ** 2).mean()):.2f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
