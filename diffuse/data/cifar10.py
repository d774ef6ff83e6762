"""CIFAR-10 from the official python archive (cifar-10-python.tar.gz, Krizhevsky 2009).

The archive is checked against its MD5 before anything in it is read. Its batches are pickles of dicts
{b'data': uint8 N x 3072 (R plane, G plane, B plane, row-major 32x32), b'labels': [int]}; they are read straight
from the tar (nothing is extracted to disk) and unpickled with an allow-list that admits only plain containers
and numpy's array reconstruction. No other member of the archive is unpickled.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from diffuse.data.files import cache_dir, fetch_or_explain, verify_md5
from diffuse.errors import UserError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# numpy arrays pickle as _reconstruct(ndarray, shape, dtype) + __setstate__; the module moved in numpy 2.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3's protocol 2 writes bytes; admitted for latin1 only
}


def _latin1(text, encoding="utf-8"):
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed in a CIFAR-10 batch")
    return text.encode("latin1")


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        if module == "_codecs":
            return _latin1
        if module.startswith("numpy") and name == "_reconstruct":
            return np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
        return getattr(np, name)


def load_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x 3 x 32 x 32, int64 N) from one batch pickle's bytes."""
    try:
        d = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = d[b"data"], d[b"labels"]
        data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
        if data.dtype != np.uint8 or data.size % 3072:
            raise ValueError(f"data is {data.dtype} of {data.size} values, not uint8 rows of 3072")
        data = data.reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise ValueError("labels do not match the images or are outside 0..9")
    except Exception as e:  # anything malformed inside a batch is the file's fault
        raise UserError(f"{where} is not a valid CIFAR-10 batch: {e}") from None
    return data, labels


def read_archive(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 N x 3 x 32 x 32) and labels (int64) of one split, read from the archive without extracting it."""
    xs, ys = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for name in SPLITS[split]:
                member = f"cifar-10-batches-py/{name}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise UserError(f"{path} has no {member}: it is not the CIFAR-10 python archive")
                x, y = load_batch(f.read(), f"{path}:{member}")
                xs.append(x)
                ys.append(y)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path} is corrupted or truncated ({e}); delete it and download it again") from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load(cfg):
    """dataset=cifar10: the archive in dataset.root, downloaded there when missing and dataset.download is true."""
    from diffuse.data import ImageDataset, fit_resolution

    split = cfg["split"]
    if split not in SPLITS:
        raise UserError(f"dataset.split={split!r} is not allowed: choose train or test")
    path = cache_dir(cfg) / ARCHIVE
    if not path.is_file():
        fetch_or_explain(cfg["url"] or URL, path, bool(cfg["download"]))
    verify_md5(path, cfg["md5"])
    images, labels = read_archive(path, split)
    images = fit_resolution(images, cfg)
    return ImageDataset(images, labels, 10, "cifar10", flip=bool(cfg["flip"]))
