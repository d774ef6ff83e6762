"""Randomness that is passed in.

A sampler draws its noise through `randn(shape, generator, device)`. The generator is either a plain
torch.Generator (one stream for the whole batch) or a `PerSample` generator, which gives sample i its own
stream seeded from (seed, i): then image i is the same whatever the batch it is drawn in, the batch size, or
the number of processes that share the work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Large odd constant so that (seed, index) pairs map to distinct 63-bit seeds.
_STRIDE = 0x9E3779B97F4A7C15


def sample_seed(seed: int, index: int) -> int:
    return (int(seed) * _STRIDE + int(index) + 1) % (2**63 - 1)


class PerSample:
    """One CPU generator per sample index; draws are made on the CPU and moved, so they do not depend on the device.

    On CUDA the rows are drawn into pinned memory and copied without blocking: the host draws step k+1's noise
    while the GPU still runs step k's network, so the per-step copy costs no GPU time. (Drawing on the GPU
    instead would need one generator launch per sample and per step, and would make images depend on the
    device; drawing every step's noise up front would hold steps x batch images of noise.)
    """

    def __init__(self, seed: int, indices: Sequence[int]):
        self.indices = [int(i) for i in indices]
        self.generators = []
        for i in self.indices:
            g = torch.Generator()
            g.manual_seed(sample_seed(seed, i))
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], device, dtype=torch.float32) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} asked from a generator of {len(self.generators)} samples")
        pinned = torch.device(device).type == "cuda"
        out = torch.empty(tuple(shape), dtype=torch.float32, pin_memory=pinned)
        for row, g in zip(out, self.generators):
            torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32, out=row)
        return out.to(device, non_blocking=pinned).to(dtype)

    def get_state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]


Generator = torch.Generator | PerSample | None


def randn(shape: Sequence[int], generator: Generator, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(generator, PerSample):
        return generator.randn(shape, device, dtype)
    gen_device = generator.device if generator is not None else device
    # Drawn in float32 (4x faster than float64 on the CPU, and the same stream whatever the sampler's dtype).
    out = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)
