"""Loss weights of diffuse/diffusion/objectives.py against their formulas, computed here in float64 from
alpha_bar alone (betas and beta-tilde are rederived from it, not read from the schedule's tables)."""

import pytest
import torch

from diffuse.diffusion.objectives import diffusion_loss, loss_weight
from diffuse.diffusion.schedule import make_schedule, q_sample

TS = [0, 1, 2, 17, 250, 500, 998, 999]


def by_hand(schedule, ts):
    """(SNR, beta, alpha, beta-tilde clipped at t=0 to beta-tilde_1, 1 - alpha_bar) at each t, from alpha_bar."""
    ab = [float(v) for v in schedule.alpha_bar]
    prev = lambda t: 1.0 if t == 0 else ab[t - 1]  # noqa: E731  alpha_bar_{-1} = 1
    beta = lambda t: 1 - ab[t] / prev(t)  # noqa: E731
    tilde = lambda t: beta(t) * (1 - prev(t)) / (1 - ab[t])  # noqa: E731
    rows = []
    for t in ts:
        rows.append((ab[t] / (1 - ab[t]), beta(t), 1 - beta(t), tilde(1) if t == 0 else tilde(t), 1 - ab[t]))
    return rows


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("gamma", [5.0, 1.0, 20.0])
def test_min_snr_weights(kind, gamma):
    """Hang et al. 2023: min(SNR, gamma) on the x0 error, i.e. min(SNR, gamma)/SNR on eps and
    min(SNR, gamma)/(SNR + 1) on v."""
    s = make_schedule(kind)
    t = torch.tensor(TS)
    snr = torch.tensor([r[0] for r in by_hand(s, TS)], dtype=torch.float64)
    m = torch.minimum(snr, torch.full_like(snr, gamma))
    for prediction, expected in (("eps", m / snr), ("x0", m), ("v", m / (snr + 1))):
        w = loss_weight(s, t, prediction, "min_snr", gamma)
        assert w.dtype == torch.float64
        assert torch.allclose(w, expected, rtol=1e-9, atol=0), (prediction, w, expected)
    # the clamp bites on both sides of gamma here: low-noise steps are capped, high-noise ones not
    assert bool((snr > gamma).any() and (snr < gamma).any())


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_vlb_weights(kind):
    """L_{t-1} per dimension, times T: beta_t^2 / (2 beta-tilde_t alpha_t (1 - alpha_bar_t)) on the eps error,
    beta-tilde clipped at t=0 to beta-tilde_1; times SNR on the x0 error, SNR / (SNR + 1) on v."""
    s = make_schedule(kind)
    t = torch.tensor(TS)
    rows = by_hand(s, TS)
    eps_w = torch.tensor([b**2 / (2 * bt * a * one_m) * s.T for _, b, a, bt, one_m in rows], dtype=torch.float64)
    snr = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    for prediction, expected in (("eps", eps_w), ("x0", eps_w * snr), ("v", eps_w * snr / (snr + 1))):
        assert torch.allclose(loss_weight(s, t, prediction, "vlb"), expected, rtol=1e-8, atol=0), prediction
    assert loss_weight(s, t, "eps", "simple").tolist() == [1.0] * len(TS)


def test_vlb_weight_is_the_kl_term():
    """With beta-tilde as the reverse variance, the vlb weight times the mean squared eps error is T times the
    KL term L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) per dimension (Ho et al. eq. 5 and 12)."""
    from diffuse.metrics.likelihood.vlb import kl_terms

    s = make_schedule("linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 600, 999])
    x_t = q_sample(s, x0, t, eps)
    kl_per_dim = kl_terms(x0, x_t, eps_hat, t, s, "beta_tilde") / x0[0].numel()
    w = loss_weight(s, t, "eps", "vlb")
    mse = (eps - eps_hat).pow(2).flatten(1).mean(1)
    assert torch.allclose(w * mse / s.T, kl_per_dim, rtol=1e-8, atol=0)


def test_weights_at_clean_data_t_minus_one():
    """t = -1 (clean data, SNR = inf): min_snr's limits (0 on eps and v, gamma on x0), no bound term, and not
    the weights of t = T-1, where a table index would wrap round to."""
    s = make_schedule("linear")
    t = torch.tensor([-1, 999])
    assert loss_weight(s, t, "eps", "min_snr", 5.0)[0].item() == 0.0
    assert loss_weight(s, t, "x0", "min_snr", 5.0)[0].item() == 5.0
    assert loss_weight(s, t, "v", "min_snr", 5.0)[0].item() == 0.0
    for prediction in ("eps", "x0", "v"):
        w = loss_weight(s, t, prediction, "vlb")
        assert w[0].item() == 0.0 and w[1].item() > 0
    assert loss_weight(s, t, "eps", "simple").tolist() == [1.0, 1.0]


def test_diffusion_loss_is_the_weighted_error():
    """The per-sample loss is the weight times the mean squared error of the prediction target."""
    s = make_schedule("cosine")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 300, 900])
    net = lambda x, tt, y: 0.5 * x  # noqa: E731
    ab = s.alpha_bar[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    for prediction, target in (("eps", noise), ("x0", x0), ("v", v)):
        loss = diffusion_loss(
            net, x0, s, prediction=prediction, weighting="min_snr", min_snr_gamma=2.0, t=t, noise=noise
        )
        err = (0.5 * x_t - target).float().pow(2).flatten(1).mean(1)
        assert torch.allclose(loss, err * loss_weight(s, t, prediction, "min_snr", 2.0).float(), rtol=1e-6)
