"""What both estimators share about the data: dimensions per example, nats -> bits, and 8-bit data (its grid, its
uniform dequantization and the discretized Gaussian decoder)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffuse.diffusion.bound import discretized_log_likelihood
from diffuse.diffusion.noise import Generator, randn
from diffuse.errors import UserError

LN2 = math.log(2.0)
# Uniform dequantization puts 8-bit value k in [k, k+1)/256, i.e. [k/128 - 1, (k+1)/128 - 1) in [-1, 1] units:
# bins of width 2/256, so -log2 P(k) <= nll/ln 2 - log2(2/256) per dimension (Theis et al. 2016).
DEQUANT_OFFSET_BITS = math.log2(256 / 2)

Progress = Callable[[int, int], None] | None


def dims(x: torch.Tensor) -> int:
    """Dimensions per example: what a total in nats is divided by for nats/dim."""
    return math.prod(x.shape[1:])


def grid_index(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit value k of each entry of x = 2k/255 - 1; x off that grid is refused."""
    k = ((x.detach().to(torch.float64) + 1) * 127.5).round()
    off = (x.detach().to(torch.float64) - (k / 127.5 - 1)).abs().max() if x.numel() else 0.0
    if x.numel() and (k.min() < 0 or k.max() > 255 or off > 1e-4):
        raise UserError(
            f"8-bit likelihood needs data on the grid 2k/255 - 1, k = 0..255 (range [-1, 1]); got values "
            f"in [{float(x.min()):.4g}, {float(x.max()):.4g}] up to {float(off):.2g} off the grid"
        )
    return k.long()


def uniform(shape, generator: Generator, device) -> torch.Tensor:
    """U(0, 1) in float64, drawn as Phi(z) of a normal through noise.randn so that a PerSample generator keeps
    example i's draws a function of (seed, i) alone."""
    return torch.special.ndtr(randn(shape, generator, device, torch.float64))


def dequantize(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Uniform dequantization of 8-bit data: z = (k + u) / 128 - 1, u ~ U(0, 1), in [-1, 1) (Song et al. 2021's
    convention: the value k spread over [k, k+1)/256 and mapped to [-1, 1])."""
    k = grid_index(x)
    u = uniform(x.shape, generator, x.device)
    return ((k.to(torch.float64) + u) / 128 - 1).to(x.dtype)


def bpd_from_dequantized_nll(nll: torch.Tensor) -> torch.Tensor:
    """Bits/dim of 8-bit data from the nll (nats/dim, [-1, 1] units) of its dequantized values."""
    return nll / LN2 + DEQUANT_OFFSET_BITS


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) per entry under N(mean, std^2), Ho et al. 2020 section 3.3: the bin of 2k/255 - 1 is
    [x - 1/255, x + 1/255], widened to -inf at k = 0 and +inf at k = 255, so the 256 bins cover the line.
    x off the 8-bit grid is refused."""
    grid_index(x)
    return discretized_log_likelihood(x, mean, std)
