"""Datasets: images (uint8, or float in model space for the mixture) and int64 labels, held in memory.

A dataset is built from its config group through the registry below; batches are drawn by index, so the
data order is a generator's state and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffuse.errors import UserError
from diffuse.validate import check_flag, check_number, check_positive_int

# A dataset is held in memory whole (uint8; float32 for the mixture), so its size is bounded before it is built:
# 64 GiB is more than any machine this runs on gives a dataset, and a typo (size=10^9) fails in one line, not
# after minutes of drawing, on an allocation.
MAX_DATASET_BYTES = 2**36
LIMITS = {"resolution": 4096, "channels": 256, "size": 100_000_000}
# shapes renders 4x supersampled, 256 images at a time: about 1.5 GB of working memory at 128 pixels, 6 GB at 256.
SHAPES_MAX_RESOLUTION = 128


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

    def to(self, device) -> ImageDataset:
        return ImageDataset(self.images.to(device), self.labels.to(device), self.num_classes, self.name, self.flip)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    n, c = images.shape[:2]
    # The result, and the float32 batch of up to 4096 images that resize works on.
    check_memory(
        "resolution",
        res,
        max(n * c * res * res, min(n, 4096) * c * res * res * 4 if fit == "resize" else 0),
        f"{n} images of {c} x {res} x {res}",
    )
    if fit == "pad":
        if res < max(h, w):
            raise UserError(f"dataset.resolution={res} is smaller than the {h}x{w} images: use dataset.fit=resize")
        top, left = (res - h) // 2, (res - w) // 2
        return torch.nn.functional.pad(images, (left, res - w - left, top, res - h - top))
    out = []
    for chunk in images.split(4096):
        y = torch.nn.functional.interpolate(
            chunk.float(), size=(res, res), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _shapes(cfg) -> ImageDataset:
    from diffuse.data.shapes import CLASSES, render_shapes

    n = positive_int(cfg, "size")
    res = positive_int(cfg, "resolution", SHAPES_MAX_RESOLUTION)
    k = cfg.get("num_classes")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(CLASSES):
        raise UserError(
            f"dataset.num_classes={k!r} is not allowed: dataset=shapes draws 1 to {len(CLASSES)} kinds ({', '.join(CLASSES)})"
        )
    if cfg.get("channels", 3) != 3:
        raise UserError(
            f"dataset.channels={cfg['channels']!r} is not allowed: dataset=shapes draws RGB images (3 channels)"
        )
    check_memory("size", n, n * 3 * res * res, f"{n} images of 3 x {res} x {res}")
    images, labels = render_shapes(n, resolution=res, seed=integer(cfg, "seed"), num_classes=k)
    return ImageDataset(images, labels, k, "shapes", flip=flag(cfg, "flip"))


def _gmm(cfg) -> ImageDataset:
    mixture = build_mixture(cfg)
    n = positive_int(cfg, "size")
    c, h, w = mixture.shape
    # Drawn in float64, kept in float32.
    check_memory("size", n, n * c * h * w * 8, f"{n} draws of {c} x {h} x {w}")
    g = torch.Generator().manual_seed(integer(cfg, "seed"))
    x, labels = mixture.sample(n, generator=g)
    return ImageDataset(x.float(), labels, mixture.K, "gmm")


def build_mixture(cfg):
    from diffuse.data.gmm import default_mixture, load_mixture

    if cfg["path"]:
        return load_mixture(cfg["path"])
    return default_mixture(channels=positive_int(cfg, "channels"), resolution=positive_int(cfg, "resolution"))


def check_memory(key: str, value, nbytes: int, what: str) -> None:
    """dataset.<key>=value refused when the data it asks for (`what`, `nbytes`) exceeds MAX_DATASET_BYTES."""
    if nbytes > MAX_DATASET_BYTES:
        raise UserError(
            f"dataset.{key}={value!r} is not allowed: {what} take {nbytes / 2**30:,.0f} GiB in memory, more than "
            f"the {MAX_DATASET_BYTES // 2**30} GiB a dataset may"
        )


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


# What a dataset's files decide: its config may state these keys (dataset_shape reads them) but not change them.
FIXED = {
    "cifar10": {"channels": 3, "num_classes": 10},
    "mnist": {"channels": 1, "num_classes": 10},
    "fashion_mnist": {"channels": 1, "num_classes": 10},
    "folder": {"channels": 3},
}


def build_dataset(cfg) -> ImageDataset:
    name = cfg.get("name")
    if name not in DATASETS:
        raise UserError(f"dataset={name!r} is not allowed: choose one of {', '.join(sorted(DATASETS))}")
    for key, fixed in FIXED.get(name, {}).items():
        if key in cfg and cfg[key] != fixed:
            raise UserError(
                f"dataset.{key}={cfg[key]!r} is not allowed: dataset={name} has {fixed} (its images decide it)"
            )
    if "flip" in cfg:
        flag(cfg, "flip")
    return DATASETS[name](cfg)


def positive_int(cfg, key: str, maximum: int | None = None) -> int:
    """dataset.<key>, a positive integer up to `maximum` (by default its entry in LIMITS, if any)."""
    return check_positive_int(f"dataset.{key}", cfg.get(key), maximum or LIMITS.get(key))


def integer(cfg, key: str) -> int:
    return check_number(f"dataset.{key}", cfg.get(key), integer=True)


def flag(cfg, key: str) -> bool:
    return check_flag(f"dataset.{key}", cfg.get(key, False))


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


def dataset_shape(cfg) -> tuple[int, int, int | None]:
    """(channels, resolution, num_classes) of a dataset config without materialising the data."""
    if cfg.get("name") == "gmm":
        m = build_mixture(cfg)
        return m.shape[0], m.shape[-1], m.K
    return int(cfg["channels"]), positive_int(cfg, "resolution"), cfg["num_classes"]
