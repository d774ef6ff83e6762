"""Throughput of the FID Inception-v3 feature extractor: images/s, and the time 50k samples would take.

    python -m bench.eval_features [--device cuda] [--batch 200] [--images 1000] [--resolution 32]

Speed does not depend on the weight values: without the published file this runs with random weights.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffuse.metrics.inception import FIDInceptionV3, resize_bilinear_tf1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--images", type=int, default=None, help="default: 2000 on CUDA, 16 on the CPU")
    ap.add_argument("--resolution", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device(args.device)
    total = args.images or (2000 if dev.type == "cuda" else 16)
    batch = min(args.batch, total)
    net = FIDInceptionV3().to(dev)
    x = torch.randint(0, 256, (batch, 3, args.resolution, args.resolution), dtype=torch.uint8, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    net(x[:2])  # warm-up: kernels, allocator
    sync()
    t = time.perf_counter()
    done = 0
    while done < total:
        net(x)
        done += batch
    sync()
    dt = time.perf_counter() - t
    t2 = time.perf_counter()
    for _ in range(5):
        resize_bilinear_tf1(x.float(), 299)
    sync()
    rs = (time.perf_counter() - t2) / (5 * batch)
    print(
        f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), batch {batch}, {args.resolution}x{args.resolution} inputs"
    )
    print(
        f"inception: {done / dt:.1f} images/s ({dt / done * 1e3:.2f} ms/image); 50k images: {50000 * dt / done / 60:.1f} min"
    )
    print(f"TF1 resize to 299: {rs * 1e6:.1f} us/image ({100 * rs / (dt / done):.1f}% of the extractor)")


if __name__ == "__main__":
    main()
