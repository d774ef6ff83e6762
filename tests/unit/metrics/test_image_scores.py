"""FID, KID and IS (torchmetrics with precomputed features) against closed forms and independent computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from diffuse.errors import UserError
from diffuse.metrics.image_scores import (
    MomentAccumulator,
    RefStats,
    fid,
    inception_score,
    kid,
    load_stats,
    mean_cov,
    save_stats,
)


def exact_moments(n, mu, sigma, seed=0):
    """n points whose sample mean and unbiased covariance are exactly mu and sigma (whitened, then coloured)."""
    d = mu.shape[0]
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    c = z.T @ z / (n - 1)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(c)).T
    return mu + z @ torch.linalg.cholesky(sigma).T


def ref_of(features):
    mu, sigma = mean_cov(features)
    return RefStats(mu, sigma, features.float(), {"n": features.shape[0]})


def test_frechet_distance_of_known_gaussians_is_the_closed_form():
    d = 6
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.rand(d, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    ref = RefStats(mu1, torch.diag(a), torch.zeros(2, d), {"n": 500})
    fake = exact_moments(40, mu2, torch.diag(b))
    # Diagonal covariances commute: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(a) - sqrt(b))^2.
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert fid(ref, fake) == pytest.approx(expected, rel=1e-9)
    # A full covariance against c I: Tr = d c + tr S2 - 2 sqrt(c) sum sqrt(eig S2).
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    s2 = m @ m.T + 0.5 * torch.eye(d, dtype=torch.float64)
    c = 1.7
    ref = RefStats(mu1, c * torch.eye(d, dtype=torch.float64), torch.zeros(2, d), {"n": 500})
    expected = float(
        ((mu1 - mu2) ** 2).sum() + d * c + s2.trace() - 2 * math.sqrt(c) * torch.linalg.eigvalsh(s2).sqrt().sum()
    )
    assert fid(ref, exact_moments(40, mu2, s2)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero():
    f = torch.randn(300, 64, generator=torch.Generator().manual_seed(2)).exp()  # skewed, like post-ReLU features
    assert abs(fid(ref_of(f), f)) < 1e-6
    assert fid(ref_of(f), f + 0.1) == pytest.approx(64 * 0.01, rel=1e-6)  # a shift moves only the mean term


def test_torchmetrics_fid_agrees_with_scipy_sqrtm():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(200, 24, generator=g, dtype=torch.float64) @ torch.randn(
        24, 24, generator=g, dtype=torch.float64
    )
    fake = torch.randn(150, 24, generator=g, dtype=torch.float64).exp() + 0.3
    mu1, s1 = real.mean(0).numpy(), np.cov(real.numpy(), rowvar=False)
    mu2, s2 = fake.mean(0).numpy(), np.cov(fake.numpy(), rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert fid(ref_of(real), fake) == pytest.approx(expected, rel=1e-7)


def test_streamed_and_sharded_moments_equal_the_direct_ones():
    f = torch.randn(101, 16, generator=torch.Generator().manual_seed(4)) * 3 + 5
    parts = [MomentAccumulator() for _ in range(3)]
    for r, p in enumerate(parts):  # rank r's images r, r + 3, ... in batches of 7
        mine = f[r::3]
        for s in range(0, len(mine), 7):
            p.add(mine[s : s + 7])
    total = MomentAccumulator()
    for p in parts:
        total.merge(p)
    mu, sigma = total.mean_cov()
    mu_ref, sigma_ref = mean_cov(f)
    assert torch.allclose(mu, mu_ref, atol=1e-10) and torch.allclose(sigma, sigma_ref, atol=1e-9)
    assert torch.allclose(sigma_ref, torch.from_numpy(np.cov(f.double().numpy(), rowvar=False)), atol=1e-9)


def test_kid_is_the_unbiased_polynomial_mmd():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    y = torch.randn(40, 8, generator=g, dtype=torch.float64) * 1.3 + 0.2
    mean, std, size = kid(x, y, subsets=1, subset_size=40, seed=0)  # one subset = everything
    d, m = 8, 40

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    expected = float(
        (kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean()
    )
    assert size == 40 and mean == pytest.approx(expected, rel=1e-9) and std == 0
    # Subsets are drawn from a seeded generator: the same seed gives the same estimate.
    assert kid(x, y, subsets=5, subset_size=20, seed=3) == kid(x, y, subsets=5, subset_size=20, seed=3)
    assert kid(x, y, subsets=5, subset_size=1000, seed=3)[2] == 40  # capped at the sets' size


def test_inception_score_of_confident_balanced_and_of_uniform_predictions():
    k = 10
    onehot = torch.nn.functional.one_hot(torch.arange(200) % k, 1008).double() * 60.0
    mean, _ = inception_score(onehot, splits=1, seed=0)
    assert mean == pytest.approx(k, rel=1e-6)  # exp(KL(one-hot || uniform over k)) = k
    mean, _ = inception_score(torch.zeros(50, 1008, dtype=torch.float64), splits=5, seed=0)
    assert mean == pytest.approx(1.0)
    with pytest.raises(UserError, match="is_splits=10 needs at least 10"):
        inception_score(torch.zeros(4, 1008), splits=10, seed=0)


def test_stats_file_round_trip_and_refusals(tmp_path):
    f = torch.randn(30, 5, generator=torch.Generator().manual_seed(6))
    ref = ref_of(f)
    ref.meta.update({"features": "inception", "weights_sha256": "ab" * 32, "shape": [3, 8, 8]})
    save_stats(tmp_path / "s.safetensors", ref)
    back = load_stats(tmp_path / "s.safetensors")
    assert (
        torch.equal(back.mu, ref.mu) and torch.equal(back.sigma, ref.sigma) and torch.equal(back.features, ref.features)
    )
    assert back.meta == ref.meta and back.mu.dtype == torch.float64
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not diffuse reference statistics"):
        load_stats(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_stats(tmp_path / "junk.safetensors")
