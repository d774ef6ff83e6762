"""A Gaussian mixture over images: the dataset whose exact denoiser is known in closed form.

Component k has mean image mu_k (C x H x W, values in [-1, 1]), one isotropic std s_k and weight pi_k; the
class label of a sample is its component. `dataset.path=FILE.safetensors` loads tensors `means`, `stds`,
`weights`; without it a default mixture of four well-separated pattern images is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from diffuse.errors import UserError


@dataclass
class GaussianMixture:
    means: torch.Tensor  # (K, C, H, W) float64
    stds: torch.Tensor  # (K,) float64
    weights: torch.Tensor  # (K,) float64, sums to 1

    @property
    def K(self) -> int:
        return self.means.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape[1:])

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels].view(-1, 1, 1, 1) * noise
        return x, labels

    def log_prob(self, x: torch.Tensor, noise_var: float = 0.0, scale: float = 1.0) -> torch.Tensor:
        """log density of scale * x0 + sqrt(noise_var) * eps at x (per sample, float64): the mixture after the
        forward process when (scale, noise_var) = (sqrt(alpha_bar), 1 - alpha_bar)."""
        return torch.logsumexp(self.component_log_probs(x, noise_var, scale), dim=1)

    def component_log_probs(self, x: torch.Tensor, noise_var: float | torch.Tensor = 0.0, scale=1.0) -> torch.Tensor:
        """(B, K): log pi_k + log N(x; scale mu_k, (scale^2 s_k^2 + noise_var) I)."""
        xf = x.to(torch.float64).flatten(1)
        mu = self.means.to(xf.device).flatten(1)
        scale = torch.as_tensor(scale, dtype=torch.float64, device=xf.device).reshape(-1, 1)
        noise_var = torch.as_tensor(noise_var, dtype=torch.float64, device=xf.device).reshape(-1, 1)
        var = scale**2 * self.stds.to(xf.device) ** 2 + noise_var  # (B or 1, K)
        # |x - scale mu_k|^2 expanded so that no (B, K, D) tensor is built.
        sq = (xf**2).sum(1, keepdim=True) - 2 * scale * xf @ mu.T + scale**2 * (mu**2).sum(1)
        d = xf.shape[1]
        return torch.log(self.weights.to(xf.device)) - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely component of each clean sample."""
        return self.component_log_probs(x).argmax(1)


def _pattern(kind: int, c: int, h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij"
    )
    if kind == 0:
        base = xx  # horizontal ramp
    elif kind == 1:
        base = -yy  # vertical ramp
    elif kind == 2:
        base = torch.where((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0, 0.6, -0.6).to(torch.float64)
    else:
        base = 1.2 * (0.5 - (xx**2 + yy**2).sqrt())  # disc
    tint = torch.tensor([[0.9, 0.3, -0.3, 0.1], [0.1, 0.9, 0.2, -0.4], [-0.5, 0.2, 0.9, 0.6]], dtype=torch.float64)
    chans = [(0.6 * base + 0.4 * tint[ch % 3, kind % 4]).clamp(-0.9, 0.9) for ch in range(c)]
    return torch.stack(chans)


def default_mixture(channels: int = 3, resolution: int = 8) -> GaussianMixture:
    """Four components, stds 0.05..0.2, unequal weights; their means are far apart relative to the stds."""
    means = torch.stack([_pattern(k, channels, resolution, resolution) for k in range(4)])
    stds = torch.tensor([0.05, 0.1, 0.15, 0.2], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.3, 0.25, 0.25], dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def load_mixture(path: str | Path) -> GaussianMixture:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise UserError(f"dataset.path={str(path)!r}: no such file (a .safetensors file with means, stds, weights)")
    try:
        t = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"dataset.path={str(path)!r} is not a readable safetensors file: {e}") from None
    missing = [k for k in ("means", "stds", "weights") if k not in t]
    if missing:
        raise UserError(f"dataset.path={str(path)!r} lacks tensor(s) {', '.join(missing)}")
    means, stds, weights = (t[k].to(torch.float64) for k in ("means", "stds", "weights"))
    k = means.shape[0]
    if means.dim() != 4 or stds.shape != (k,) or weights.shape != (k,):
        raise UserError(
            f"dataset.path={str(path)!r}: expected means K x C x H x W, stds (K,), weights (K,); "
            f"got {tuple(means.shape)}, {tuple(stds.shape)}, {tuple(weights.shape)}"
        )
    if (stds <= 0).any() or (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-6:
        raise UserError(f"dataset.path={str(path)!r}: stds must be > 0 and weights >= 0 summing to 1")
    if means.abs().max() > 1:
        raise UserError(f"dataset.path={str(path)!r}: means must lie in [-1, 1]")
    return GaussianMixture(means, stds, weights)
