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
    flip: bool = False  # random horizontal flips in batch(), drawn from the caller's generator

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
        return ImageDataset(self.images.to(device), self.labels.to(device), self.num_classes, self.name, self.flip)

    def batch(self, idx: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in model space ([-1, 1] for 8-bit data) and labels, on the dataset's device.

        With flip on and a generator given, each image is mirrored left-right with probability 1/2; the coin
        flips are drawn from `generator` (one per image, on its device) and the flip itself runs on the
        dataset's device, so the augmentation is part of the data stream a checkpoint saves.
        """
        idx = idx.to(self.images.device)
        x = self.images[idx]
        if self.flip and generator is not None:
            mirror = flip_mask(len(idx), generator).to(x.device)
            # A select, not x[mirror] = ...: boolean indexing counts the flips on the host, a GPU sync per batch.
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        x = x.float().div_(127.5).sub_(1.0) if self.is_8bit else x.float()
        return x, self.labels[idx]


def flip_mask(n: int, generator: torch.Generator) -> torch.Tensor:
    """Which of n images batch() mirrors: a fair coin per image from the generator."""
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def fit_resolution(images: torch.Tensor, cfg) -> torch.Tensor:
    """uint8 images brought to dataset.resolution: `pad` (zeros around, centred) or `resize` (antialiased bilinear)."""
    res = positive_int(cfg, "resolution")
    fit = cfg["fit"]
    if fit not in ("pad", "resize"):
        raise UserError(f"dataset.fit={fit!r} is not allowed: choose pad or resize")
    h, w = images.shape[-2:]
    if (h, w) == (res, res):
        return images
    if fit == "pad":
        if res < max(h, w):
            raise UserError(f"dataset.resolution={res} is smaller than the {h}x{w} images: use dataset.fit=resize")
        top, left = (res - h) // 2, (res - w) // 2
        return torch.nn.functional.pad(images, (left, res - w - left, top, res - h - top))
    out = []
    for chunk in images.split(4096):
        y = torch.nn.functional.interpolate(chunk.float(), size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _shapes(cfg) -> ImageDataset:
    from diffuse.data.shapes import render_shapes

    n = positive_int(cfg, "size")
    images, labels = render_shapes(n, resolution=positive_int(cfg, "resolution"), seed=int(cfg["seed"]), num_classes=int(cfg["num_classes"]))
    return ImageDataset(images, labels, int(cfg["num_classes"]), "shapes", flip=bool(cfg["flip"]))


def _gmm(cfg) -> ImageDataset:
    mixture = build_mixture(cfg)
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    x, labels = mixture.sample(positive_int(cfg, "size"), generator=g)
    return ImageDataset(x.float(), labels, mixture.K, "gmm")


def build_mixture(cfg):
    from diffuse.data.gmm import default_mixture, load_mixture

    if cfg["path"]:
        return load_mixture(cfg["path"])
    return default_mixture(channels=positive_int(cfg, "channels"), resolution=positive_int(cfg, "resolution"))


def _cifar10(cfg) -> ImageDataset:
    from diffuse.data.cifar10 import load

    return load(cfg)


def _mnist(cfg) -> ImageDataset:
    from diffuse.data.mnist import load_mnist

    return load_mnist(cfg)


def _fashion_mnist(cfg) -> ImageDataset:
    from diffuse.data.mnist import load_fashion_mnist

    return load_fashion_mnist(cfg)


def _folder(cfg) -> ImageDataset:
    from diffuse.data.folder import load

    return load(cfg)


DATASETS: dict[str, Callable] = {
    "shapes": _shapes,
    "gmm": _gmm,
    "cifar10": _cifar10,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "folder": _folder,
}


def build_dataset(cfg) -> ImageDataset:
    name = cfg.get("name")
    if name not in DATASETS:
        raise UserError(f"dataset={name!r} is not allowed: choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](cfg)


def positive_int(cfg, key: str) -> int:
    val = cfg.get(key)
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise UserError(f"dataset.{key}={val!r} is not allowed: it must be a positive integer")
    return val


def held_out(cfg: dict) -> tuple[dict, str]:
    """The config of a dataset's held-out data, and its description: split=test where the dataset has splits; for
    the generated datasets (gmm, shapes) a fresh draw with seed + 1, which training (seed) never saw; a folder as
    it is. Never flipped."""
    cfg = {**cfg, "flip": False}
    if "split" in cfg:
        return {**cfg, "split": "test"}, "test split"
    if "seed" in cfg:
        return {**cfg, "seed": int(cfg["seed"]) + 1}, f"held-out draw, seed {int(cfg['seed']) + 1}"
    return cfg, "all of it"


def dataset_shape(cfg) -> tuple[int, int, Optional[int]]:
    """(channels, resolution, num_classes) of a dataset config without materialising the data."""
    if cfg.get("name") == "gmm":
        m = build_mixture(cfg)
        return m.shape[0], m.shape[-1], m.K
    return int(cfg["channels"]), positive_int(cfg, "resolution"), cfg["num_classes"]
