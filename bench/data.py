"""Loader throughput against a training step's consumption. A benchmark: it prints figures, it does not judge.

    python -m bench.data [--device cpu|cuda] [--batch 128] [--model tiny]

Loader: ImageDataset.batch (index, flip on the device, uint8 -> [-1, 1]) on the shapes dataset and on a synthetic
in-memory CIFAR-sized dataset (50000 x 3 x 32 x 32). Consumption: images/s of one real Trainer step on a model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from diffuse.data import ImageDataset


def rate(fn, n_images: int, device: torch.device, min_time: float = 1.0) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return reps * n_images / dt


def loader_rate(ds: ImageDataset, batch: int, device: torch.device) -> float:
    ds = ds.to(device)
    g = torch.Generator().manual_seed(0)
    return rate(lambda: ds.batch(torch.randint(0, len(ds), (batch,), generator=g), generator=g), batch, device)


def train_rate(model: str, batch: int, device: str, resolution: int) -> float:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from diffuse.training.trainer import Trainer

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        cfg = compose(
            "train",
            [
                f"model={model}",
                f"trainer.batch_size={batch}",
                f"runtime.device={device}",
                "dataset.size=512",
                f"dataset.resolution={resolution}",
            ],
        )
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, Path(d))
        return rate(tr.train_step, batch, tr.device, min_time=3.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--resolution", type=int, default=32)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")

    from diffuse.data.shapes import render_shapes

    images, labels = render_shapes(20000, resolution=16)
    shapes = ImageDataset(images, labels, 4, "shapes", flip=True)
    g = torch.Generator().manual_seed(0)
    cifar = ImageDataset(
        torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (50000,), generator=g),
        10,
        "cifar-sized",
        flip=True,
    )
    rows = [
        ("loader: shapes 20000x3x16x16 (flip)", loader_rate(shapes, args.batch, device)),
        ("loader: cifar-sized 50000x3x32x32 (flip)", loader_rate(cifar, args.batch, device)),
    ]
    step = train_rate(args.model, args.batch, args.device, args.resolution)
    rows.append((f"train step: model={args.model} at {args.resolution}x{args.resolution}", step))
    for name, r in rows:
        print(f"{name:48s} {r:12,.0f} images/s")
    print(f"loader headroom on cifar-sized data: {rows[1][1] / step:,.0f}x the training step's consumption")


if __name__ == "__main__":
    main()
