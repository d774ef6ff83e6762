"""Datasets: images (uint8, or float in model space for the mixture) and int64 labels, held in memory.

A dataset is built from its config group through the registry below; batches are drawn by index, so the
data order is a generator's state and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from diffuse.errors import UserError


@dataclass
class ImageDataset:
    images: torch.Tensor  # N x C x H x W, uint8 (8-bit data) or float (already in model space)
    labels: torch.Tensor  # N, int64
    num_classes: int
    name: str = ""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def is_8bit(self) -> bool:
        return self.images.dtype == torch.uint8

    def to(self, device) -> "ImageDataset":
        return ImageDataset(self.images.to(device), self.labels.to(device), self.num_classes, self.name)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in model space ([-1, 1] for 8-bit data) and labels, on the dataset's device."""
        idx = idx.to(self.images.device)
        x = self.images[idx]
        x = x.float() / 127.5 - 1.0 if self.is_8bit else x.float()
        return x, self.labels[idx]


def _shapes(cfg) -> ImageDataset:
    from diffuse.data.shapes import render_shapes

    n = _positive(cfg, "size")
    images, labels = render_shapes(n, resolution=_positive(cfg, "resolution"), seed=int(cfg.get("seed", 0)), num_classes=int(cfg.get("num_classes", 4)))
    return ImageDataset(images, labels, int(cfg.get("num_classes", 4)), "shapes")


def _gmm(cfg) -> ImageDataset:
    mixture = build_mixture(cfg)
    g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    x, labels = mixture.sample(_positive(cfg, "size"), generator=g)
    return ImageDataset(x.float(), labels, mixture.K, "gmm")


def build_mixture(cfg):
    from diffuse.data.gmm import default_mixture, load_mixture

    if cfg.get("path"):
        return load_mixture(cfg.path)
    return default_mixture(channels=_positive(cfg, "channels"), resolution=_positive(cfg, "resolution"))


DATASETS: dict[str, Callable] = {"shapes": _shapes, "gmm": _gmm}


def build_dataset(cfg) -> ImageDataset:
    name = cfg.get("name")
    if name not in DATASETS:
        raise UserError(f"dataset={name!r} is not allowed: choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](cfg)


def _positive(cfg, key: str) -> int:
    val = cfg.get(key)
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise UserError(f"dataset.{key}={val!r} is not allowed: it must be a positive integer")
    return val


def dataset_shape(cfg) -> tuple[int, int, Optional[int]]:
    """(channels, resolution, num_classes) of a dataset config without materialising the data."""
    if cfg.get("name") == "gmm":
        m = build_mixture(cfg)
        return m.shape[0], m.shape[-1], m.K
    return int(cfg.get("channels", 3)), _positive(cfg, "resolution"), cfg.get("num_classes")
