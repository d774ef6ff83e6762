"""Property-based checks of the schedule and prediction math over random parameters (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffuse.diffusion import prediction as P
from diffuse.diffusion.schedule import coefficients, make_schedule, q_sample


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["linear", "cosine", "sigmoid"]),
    T=st.integers(min_value=2, max_value=2000),
    beta_start=st.floats(min_value=1e-5, max_value=1e-3),
    beta_end=st.floats(min_value=2e-3, max_value=0.02),
)
def test_alpha_bar_strictly_decreasing_in_unit_interval(kind, T, beta_start, beta_end):
    s = make_schedule(kind, T=T, beta_start=beta_start, beta_end=beta_end)
    ab = s.alpha_bar
    assert ab.shape == (T,)
    assert bool(((ab > 0) & (ab <= 1)).all())
    assert bool((ab[1:] < ab[:-1]).all())
    assert bool((s.posterior_variance >= 0).all() and (s.posterior_variance <= s.betas + 1e-15).all())


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["linear", "cosine", "sigmoid"]),
    t=st.floats(min_value=0.0, max_value=999.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_conversions_invert_each_other_at_any_timestep(kind, t, seed):
    s = make_schedule(kind)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 6, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 6, generator=g, dtype=torch.float64)
    tt = torch.full((4,), t, dtype=torch.float64)
    xt = q_sample(s, x0, tt, eps)
    a, sg = coefficients(s, tt, xt)
    assert torch.allclose(a**2 + sg**2, torch.ones_like(a))
    for kind_ in P.PREDICTIONS:
        back = P.to_eps(kind_, P.target(kind_, x0, eps, a, sg), xt, a, sg)
        assert torch.allclose(back, eps, atol=1e-6, rtol=1e-6)
    assert torch.allclose(P.eps_to_x0(eps, xt, a, sg), x0, atol=1e-9)


def _smooth_mixture(std: float):
    from diffuse.data.gmm import GaussianMixture, default_mixture

    d = default_mixture()
    return GaussianMixture(d.means, torch.full_like(d.stds, std), d.weights)


@settings(max_examples=10, deadline=None)
@given(
    kind=st.sampled_from(["linear", "cosine"]),
    spacing=st.sampled_from(["trailing", "linspace", "leading"]),
    std=st.floats(min_value=0.3, max_value=0.6),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_ddim_eta0_is_inverted_by_its_ode_reverse(kind, spacing, std, seed):
    """x_T -> ddim -> x_0 -> ddim_invert -> x_T again, for the exact denoiser of a smooth mixture: to 2e-2
    with 4 fixed-point iterations at 50 steps, and the classic one-pass inversion converging at first order
    (doubling the steps at least ~halves the error)."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: an OpenMP team only adds overhead (50x on a busy machine)
    try:
        _check_inversion(kind, spacing, std, seed)
    finally:
        torch.set_num_threads(threads)


def _check_inversion(kind, spacing, std, seed):
    from diffuse.diffusion.oracle import GMMDenoiser
    from diffuse.diffusion.samplers.ddim import ddim, ddim_invert
    from diffuse.diffusion.timesteps import make_timesteps

    s = make_schedule(kind)
    mixture = _smooth_mixture(std)
    den = GMMDenoiser(mixture, s)
    x_T = torch.randn((4, *mixture.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ts = make_timesteps(s.T, 50, spacing)
    x_0 = ddim(den, x_T, ts, s, eta=0.0)
    back = ddim_invert(den, x_0, ts, s, fixed_point_iters=4)
    assert (back - x_T).abs().max() < 2e-2
    # Forward again, x_T's small error is amplified by the first step's conditioning, sqrt(alpha_bar(t_2) /
    # alpha_bar(T)): about 1 for the linear schedule, 630 for the cosine one (alpha_bar(999) = 2.4e-9), where
    # more fixed-point iterations no longer help (0.027 at 4, 0.022 at 16, the worst case hypothesis found).
    tol = 2e-2 if kind == "linear" else 5e-2
    assert (ddim(den, back, ts, s) - x_0).abs().max() < tol
    errs = []
    for steps in (50, 100):
        ts = make_timesteps(s.T, steps, spacing)
        errs.append((ddim_invert(den, ddim(den, x_T, ts, s), ts, s) - x_T).abs().max().item())
    assert errs[1] < 0.65 * errs[0] and errs[1] < 0.4, errs
