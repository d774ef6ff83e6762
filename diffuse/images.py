"""Tensor <-> image file conversions and grids. Model space is [-1, 1]; files are 8-bit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffuse.checkpoint import atomic_write
from diffuse.errors import UserError


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounded to nearest (not truncated)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    """uint8 N x C x H x W -> one uint8 C x H' x W' grid, close to square by default."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[i]
    return grid


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = img.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def save_png(img: torch.Tensor, path: str | Path, upscale: int = 1) -> None:
    """Write a uint8 C x H x W image whole or not at all."""
    pil = to_pil(img)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    atomic_write(Path(path), lambda tmp: pil.save(tmp, format="PNG"))


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def read_png(path: str | Path):
    """A PNG this program wrote, as uint8 C x H x W, or None if it is missing or incomplete."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(-len(_PNG_END), 2)
            if f.read() != _PNG_END:
                return None
        with Image.open(path) as im:
            arr = np.array(im)
    except (OSError, ValueError, SyntaxError):
        return None
    return torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1).contiguous()


def check_size(im: Image.Image, name) -> None:
    """Refuse, from the header alone, an image PIL would warn about as a possible decompression bomb (more
    than Image.MAX_IMAGE_PIXELS, ~89M pixels): decoding it could take gigabytes."""
    w, h = im.size
    if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
        raise UserError(f"{name} is {w}x{h}: more than {Image.MAX_IMAGE_PIXELS} pixels, too large to read")


def convert_image(im: Image.Image, mode: str, name) -> Image.Image:
    """An opened image in `mode` (L or RGB). Palette, alpha (dropped), bilevel, CMYK and the like convert as PIL
    converts them; 16- and 32-bit integer images are scaled to 8 bits (PIL's own conversion clips them, which
    turns a 16-bit image white); floating-point images, whose range is anyone's guess, are refused."""
    if im.mode == "F":
        raise UserError(f"{name} is a floating-point image (mode F): save it with 8 or 16 bits per channel")
    if im.mode == "I" or im.mode.startswith("I;16"):
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    return im.convert(mode)


def grid_upscale(h: int) -> int:
    """Small images are shown enlarged (nearest neighbour) so that a grid is readable: at least ~64 px tiles."""
    return max(1, 64 // h)
