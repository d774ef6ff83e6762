"""The embedded default dataset: procedurally drawn RGB images of simple shapes, no download.

Class = shape kind (circle, square, triangle, cross); colour, size and position are random. Everything follows
from the seed: image i of a dataset is the same on every machine. Shapes are rendered by 4x supersampling of
the shapes' implicit inside-tests, so edges are anti-aliased.
"""

from __future__ import annotations

import torch

CLASSES = ("circle", "square", "triangle", "cross")


def render_shapes(
    n: int, resolution: int = 16, seed: int = 0, num_classes: int = 4, ss: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (uint8, n x 3 x R x R) and their labels (int64)."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be 1..{len(CLASSES)}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    size = 0.45 + 0.35 * torch.rand(n, generator=g)  # half-extent as a fraction of half the image
    cx = (1 - size) * (2 * torch.rand(n, generator=g) - 1)  # keep the whole shape inside
    cy = (1 - size) * (2 * torch.rand(n, generator=g) - 1)
    # Saturated colours on a dark background: hue from a colour wheel, random brightness.
    hue = torch.rand(n, generator=g) * 6
    bright = 0.7 + 0.3 * torch.rand(n, generator=g)
    bg = 0.1 * torch.rand(n, 3, generator=g)

    r = resolution * ss
    coords = (torch.arange(r, dtype=torch.float32) + 0.5) / r * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty(n, 3, resolution, resolution, dtype=torch.uint8)
    for start in range(0, n, 256):
        sl = slice(start, min(n, start + 256))
        dx = (xx[None] - cx[sl, None, None]) / size[sl, None, None]
        dy = (yy[None] - cy[sl, None, None]) / size[sl, None, None]
        inside = torch.stack(
            [
                dx**2 + dy**2 <= 1.0,  # circle
                (dx.abs() <= 0.85) & (dy.abs() <= 0.85),  # square
                (dy <= 0.8) & (dy >= 1.6 * dx.abs() - 0.9),  # triangle, apex up
                ((dx.abs() <= 0.3) | (dy.abs() <= 0.3)) & (dx.abs() <= 1) & (dy.abs() <= 1),  # cross
            ],
            dim=1,
        )
        mask = inside[torch.arange(sl.stop - sl.start), labels[sl]].float()
        cover = torch.nn.functional.avg_pool2d(mask[:, None], ss)  # anti-aliased coverage in [0, 1]
        colour = _hue_to_rgb(hue[sl]) * bright[sl, None]
        img = bg[sl, :, None, None] * (1 - cover) + colour[:, :, None, None] * cover
        out[sl] = (img * 255).round().clamp(0, 255).to(torch.uint8)
    return out, labels


def _hue_to_rgb(h: torch.Tensor) -> torch.Tensor:
    """Fully saturated RGB for hue h in [0, 6)."""
    k = torch.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], dim=1)
    return 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)
