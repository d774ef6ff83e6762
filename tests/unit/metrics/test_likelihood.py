"""Likelihood against closed forms: the exact mixture nll (ODE), Gaussian KL terms (bound), the 8-bit constants."""

import math

import pytest
import torch
from scipy.stats import norm

from diffuse.data.gmm import GaussianMixture, default_mixture
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.schedule import make_schedule
from diffuse.errors import UserError
from diffuse.metrics.likelihood.ode import ode_bpd, ode_nll
from diffuse.metrics.likelihood.units import (
    LN2,
    bpd_from_dequantized_nll,
    dequantize,
    discretized_gaussian_log_likelihood,
    grid_index,
)
from diffuse.metrics.likelihood.vlb import decoder_nll, kl_terms, vlb_bpd, vlb_nll, vlb_terms
from diffuse.metrics.mixture import mixture_interval_nll, mixture_nll


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian(mean_seed=0, shape=(1, 2, 2), s=0.3):
    """A one-component mixture: data exactly N(m, s^2 I)."""
    m = 0.5 * torch.rand((1, *shape), generator=gen(mean_seed), dtype=torch.float64) - 0.25
    return GaussianMixture(m, torch.tensor([s], dtype=torch.float64), torch.ones(1, dtype=torch.float64))


def gaussian_x0_hat(mix, x_t, ab):
    """E[x_0 | x_t] for x_0 ~ N(m, s^2 I), by Gaussian conditioning (written apart from oracle.py)."""
    m, s2 = mix.means[0], float(mix.stds[0]) ** 2
    a = math.sqrt(ab)
    return m + a * s2 / (a * a * s2 + 1 - ab) * (x_t - a * m)


def kl_closed(m1, v1, m2, v2):
    """KL of isotropic Gaussians in d dims from the log-det/trace form (summed over the last dims)."""
    d = m1[0].numel()
    sq = ((m1 - m2) ** 2).flatten(1).sum(1)
    return 0.5 * (d * math.log(v2 / v1) + d * v1 / v2 + sq / v2 - d)


# --------------------------------------------------------------------------------------------- the bound, closed form


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_kl_terms_match_gaussian_closed_form(variance):
    mix = gaussian()
    sched = make_schedule("linear", T=200)
    den = GMMDenoiser(mix, sched)
    betas = sched.betas
    ab = torch.cumprod(1 - betas, 0)  # recomputed here, not read from the schedule
    x0 = mix.sample(8, gen(1))[0]
    for t in (1, 2, 17, 100, 199):
        noise = torch.randn(x0.shape, generator=gen(t), dtype=torch.float64)
        a_t, ab_t, ab_p, beta = math.sqrt(ab[t]), float(ab[t]), float(ab[t - 1]), float(betas[t])
        x_t = a_t * x0 + math.sqrt(1 - ab_t) * noise
        tt = torch.full((8,), t)
        got = kl_terms(x0, x_t, den(x_t, tt), tt, sched, variance)
        # q(x_{t-1} | x_t, x_0) as the product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0), normalised.
        prec = 1 / (1 - ab_p) + (1 - beta) / beta
        var_q = 1 / prec
        mq = var_q * (math.sqrt(ab_p) * x0 / (1 - ab_p) + math.sqrt(1 - beta) * x_t / beta)
        x0_hat = gaussian_x0_hat(mix, x_t, ab_t)
        mp = var_q * (math.sqrt(ab_p) * x0_hat / (1 - ab_p) + math.sqrt(1 - beta) * x_t / beta)
        var_p = var_q if variance == "beta_tilde" else beta
        assert torch.allclose(got, kl_closed(mq, var_q, mp, var_p), rtol=1e-7, atol=1e-10), t


def test_decoder_terms_match_closed_form():
    mix = gaussian(s=0.2)
    sched = make_schedule("linear")
    den = GMMDenoiser(mix, sched)
    ab0, var = float(sched.alpha_bar[0]), float(sched.posterior_variance[1])
    x0 = mix.sample(6, gen(2))[0]
    x1 = math.sqrt(ab0) * x0 + math.sqrt(1 - ab0) * torch.randn(x0.shape, generator=gen(3), dtype=torch.float64)
    t0 = torch.zeros(6, dtype=torch.long)
    mean = gaussian_x0_hat(mix, x1, ab0)
    want = -torch.tensor(norm.logpdf(x0.numpy(), mean.numpy(), math.sqrt(var))).flatten(1).sum(1)
    assert torch.allclose(decoder_nll(x0, x1, den(x1, t0), sched, discretized=False), want, rtol=1e-9)
    xq = ((x0 + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    lo, hi = (xq - 1 / 255 - mean) / math.sqrt(var), (xq + 1 / 255 - mean) / math.sqrt(var)
    want_d = -torch.log(torch.tensor(norm.cdf(hi.numpy()) - norm.cdf(lo.numpy()))).flatten(1).sum(1)
    assert torch.allclose(decoder_nll(xq, x1, den(x1, t0), sched, discretized=True), want_d, rtol=1e-7)


def test_vlb_matches_its_expectation_for_gaussian_data():
    """Each term of the bound, and their sum, against E over x_t ~ q(x_t|x_0) in closed form: with x_0 ~ N(m, s^2 I)
    the denoiser is linear in x_t, so x_0 - x0_hat = (1 - g a)(x_0 - m) - g s_t z with g = a s^2 / (a^2 s^2 + s_t^2)."""
    mix = gaussian(s=0.3)
    T, n = 100, 400
    sched = make_schedule("linear", T=T)
    x0 = mix.sample(n, gen(4))[0]
    calls = []
    terms = vlb_terms(
        GMMDenoiser(mix, sched),
        x0,
        sched,
        generator=gen(5),
        batch_t=7,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (T, T) and len(calls) == math.ceil(T / 7)

    d, s2 = x0[0].numel(), float(mix.stds[0]) ** 2
    dev2 = ((x0 - mix.means[0]) ** 2).flatten(1).sum(1)
    ab = sched.alpha_bar.tolist()
    expect = torch.empty(n, T + 1, dtype=torch.float64)
    for t in range(T):
        a2, st2 = ab[t], 1 - ab[t]
        g = math.sqrt(a2) * s2 / (a2 * s2 + st2)
        err2 = (1 - g * math.sqrt(a2)) ** 2 * dev2 + g * g * st2 * d  # E |x_0 - x0_hat|^2
        if t == 0:
            var = float(sched.posterior_variance[1])
            expect[:, 0] = 0.5 * d * math.log(2 * math.pi * var) + err2 / (2 * var)
            continue
        beta, ab_p = 1 - ab[t] / ab[t - 1], ab[t - 1]
        c0 = math.sqrt(ab_p) * beta / (1 - ab[t])  # weight of x_0 in the posterior mean
        expect[:, t] = c0 * c0 * err2 / (2 * float(sched.posterior_variance[t]))
    abT = ab[-1]
    expect[:, T] = 0.5 * (abT * (x0**2).flatten(1).sum(1) - d * abT - d * math.log(1 - abT))
    assert torch.allclose(terms[:, T], expect[:, T], rtol=1e-10)
    diff = terms - expect
    z = diff.mean(0) / (diff.std(0) / math.sqrt(n))
    assert z[:T].abs().max() < 5, z.abs().argmax()
    total = diff.sum(1)
    assert abs(total.mean()) < 4 * total.std() / math.sqrt(n)
    v = vlb_nll(GMMDenoiser(mix, sched), x0, sched, generator=gen(5), batch_t=7)
    assert torch.allclose(v, terms.sum(1) / d)  # same draws: batch_t and the generator fix them


# ------------------------------------------------------------------------------------------------------ 8-bit data


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.3, 1e-4), (-1.0, 0.5), (0.999, 3e-3), (5.0, 0.1), (-0.2, 20.0)])
def test_discretized_decoder_sums_to_one(mean, std):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), std)
    assert torch.isfinite(logp).all()  # even bins 60 stds away: log_ndtr, not log(cdf)
    assert abs(float(torch.logsumexp(logp, 0).exp()) - 1) < 1e-12


def test_discretized_decoder_is_accurate_in_the_tails():
    """Far from the mean both CDF values are ~1 (or ~0): the mirrored difference keeps the log accurate."""
    x = torch.tensor([2 * 191 / 255 - 1], dtype=torch.float64)  # ~0.498, 10 stds above the mean
    lo, hi = (float(x) - 1 / 255) / 0.05, (float(x) + 1 / 255) / 0.05
    want = math.log(norm.sf(lo) - norm.sf(hi))  # ~ e^-50: 1 - cdf would cancel to 0
    got = float(discretized_gaussian_log_likelihood(x, torch.zeros(1, dtype=torch.float64), 0.05)[0])
    assert abs(got - want) < 1e-9 * abs(want)


def test_dequantization_bins_and_offsets():
    k = torch.arange(256)
    assert torch.equal(grid_index(k.to(torch.float32) / 127.5 - 1), k)  # float32 data as from_uint8 makes it
    x = (k.to(torch.float64) / 127.5 - 1).repeat(50)  # float64: a float32 z may round onto its bin's top edge
    z = dequantize(x.view(-1, 1), gen(0)).view(-1)
    lo, hi = k.repeat(50).double() / 128 - 1, (k.repeat(50).double() + 1) / 128 - 1
    assert ((z >= lo) & (z < hi)).all()  # each value in its own bin: the bins tile [-1, 1), width 2/256
    # The uniform density on [-1, 1]^D (2^-D, ln 2 nats/dim) gives every 8-bit value 256^-D: 8 bits/dim exactly.
    assert bpd_from_dequantized_nll(torch.tensor([math.log(2)], dtype=torch.float64)).item() == 8.0
    with pytest.raises(UserError, match="grid 2k/255 - 1"):
        grid_index(torch.tensor([0.5001]))
    with pytest.raises(UserError, match="grid"):
        grid_index(torch.tensor([1.0 + 2 / 255]))


# ---------------------------------------------------------------------------------------------------- the ODE


def test_ode_solves_linear_denoiser_in_closed_form():
    """eps(x_t, t) = A x_t: in x~ = x_t sqrt(1 + sigma^2) the flow is dx~/dsigma = A x~ / sqrt(1 + sigma^2), so
    x~(sigma_max) = expm(c A) x with c = asinh(sigma_max) - asinh(sigma_min), and log p gains c tr(A).
    A is not symmetric, so the trace estimator's direction and sign are both checked."""
    sched = make_schedule("linear")
    d, n = 6, 1000
    A = 0.05 * torch.randn(d, d, generator=gen(0), dtype=torch.float64)
    den = lambda x, t, y: (x.flatten(1) @ A.T).reshape(x.shape)  # noqa: E731
    x = torch.randn(n, 1, 2, 3, generator=gen(1), dtype=torch.float64)
    s_max, s_min = float(sched.sigmas[-1]), 1e-3
    c = math.asinh(s_max) - math.asinh(s_min)
    x_T = x.flatten(1) @ torch.linalg.matrix_exp(c * A).T / math.sqrt(1 + s_max**2)
    logp = -0.5 * (x_T**2).sum(1) - 0.5 * d * math.log(2 * math.pi * (1 + s_max**2)) + c * torch.trace(A)
    exact = -logp / d
    assert torch.allclose(ode_nll(den, x[:20], sched, hutchinson=0, steps=16, sigma_min=s_min), exact[:20], atol=1e-7)
    for probe in ("rademacher", "gaussian"):
        diff = ode_nll(den, x, sched, hutchinson=1, probe=probe, steps=8, generator=gen(2)) - exact
        assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(n), probe  # unbiased


def test_ode_start_below_the_first_step_makes_narrow_data_exact():
    """Data N(m, 0.01^2 I): its structure is at the schedule's first noise level sigma_0 = 0.01. Starting the path
    at sigma_min = 1e-3 in the schedule's extension gets the exact nll (RK4 32 steps: 2e-3 nats/dim here), while
    starting at sigma_0 measures the data smoothed by sigma_0: ~0.1 nats/dim too high, (log 2 - 1/2) / 2 expected."""
    mix = gaussian(mean_seed=3, s=0.01)
    sched = make_schedule("linear")
    den = GMMDenoiser(mix, sched)
    x = mix.sample(100, gen(6))[0]
    exact = mixture_nll(mix, x)
    assert abs(float((ode_nll(den, x, sched, hutchinson=0, steps=32) - exact).mean())) < 4e-3
    smoothed = ode_nll(den, x, sched, hutchinson=0, steps=32, sigma_min=float(sched.sigmas[0])) - exact
    assert float(smoothed.mean()) > 0.04


@pytest.fixture(scope="module")
def mixture_problem():
    """The default pattern mixture at 1x4x4 (stds 0.05-0.2), its oracle, 200 samples and their exact nll."""
    mix = default_mixture(channels=1, resolution=4)
    sched = make_schedule("linear")
    x = mix.sample(200, gen(0))[0]
    return mix, sched, GMMDenoiser(mix, sched), x, mixture_nll(mix, x)


def test_ode_nll_matches_exact_mixture_nll_and_vlb_is_above(mixture_problem):
    """Tolerance: RK4 with 32 log-sigma steps is within 2e-3 nats/dim of the exact nll here (1e-4 at 64 steps;
    bench/likelihood_table.py), plus 4 standard errors of the mean for the Hutchinson estimate."""
    mix, sched, den, x, exact = mixture_problem
    n = x.shape[0]
    exact_trace = ode_nll(den, x[:64], sched, hutchinson=0, steps=32)  # 16 jvps per step: a subset
    assert abs(float((exact_trace - exact[:64]).mean())) < 2e-3
    assert float((exact_trace - exact[:64]).abs().max()) < 0.05
    hutch = ode_nll(den, x, sched, hutchinson=1, steps=32, generator=gen(1))
    diff = hutch - exact
    assert abs(float(diff.mean())) < 2e-3 + 4 * float(diff.std()) / math.sqrt(n)
    # The bound: E over data of the bound >= cross-entropy of the reverse chain >= the data's entropy.
    for variance in ("beta_tilde", "beta"):
        vlb = vlb_nll(den, x, sched, generator=gen(2), variance=variance, batch_t=100)
        gap = vlb - exact
        assert float(gap.mean()) > 4 * float(gap.std()) / math.sqrt(n), variance
        assert float(vlb[:64].mean()) > float(exact_trace.mean())


def test_bpd_against_exact_discrete_mixture(mixture_problem):
    """8-bit data: the mixture quantized to the grid. The ODE with dequantization bounds -log2 P(k) over the
    dequantization bins [k, k+1)/128 - 1 (Jensen's gap here ~1e-3 bits: the bins are 1/6 of the narrowest std);
    the variational bound is above the exact discrete entropy over the decoder's centred bins."""
    mix, sched, den, x, _ = mixture_problem
    x = x[:64]  # the exact trace costs 16 jvps per step
    n = x.shape[0]
    k = ((x + 1) * 127.5).round().clamp(0, 255).long()
    xq = k / 127.5 - 1
    kd = k.double()
    exact_deq = mixture_interval_nll(mix, kd / 128 - 1, (kd + 1) / 128 - 1) / LN2
    ode = ode_bpd(den, xq, sched, hutchinson=0, steps=32, generator=gen(3))
    diff = ode - exact_deq
    # -3e-3 bits: the solver's 2e-3 nats; above by the Jensen gap and the dequantization noise's standard error.
    assert -3e-3 < float(diff.mean()) < 5e-3 + 4 * float(diff.std()) / math.sqrt(n)
    lo = torch.where(k == 0, -math.inf, xq - 1 / 255)
    hi = torch.where(k == 255, math.inf, xq + 1 / 255)
    exact_cent = mixture_interval_nll(mix, lo, hi) / LN2
    gap = vlb_bpd(den, xq, sched, generator=gen(4), batch_t=100) - exact_cent
    assert float(gap.mean()) > 4 * float(gap.std()) / math.sqrt(n)


def test_ode_through_a_network_denoiser():
    """NetworkDenoiser runs its net under no_grad: forward-mode AD must still see through it. Hutchinson over 64
    copies of one image (64 independent estimates) against the exact trace (D = 64 jvps) of the same path."""
    from diffuse.diffusion.prediction import NetworkDenoiser
    from diffuse.nets.unet import UNet

    torch.manual_seed(0)
    net = UNet(
        resolution=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=8
    ).eval()
    sched = make_schedule("linear")
    den = NetworkDenoiser(net, "v", sched)
    x = (torch.rand((1, 1, 8, 8), generator=gen(0)) * 2 - 1).repeat(64, 1, 1, 1)
    exact = ode_nll(den, x[:1], sched, hutchinson=0, steps=1)
    est = ode_nll(den, x, sched, hutchinson=4, probe="gaussian", steps=1, generator=gen(1))
    assert torch.isfinite(est).all()
    assert abs(float(est.mean() - exact[0])) < 4 * float(est.std()) / 8


def test_bad_arguments_are_refused():
    mix = gaussian()
    sched = make_schedule("linear", T=10)
    den = GMMDenoiser(mix, sched)
    x = mix.sample(2, gen(0))[0]
    with pytest.raises(UserError, match="variance='beta_hat'"):
        vlb_nll(den, x, sched, variance="beta_hat")
    with pytest.raises(UserError, match="batch_t=0"):
        vlb_nll(den, x, sched, batch_t=0)
    with pytest.raises(UserError, match="hutchinson=-1"):
        ode_nll(den, x, sched, hutchinson=-1)
    with pytest.raises(UserError, match="probe='normal'"):
        ode_nll(den, x, sched, probe="normal")
    with pytest.raises(UserError, match="sigma_min=0"):
        ode_nll(den, x, sched, sigma_min=0)
    with pytest.raises(UserError, match="grid"):
        vlb_bpd(den, x, sched)


def test_bound_terms_refuse_t_below_zero():
    """t = -1 is clean data: no KL term or reverse variance lives there, and a table index would silently
    wrap round to t = T-1."""
    from diffuse.metrics.likelihood.vlb import reverse_variance

    sched = make_schedule("linear", T=10)
    assert reverse_variance(sched, torch.tensor([9, 0]), "beta").tolist() == [
        float(sched.betas[9]),
        float(sched.posterior_variance[1]),
    ]
    for variance in ("beta", "beta_tilde"):
        with pytest.raises(ValueError, match="t >= 0, got -1"):
            reverse_variance(sched, torch.tensor([3, -1]), variance)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="t >= 0, got -1"):
        kl_terms(x, x, x, torch.tensor([-1, 2]), sched)
