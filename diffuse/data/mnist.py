"""MNIST and Fashion-MNIST from their IDX files (LeCun et al. 1998; Xiao et al. 2017), gzipped or not.

IDX: a big-endian header (two zero bytes, a type byte 0x08 = uint8, a rank byte, then one uint32 per dimension)
followed by the values. Files are looked for as NAME and NAME.gz in dataset.root (and, for Fashion-MNIST, in
/usr/share/datasets/fashion-mnist where Debian's dataset-fashion-mnist installs them); a missing .gz is
downloaded into dataset.root when dataset.download is true. The official .gz files in dataset.root are checked
against their MD5 (Debian recompresses them, so files in its directory are trusted to dpkg and checked only by
structure); every file's IDX header and size are checked.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from diffuse.data.files import cache_dir, fetch_or_explain, verify_md5
from diffuse.errors import UserError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SOURCES = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "dirs": (),
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion_mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "dirs": ("/usr/share/datasets/fashion-mnist",),
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fcb6ec1f3ac2e6a5c7b4ad8ab8d0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
}


def read_idx(path: Path, rank: int) -> np.ndarray:
    """The uint8 array in an IDX file of the given rank (1: labels, 3: images)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path} is corrupted or truncated ({e}); delete it and download it again") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != rank:
        raise UserError(
            f"{path} is not an IDX file of uint8 with {rank} dimension(s): its magic is {raw[:4].hex() or 'empty'}, expected 000008{rank:02x}"
        )
    header = 4 + 4 * rank
    if len(raw) < header:
        raise UserError(f"{path} is truncated: its header is incomplete")
    dims = struct.unpack(f">{rank}I", raw[4:header])
    if len(raw) != header + int(np.prod(dims)):
        raise UserError(
            f"{path} has {len(raw) - header} values where its header {dims} says {int(np.prod(dims))}: it is truncated or corrupted"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_split(cfg, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N x 1 x 28 x 28 images and int64 labels of a split of dataset `which`."""
    src = SOURCES[which]
    split = cfg["split"]
    if split not in FILES:
        raise UserError(f"dataset.split={split!r} is not allowed: choose train or test")
    root = cache_dir(cfg)
    dirs = [root, *map(Path, src["dirs"])]
    md5 = src["md5"] if cfg["verify"] else {}
    arrays = []
    for name, rank in zip(FILES[split], (3, 1)):
        path = find(name, dirs)
        if path is None:
            path = root / f"{name}.gz"
            fetch_or_explain((cfg["url"] or src["url"]) + path.name, path, bool(cfg["download"]))
        if path.parent == root:  # system directories hold what the package manager verified (and recompressed)
            verify_md5(path, md5.get(path.name))
        arrays.append(read_idx(path, rank))
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{which} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def _load(cfg, which: str):
    from diffuse.data import ImageDataset, fit_resolution

    images, labels = load_split(cfg, which)
    images = fit_resolution(images, cfg)
    return ImageDataset(images, labels, 10, which, flip=bool(cfg["flip"]))


def load_mnist(cfg):
    return _load(cfg, "mnist")


def load_fashion_mnist(cfg):
    return _load(cfg, "fashion_mnist")
