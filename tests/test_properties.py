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
