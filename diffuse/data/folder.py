"""Any directory of images (PNG, JPEG, WebP): center-cropped to a square, resized, converted to RGB.

With subfolders, each immediate subfolder is a class (sorted names -> labels 0, 1, ...) holding images at any
depth (files beside the subfolders are then not read); without, every image is class 0. Files that cannot be
decoded are reported on stderr and skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from diffuse.errors import UserError
from diffuse.images import open_image

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}


def _images_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def square(img, resolution: int):
    """Center crop to the shorter side, then resize (bicubic, antialiased) to resolution x resolution."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    return img


def read_folder(root: Path, resolution: int, report=None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (uint8 N x 3 x R x R), labels (int64) and class names of an image directory."""
    report = report or (lambda line: print(line, file=sys.stderr))
    if not root.is_dir():
        raise UserError(f"dataset.path={str(root)!r} is not a directory of images")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(k, _images_under(root / c)) for k, c in enumerate(classes)] if classes else [(0, _images_under(root))]
    images, labels, bad = [], [], 0
    for label, files in groups:
        for f in files:
            try:
                img = square(open_image(f, "RGB"), resolution)
            except UserError as e:  # a bad file is reported and skipped, never fatal
                bad += 1
                report(f"warning: skipping {e}")
                continue
            images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise UserError(
            f"dataset.path={str(root)!r} holds no readable PNG, JPEG or WebP image"
            + (f" ({bad} unreadable)" if bad else "")
        )
    if bad:
        report(f"warning: skipped {bad} unreadable file(s) of {bad + len(images)} in {root}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), classes or [""]


def load(cfg):
    """dataset=folder: dataset.path, at dataset.resolution."""
    from diffuse.data import ImageDataset, positive_int

    path = cfg["path"]
    if not path:
        raise UserError("dataset=folder needs dataset.path=DIR (a directory of PNG, JPEG or WebP images)")
    import os

    images, labels, classes = read_folder(Path(os.path.expanduser(str(path))), positive_int(cfg, "resolution"))
    return ImageDataset(images, labels, len(classes), "folder", flip=bool(cfg["flip"]))
