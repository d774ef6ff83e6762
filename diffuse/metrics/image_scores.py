"""FID, KID and Inception Score from features, computed by torchmetrics; reference statistics files.

The features are extracted once per image (diffuse.metrics.features) and handed to torchmetrics' metrics
through a pass-through `feature=` module, so FID, KID and IS share one network pass. Under torchrun every rank
already holds all the features, so torchmetrics' own cross-process sync is off (it would count them twice). FID's reference side is
torchmetrics' own running sums, set from the cached mean and covariance (sum = n mu,
sum of outer products = (n - 1) Sigma + n mu mu^T), so a cached reference gives the FID a fresh one would.

A statistics file is safetensors (never a pickle) with
    mu        D, float64       mean of the reference features
    sigma     D x D, float64   their covariance (unbiased, n - 1)
    features  M x D, float32   a seeded random subset of the reference features (M = min(n, kid_ref_max)), for KID
and string metadata diffuse.kind = "ref_stats", diffuse.stats = JSON {n, features, weights_sha256, channels,
resolution, source, ...}.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffuse.checkpoint import read_metadata
from diffuse.errors import UserError
from diffuse.io import atomic_write

KIND = "ref_stats"


class Precomputed(nn.Module):
    """The `feature=` module handed to torchmetrics: the inputs already are the features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance, in float64."""
    f = features.to(torch.float64)
    if f.shape[0] < 2:
        raise UserError(f"statistics need at least 2 images, got {f.shape[0]}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


class MomentAccumulator:
    """Running float64 sums of features and their outer products: the mean and covariance of a stream."""

    def __init__(self):
        self.n, self.s, self.ss = 0, None, None

    def add(self, features: torch.Tensor) -> None:
        f = features.to(torch.float64)
        if self.s is None:
            self.s, self.ss = (
                torch.zeros(f.shape[1], dtype=torch.float64),
                torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64),
            )
        self.n += f.shape[0]
        self.s += f.sum(0)
        self.ss += f.T @ f

    def merge(self, other: MomentAccumulator) -> None:
        if other.s is None:
            return
        if self.s is None:
            self.n, self.s, self.ss = other.n, other.s.clone(), other.ss.clone()
        else:
            self.n, self.s, self.ss = self.n + other.n, self.s + other.s, self.ss + other.ss

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise UserError(f"statistics need at least 2 images, got {self.n}")
        mu = self.s / self.n
        return mu, (self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)


@dataclass
class RefStats:
    mu: torch.Tensor
    sigma: torch.Tensor
    features: torch.Tensor  # the KID subset
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.meta["n"])


def save_stats(path: Path, stats: RefStats) -> None:
    from safetensors.torch import save_file

    tensors = {
        "mu": stats.mu.to(torch.float64).contiguous(),
        "sigma": stats.sigma.to(torch.float64).contiguous(),
        "features": stats.features.to(torch.float32).contiguous(),
    }
    meta = {"diffuse.kind": KIND, "diffuse.stats": json.dumps(stats.meta, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def stats_metadata(path: Path) -> dict[str, Any]:
    meta = read_metadata(path)
    if meta.get("diffuse.kind") != KIND:
        raise UserError(
            f"{path} is a safetensors file but not diffuse reference statistics (written by diffuse eval --save-ref)"
        )
    try:
        info = json.loads(meta["diffuse.stats"])
        int(info["n"])
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(
            f"{path}: reference statistics metadata is damaged ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    return info


def load_stats(path: Path) -> RefStats:
    from safetensors.torch import load_file

    info = stats_metadata(path)
    try:
        t = load_file(str(path))
        stats = RefStats(t["mu"], t["sigma"], t["features"], info)
    except Exception as e:  # truncated file, missing tensor or key, bad JSON
        raise UserError(f"{path}: reference statistics are damaged ({type(e).__name__}: {str(e)[:120]})") from None
    d = stats.mu.shape[0]
    if stats.sigma.shape != (d, d) or stats.features.dim() != 2 or stats.features.shape[1] != d or stats.n < 2:
        raise UserError(
            f"{path}: reference statistics are inconsistent (mu {tuple(stats.mu.shape)}, sigma {tuple(stats.sigma.shape)}, features {tuple(stats.features.shape)})"
        )
    return stats


def fid(ref: RefStats, fake: torch.Tensor) -> float:
    """Fréchet distance between N(ref.mu, ref.sigma) and the Gaussian fitted to `fake` (N x D) features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    d = ref.mu.shape[0]
    if fake.shape[1] != d:
        raise UserError(
            f"the reference has {d}-d features, the samples {fake.shape[1]}-d: were they made with another extractor?"
        )
    metric = FrechetInceptionDistance(feature=Precomputed(d), reset_real_features=False, sync_on_compute=False)
    n = ref.n
    mu, sigma = ref.mu.to(torch.float64), ref.sigma.to(torch.float64)
    metric.real_features_sum = n * mu
    metric.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)
    for chunk in fake.to(torch.float64).split(4096):
        metric.update(chunk, real=False)
    return float(metric.compute())


def kid(
    ref_features: torch.Tensor, fake: torch.Tensor, *, subsets: int, subset_size: int, seed: int
) -> tuple[float, float, int]:
    """(mean, std over subsets, subset size used) of the unbiased polynomial-kernel MMD^2 (Binkowski et al. 2018).
    The subset size is capped at the smaller set; subsets are drawn from a generator seeded with `seed`."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, ref_features.shape[0], fake.shape[0])
    if size < 2:
        raise UserError(
            f"KID needs at least 2 samples and 2 reference images, got {fake.shape[0]} and {ref_features.shape[0]}"
        )
    with _quiet():
        metric = KernelInceptionDistance(
            feature=Precomputed(ref_features.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(ref_features.to(torch.float64), real=True)
    metric.update(fake.to(torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def inception_score(logits: torch.Tensor, *, splits: int, seed: int) -> tuple[float, float]:
    """(mean, std over splits) of exp(E KL(p(y|x) || p(y))) (Salimans et al. 2016) from 1008-way logits."""
    from torchmetrics.image.inception import InceptionScore

    if logits.shape[0] < splits:
        raise UserError(f"IS with metrics.is_splits={splits} needs at least {splits} samples, got {logits.shape[0]}")
    with _quiet():
        metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits.to(torch.float64))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # the std of a single split
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0


@contextlib.contextmanager
def _quiet():
    """torchmetrics warns that KID and IS keep every feature in memory: that is what they are given here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        yield
