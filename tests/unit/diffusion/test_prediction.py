import pytest
import torch

from diffuse.diffusion import prediction as P
from diffuse.diffusion.schedule import coefficients, make_schedule, q_sample


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_conversions_round_trip(kind):
    s = make_schedule(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    xt = q_sample(s, x0, t, eps)
    a, sg = coefficients(s, t, xt)
    assert torch.allclose(P.eps_to_x0(eps, xt, a, sg), x0, atol=1e-8)
    assert torch.allclose(P.x0_to_eps(x0, xt, a, sg), eps, atol=1e-6)  # divides by sigma, small at t=0
    v = P.eps_x0_to_v(eps, x0, a, sg)
    assert torch.allclose(P.v_to_eps(v, xt, a, sg), eps, atol=1e-10)
    assert torch.allclose(P.v_to_x0(v, xt, a, sg), x0, atol=1e-10)
    score = P.eps_to_score(eps, sg)
    assert torch.allclose(P.score_to_eps(score, sg), eps, atol=1e-10)
    for k in P.PREDICTIONS:
        assert torch.allclose(P.to_eps(k, P.target(k, x0, eps, a, sg), xt, a, sg), eps, atol=1e-6)


def test_score_of_gaussian_data_is_exact():
    """For x0 ~ N(0, I), x_t ~ N(0, I) at every t, so the true score is -x_t and eps = s x_t."""
    s = make_schedule("linear")
    t = torch.tensor([0, 100, 999])
    xt = torch.randn(3, 5, dtype=torch.float64)
    a, sg = coefficients(s, t, xt)
    # E[eps | x_t] = s x_t for standard normal data
    eps = sg * xt
    assert torch.allclose(P.eps_to_score(eps, sg), -xt)
