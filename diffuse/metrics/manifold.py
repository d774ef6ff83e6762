"""Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020): how much of the
samples lies on the reference's manifold and how much of the reference the samples reach, in any feature space.

Each set's manifold is the union of balls around its points, each as wide as the distance to the point's k-th
nearest neighbour in its own set (the point itself not counted):
    precision = share of samples inside the reference's manifold          (paper: k = 3, ties count as inside)
    recall    = share of reference points inside the samples' manifold
    density   = (1 / kM) sum over samples of the number of reference balls holding it   (paper: k = 5, open balls)
    coverage  = share of reference points whose own ball holds at least one sample
Distances are Euclidean, in float64, computed in blocks so that no N x M matrix is held.
"""

from __future__ import annotations

import torch

from diffuse.errors import UserError

# Rows of a distance block: 4096 x 50000 float64 is 1.6 GB at most.
BLOCK = 4096


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of a and b, by |a|^2 + |b|^2 - 2ab (a matrix product: fast on any
    device); in float64 the rounding residue of an identical pair is far below any neighbour distance."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * a @ b.T
    return d2.clamp_(min=0).sqrt_()


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    if x.shape[0] <= k:
        raise UserError(f"k={k} nearest neighbours need more than {k} points in a set, got {x.shape[0]}")
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], BLOCK):
        d = _distances(x[s : s + BLOCK], x)
        # The k + 1 smallest include the point itself at distance 0.
        out[s : s + BLOCK] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _prepare(real: torch.Tensor, fake: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise UserError(
            f"the reference has features of shape {tuple(real.shape)}, the samples {tuple(fake.shape)}: "
            "were they made with another extractor?"
        )
    return real.to(device, torch.float64), fake.to(device, torch.float64)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, device="cpu") -> tuple[float, float]:
    """(precision, recall) of the samples `fake` against the reference `real`, N x D and M x D features."""
    real, fake = _prepare(real, fake, device)
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=fake.device)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for s in range(0, fake.shape[0], BLOCK):
        d = _distances(fake[s : s + BLOCK], real)  # block of samples x every reference point
        fake_in[s : s + BLOCK] = (d <= r_real[None]).any(1)
        real_in |= (d <= r_fake[s : s + BLOCK, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, device="cpu") -> tuple[float, float]:
    """(density, coverage) of the samples `fake` against the reference `real`; only the reference's balls count."""
    real, fake = _prepare(real, fake, device)
    r_real = knn_radii(real, k)
    inside = torch.zeros((), dtype=torch.float64, device=real.device)
    nearest = torch.full((real.shape[0],), float("inf"), dtype=torch.float64, device=real.device)
    for s in range(0, fake.shape[0], BLOCK):
        d = _distances(fake[s : s + BLOCK], real)
        inside += (d < r_real[None]).sum()
        nearest = torch.minimum(nearest, d.min(0).values)
    return float(inside / (k * fake.shape[0])), float((nearest < r_real).double().mean())
