import math

import pytest
import torch

from diffuse.diffusion.schedule import make_schedule, posterior, q_sample
from diffuse.diffusion.timesteps import make_timesteps
from diffuse.errors import UserError


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_alpha_bar_is_decreasing_in_unit_interval(kind):
    s = make_schedule(kind)
    ab = s.alpha_bar
    assert s.betas.dtype == torch.float64
    assert (ab > 0).all() and (ab <= 1).all()
    assert (ab[1:] < ab[:-1]).all()


def test_linear_schedule_endpoints():
    s = make_schedule("linear", T=1000)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    # Ho et al.: alpha_bar_T is about 4e-5 for this schedule
    assert s.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_cosine_schedule_matches_its_definition():
    T, sft = 1000, 0.008
    s = make_schedule("cosine", T=T, cosine_s=sft)

    def f(t):
        return math.cos((t / T + sft) / (1 + sft) * math.pi / 2) ** 2

    # Index t here is the paper's t+1; beta clipping at 0.999 only bites at the very end.
    for t in [0, 1, 10, 100, 500, 900, 980]:
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert s.betas.max().item() <= 0.999


def test_q_sample_closed_form_mean_and_variance():
    s = make_schedule("linear")
    x0 = torch.linspace(-1, 1, 7, dtype=torch.float64).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    for t in [0, 250, 999]:
        tt = torch.full((x0.shape[0],), t)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = q_sample(s, x0, tt, noise)
        ab = s.alpha_bar[t].item()
        # exact: the deterministic part and the coefficient on the noise
        assert torch.allclose(q_sample(s, x0, tt, torch.zeros_like(x0)), math.sqrt(ab) * x0)
        assert torch.allclose(xt - math.sqrt(ab) * x0, math.sqrt(1 - ab) * noise)
        # and the sampled moments, within 5 standard errors
        n = x0.shape[0]
        se_mean = math.sqrt((1 - ab) / n)
        assert (xt.mean(0) - math.sqrt(ab) * x0[0]).abs().max() < 5 * se_mean
        se_var = (1 - ab) * math.sqrt(2 / n)
        assert (xt.var(0) - (1 - ab)).abs().max() < 5 * se_var


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_matches_bayes_product(kind):
    """Ho et al. eq. 6-7 against an independent derivation: q(x_{t-1}|x_0) q(x_t|x_{t-1}) as a product of Gaussians."""
    s = make_schedule(kind)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, dtype=torch.float64, generator=g)
    xt = torch.randn(5, 3, dtype=torch.float64, generator=g)
    for t in [1, 2, 50, 400, 999]:
        tt = torch.full((5,), t)
        mean, var = posterior(s, x0, xt, tt)
        ab_prev = s.alpha_bar[t - 1].item()
        beta = s.betas[t].item()
        alpha = 1 - beta
        prec = 1 / (1 - ab_prev) + alpha / beta
        exp_var = 1 / prec
        exp_mean = exp_var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(alpha) * xt / beta)
        assert torch.allclose(var[:, 0], torch.full((5,), exp_var, dtype=torch.float64), rtol=1e-10)
        assert torch.allclose(mean, exp_mean, rtol=1e-9, atol=1e-12)


def test_fractional_timesteps_interpolate_and_invert():
    s = make_schedule("cosine")
    t_int = torch.arange(0, 1000, 37)
    assert torch.allclose(s.alpha_bar_at(t_int.double()), s.alpha_bar[t_int], rtol=1e-12)
    t = torch.tensor([0.25, 10.5, 333.3, 998.9], dtype=torch.float64)
    ab = s.alpha_bar_at(t)
    lo, hi = s.alpha_bar[t.floor().long()], s.alpha_bar[t.ceil().long()]
    assert ((ab <= lo) & (ab >= hi)).all()
    sigma = ((1 - ab) / ab).sqrt()
    assert torch.allclose(s.t_from_sigma(sigma), t, atol=1e-8)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 50, 999, 1000])
def test_timesteps_are_distinct_decreasing_in_range(spacing, steps):
    ts = make_timesteps(1000, steps, spacing)
    assert ts.numel() == steps
    assert (ts[1:] < ts[:-1]).all()
    assert ts.min() >= 0 and ts.max() <= 999


def test_timestep_spacings_known_values():
    assert make_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert make_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert make_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_timesteps_out_of_range_refused(steps):
    with pytest.raises(UserError, match="steps"):
        make_timesteps(1000, steps)


def test_extension_below_the_first_step_reaches_clean_data():
    """t in [-1, 0): 1 - alpha_bar = (1 + t)(1 - alpha_bar_0), continuous at 0, clean data at -1, inverted by
    t_from_sigma; t below -1 is held there."""
    for s in (make_schedule("linear"), make_schedule("cosine")):
        t = torch.tensor([-1.0, -0.75, -0.5, -1e-9, 0.0], dtype=torch.float64)
        ab = s.alpha_bar_at(t)
        ab0 = float(s.alpha_bar[0])
        assert torch.allclose(1 - ab, (1 + t) * (1 - ab0), rtol=1e-9, atol=0)
        assert ab[0] == 1 and abs(float(ab[-2]) - ab0) < 1e-12 and (ab[1:] < ab[:-1]).all()
        sigma = ((1 - ab[1:]) / ab[1:]).sqrt()
        assert torch.allclose(s.t_from_sigma(sigma), t[1:], atol=1e-8)
        assert float(s.alpha_bar_at(torch.tensor([-3.0], dtype=torch.float64))[0]) == 1.0
