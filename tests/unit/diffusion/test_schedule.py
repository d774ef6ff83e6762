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


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"max_beta": 1.0}, "schedule.max_beta=1.0 is not allowed: it must be in (0, 1)"),
        ({"max_beta": 0.0}, "schedule.max_beta=0.0 is not allowed"),
        ({"kind": "cosine", "max_beta": 1.5}, "schedule.max_beta=1.5 is not allowed"),
        ({"beta_start": -0.1}, "schedule.beta_start=-0.1 is not allowed: it must be in (0, 1)"),
        ({"beta_start": 0.0}, "schedule.beta_start=0.0 is not allowed"),
        ({"beta_end": 1.0}, "schedule.beta_end=1.0 is not allowed"),
        ({"beta_end": float("nan")}, "schedule.beta_end=nan is not allowed"),
        ({"scale_with_T": "no"}, "schedule.scale_with_T='no' is not allowed"),
        ({"kind": "cosine", "cosine_s": -0.1}, "schedule.cosine_s=-0.1 is not allowed: it must be >= 0"),
        ({"kind": "sigmoid", "sigmoid_start": 3.0, "sigmoid_end": -3.0}, "schedule.sigmoid_start=3.0 is not allowed"),
        ({"kind": "sigmoid", "sigmoid_start": 1.0, "sigmoid_end": 1.0}, "schedule.sigmoid_start=1.0 is not allowed"),
        ({"kind": "sigmoid", "sigmoid_tau": 0.0}, "schedule.sigmoid_tau=0.0 is not allowed: it must be > 0"),
        ({"kind": "sigmoid", "sigmoid_tau": -1.0}, "schedule.sigmoid_tau=-1.0 is not allowed"),
        ({"kind": "sigmoid", "sigmoid_end": float("inf")}, "schedule.sigmoid_end=inf is not allowed"),
        # valid-looking parameters whose alpha_bar stops falling in float64: a beta of exactly 0
        ({"kind": "sigmoid", "sigmoid_start": -300.0, "sigmoid_end": -200.0}, "gives beta_0=0.0"),
    ],
)
def test_schedule_parameters_out_of_range_are_refused_in_one_line(kw, needle):
    with pytest.raises(UserError) as e:
        make_schedule(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_max_beta_clips_and_is_the_largest_beta():
    """max_beta just below 1 keeps alpha_bar_T > 0, so x0 = x_T / sqrt(alpha_bar_T) stays finite."""
    for kind in ("linear", "cosine", "sigmoid"):
        for T in (2, 10, 1000):
            s = make_schedule(kind, T=T, max_beta=0.9)
            assert bool((s.betas > 0).all()) and float(s.betas.max()) <= 0.9 and float(s.alpha_bar[-1]) > 0
            assert bool((s.alpha_bar < 1).all())
    # linear at T=2 scaled by 1000/T: 0.02 * 500 = 10, clipped
    assert make_schedule("linear", T=2, max_beta=0.9).betas.tolist() == [1e-4 * 500, 0.9]


def test_linear_scale_with_T_is_explicit():
    """scale_with_T: betas linspace(beta_start, beta_end, T) times 1000/T (Nichol & Dhariwal), or exactly the
    linspace; the same schedule at T = 1000."""
    for T in (10, 250, 1000, 4000):
        ref = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
        exact = make_schedule("linear", T=T, scale_with_T=False).betas
        scaled = make_schedule("linear", T=T).betas
        assert torch.allclose(exact, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
        # at T = 10 the scaled end (0.02 * 100) passes 1: clipped at max_beta
        assert torch.allclose(
            scaled, (torch.tensor(ref, dtype=torch.float64) * 1000 / T).clamp(max=0.999), rtol=1e-12, atol=0
        )
    assert torch.equal(make_schedule("linear", T=1000).betas, make_schedule("linear", T=1000, scale_with_T=False).betas)


@pytest.mark.parametrize("start,end,tau", [(-3.0, 3.0, 1.0), (0.0, 3.0, 0.7), (-3.0, 3.0, 1.1), (-1.5, 4.0, 0.3)])
def test_sigmoid_schedule_matches_its_definition(start, end, tau):
    """Jabri et al. 2022 (Chen 2023): alpha_bar(t) = (sig(end/tau) - sig((t/T (end - start) + start)/tau))
    / (sig(end/tau) - sig(start/tau)), here at index t the paper's t+1; clipping at max_beta only at the end."""
    T = 1000
    s = make_schedule("sigmoid", T=T, sigmoid_start=start, sigmoid_end=end, sigmoid_tau=tau)

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def ab(t):
        return (sig(end / tau) - sig((t / T * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))

    assert ab(0) == 1
    for t in [0, 1, 10, 100, 500, 900, 990]:
        assert s.alpha_bar[t].item() == pytest.approx(ab(t + 1), rel=1e-9)
    # the last step would reach alpha_bar = 0 (beta = 1): clipped
    assert s.betas[-1].item() == 0.999 and s.alpha_bar[-1].item() == pytest.approx(ab(T - 1) * 0.001, rel=1e-9)


def test_integer_t_minus_one_is_clean_data():
    """t = -1 is the samplers' clean data (what a hook gets as t_next for x_0): alpha_bar = 1 whether t is an
    integer or a float tensor, and not alpha_bar_{T-1}, the value a plain table index would wrap round to."""
    from diffuse.diffusion.samplers.common import batch_time
    from diffuse.diffusion.schedule import coefficients

    for kind in ("linear", "cosine"):
        s = make_schedule(kind)
        for t in (
            torch.tensor([-1]),
            torch.tensor([-1], dtype=torch.int32),
            torch.tensor([-1.0]),
            torch.tensor([-1.0], dtype=torch.float64),
        ):
            assert s.alpha_bar_at(t).tolist() == [1.0], t
        mixed = s.alpha_bar_at(torch.tensor([-1, 0, 500, 999, -1]))
        assert mixed.tolist() == [1.0, s.alpha_bar[0].item(), s.alpha_bar[500].item(), s.alpha_bar[999].item(), 1.0]
        x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        a, sg = coefficients(s, torch.tensor([-1, -1, -1]), x0)
        assert a.flatten().tolist() == [1.0] * 3 and sg.flatten().tolist() == [0.0] * 3
        assert torch.equal(q_sample(s, x0, torch.full((3,), -1), noise), x0)
        assert torch.equal(q_sample(s, x0, batch_time(-1, x0), noise), x0)  # as the replace hook calls it
        assert torch.equal(q_sample(s, x0.float(), batch_time(-1, x0), noise.float()), x0.float())


def test_posterior_refuses_t_below_zero():
    s = make_schedule("linear")
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="t >= 0"):
        posterior(s, x, x, torch.tensor([5, -1]))
    mean, var = posterior(s, x + 1, x, torch.tensor([0, 0]))  # t = 0 is defined: x_{-1} is x_0 itself
    assert torch.allclose(mean, x + 1) and var.abs().max() == 0
