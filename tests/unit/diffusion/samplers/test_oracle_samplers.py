"""Samplers against the exact denoiser of a Gaussian mixture (model=oracle): the ground truth."""

import math

import pytest
import torch

from diffuse.data.gmm import GaussianMixture
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import ddim, ddpm
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import make_timesteps
from diffuse.metrics.mixture import format_fit, mixture_fit
from tests.conftest import gaussian_x_T as _x_T

N = 3000


def test_oracle_matches_numerical_integration():
    """E[eps | x_t] by quadrature over x_0 for a 1-D mixture, against the closed form."""
    means = torch.tensor([-0.6, 0.1, 0.7], dtype=torch.float64).view(3, 1, 1, 1)
    mix = GaussianMixture(
        means, torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    )
    s = make_schedule("cosine")
    den = GMMDenoiser(mix, s)
    grid = torch.linspace(-2, 2, 200001, dtype=torch.float64)
    p0 = mix.log_prob(grid.view(-1, 1, 1, 1)).exp()
    for t in [5, 100, 400, 900]:
        ab = s.alpha_bar[t].item()
        a, sg = math.sqrt(ab), math.sqrt(1 - ab)
        for xt in [-0.8, 0.0, 0.35, 1.1]:
            lik = torch.exp(-0.5 * (xt - a * grid) ** 2 / sg**2)
            w = p0 * lik
            eps_true = float((w * (xt - a * grid) / sg).sum() / w.sum())
            eps = den(torch.tensor([[[[xt]]]], dtype=torch.float64), torch.tensor([t]))
            assert eps.item() == pytest.approx(eps_true, abs=1e-6)


def test_oracle_class_conditional_is_one_component(oracle_setup):
    mixture, schedule, den = oracle_setup
    x = _x_T(4, mixture.shape)
    t = torch.full((4,), 300)
    y = torch.tensor([2, 2, 2, 2])
    ab = schedule.alpha_bar[300].item()
    a, s2 = math.sqrt(ab), 1 - ab
    v = a**2 * mixture.stds[2].item() ** 2 + s2
    expected = math.sqrt(s2) * (x - a * mixture.means[2]) / v
    assert torch.allclose(den(x, t, y), expected, atol=1e-10)
    # the null label (K) is the unconditional mixture
    assert torch.allclose(den(x, t, torch.full((4,), mixture.K)), den(x, t, None))


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_1000_steps_reproduces_the_mixture(oracle_setup, variance):
    mixture, schedule, den = oracle_setup
    g = torch.Generator().manual_seed(1)
    x = ddpm(den, _x_T(N, mixture.shape), make_timesteps(1000, 1000), schedule, variance=variance, generator=g)
    rows = mixture_fit(mixture, x)
    print(f"\nDDPM 1000 steps, variance={variance}, n={N}\n" + format_fit(rows))
    for r in rows:
        assert abs(r["freq_z"]) < 3, r
        assert r["mean_err"] < 0.1, r
        assert abs(r["std_ratio"] - 1) < 0.10, r


def test_ddim_50_steps_frequencies_and_means(oracle_setup):
    mixture, schedule, den = oracle_setup
    x = ddim(den, _x_T(N, mixture.shape), make_timesteps(1000, 50), schedule, eta=0.0)
    rows = mixture_fit(mixture, x)
    print(f"\nDDIM 50 steps eta=0, n={N}\n" + format_fit(rows))
    for r in rows:
        assert abs(r["freq_z"]) < 3, r
        assert r["mean_err"] < 0.1, r
        # Deterministic few-step sampling shrinks the narrow components' spread; it must not inflate it,
        # nor collapse it (a wrong update rule does one or the other).
        assert 0.3 < r["std_ratio"] < 1.05, r
    ratios = [r["std_ratio"] for r in rows]
    assert ratios == sorted(ratios), "the narrowest component should lose the most spread"


def test_ddim_eta0_is_deterministic_given_x_T(oracle_setup):
    mixture, schedule, den = oracle_setup
    x_T = _x_T(16, mixture.shape)
    ts = make_timesteps(1000, 20)
    a = ddim(den, x_T, ts, schedule, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim(den, x_T, ts, schedule, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_ddim_eta1_is_ddpm_with_posterior_variance(oracle_setup):
    """With the same noise draws, DDIM at eta=1 and ancestral DDPM with beta-tilde are the same update."""
    mixture, schedule, den = oracle_setup
    x_T = _x_T(8, mixture.shape)
    ts = make_timesteps(1000, 25)
    a = ddim(den, x_T, ts, schedule, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = ddpm(den, x_T, ts, schedule, variance="beta_tilde", generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_respaced_steps_mean_and_variance_exactly(variance):
    """Five respaced steps t -> s with a denoiser returning a fixed eps: each step's mean is Ho et al. eq. 11,
    (x - beta / sqrt(1 - alpha_bar_t) eps) / sqrt(1 - beta), with beta = 1 - alpha_bar_t / alpha_bar_s, and
    its noise is sqrt(var) z for the generator's own draws z, var = beta or beta-tilde = beta (1 - alpha_bar_s)
    / (1 - alpha_bar_t): (x_s - mean) / z recovers sqrt(var) to rounding, which tells the two apart (they differ
    by the factor (1 - alpha_bar_s) / (1 - alpha_bar_t), 0.085 on the step 120 -> 30). No noise on the last."""
    s = make_schedule("linear")
    ts = [999, 700, 400, 120, 30]
    shape = (64, 1, 2, 2)
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    seen = []

    def hook(x, t_next):
        seen.append((t_next, x.clone()))
        return x

    out = ddpm(
        lambda x, t, y: eps,
        x_T,
        torch.tensor(ts),
        s,
        variance=variance,
        generator=torch.Generator().manual_seed(5),
        hook=hook,
    )
    assert [t for t, _ in seen] == ts[1:] + [-1] and torch.equal(out, seen[-1][1])
    # the sampler draws N(0, I) in float32 from the generator it is given, once per step but the last
    draws = torch.Generator().manual_seed(5)
    x = x_T
    for (t, x_next), t_prev in zip(seen, ts):
        ab_t = s.alpha_bar[t_prev].item()
        ab_s = 1.0 if t < 0 else s.alpha_bar[t].item()
        beta = 1 - ab_t / ab_s
        mean = (x - beta / (1 - ab_t) ** 0.5 * eps) / (1 - beta) ** 0.5
        if t < 0:
            assert torch.allclose(x_next, mean, rtol=0, atol=1e-12)
            break
        z = torch.randn(shape, generator=draws, dtype=torch.float32).to(torch.float64)
        var = beta if variance == "beta" else beta * (1 - ab_s) / (1 - ab_t)
        other = beta * (1 - ab_s) / (1 - ab_t) if variance == "beta" else beta
        ratio = (x_next - mean) / z
        assert torch.allclose(ratio, torch.full_like(ratio, var**0.5), rtol=1e-9, atol=0), (t_prev, t)
        # the other variance would fail the line above: its std is off by 0.3% on the first step, 3.4x on 120 -> 30
        assert abs(var**0.5 - other**0.5) > 1e-3 * var**0.5
        x = x_next
