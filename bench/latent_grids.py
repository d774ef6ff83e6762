"""The README's latent-diffusion picture: a pixel-space model's samples beside an autoencoder's reconstructions of
held-out images and a latent model's samples, each what `diffuse sample` / `diffuse train-ae` writes.

    python -m bench.latent_grids --pixel outputs/quickstart --ae outputs/latent_demo/ae \
        --latent outputs/latent_demo/ldm --out docs/latent_shapes.png [--n 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from bench.commands import sample


def samples(ckpt: Path, n: int, work: Path) -> tuple[Image.Image, dict]:
    over = [
        f"ckpt={ckpt}",
        f"n={n}",
        f"grid_n={n}",
        "seed=0",
        "sampler=ddim",
        "steps=50",
        "runtime.device=cpu",
        "save_images=false",
    ]
    info = sample(over, work)
    return Image.open(work / "grid.png").convert("RGB"), info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pixel", required=True, help="a pixel-space training run (the quickstart)")
    ap.add_argument("--ae", required=True, help="the diffuse train-ae run")
    ap.add_argument("--latent", required=True, help="the latent training run (autoencoder=AE)")
    ap.add_argument("--out", default="docs/latent_shapes.png")
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    ae = json.loads((Path(args.ae) / "ae.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        pixel, _ = samples(Path(args.pixel), args.n, Path(tmp) / "p")
        latent, info = samples(Path(args.latent), args.n, Path(tmp) / "l")
    recon = Image.open(Path(args.ae) / "reconstructions.png").convert("RGB")
    # Every image at the latent model's scale: its grid has 4 rows, the reconstructions 2.
    h = latent.size[1]
    pixel = pixel.resize((pixel.size[0] * h // pixel.size[1], h), Image.NEAREST)
    recon = recon.resize((recon.size[0] * h // (2 * recon.size[1]), h // 2), Image.LANCZOS)
    shots = [
        ("pixel space (quickstart), DDIM 50", pixel),
        (f"autoencoder: held-out | reconstructed, {ae['psnr']:.1f} dB", recon),
        ("latent model, DDIM 50, decoded", latent),
    ]
    label_h, gap = 18, 8
    sheet = Image.new(
        "RGB",
        (sum(im.size[0] for _, im in shots) + gap * (len(shots) - 1), max(im.size[1] for _, im in shots) + label_h),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    x = 0
    for label, im in shots:
        sheet.paste(im, (x, label_h))
        draw.text((x + 2, 3), label, fill="black")
        x += im.size[0] + gap
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256).save(args.out, optimize=True)  # a palette keeps the picture small (under 100 KB)
    print(
        f"wrote {args.out}; autoencoder PSNR {ae['psnr']:.2f} dB over {ae['n']} held-out images; latent NFE {info['nfe']}"
    )


if __name__ == "__main__":
    main()
