"""Learned reverse variances (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", section
3.1) and the variational-bound term that trains them, with the Gaussian pieces the bound is made of.

A network with learned variances outputs 2C channels: C of its mean prediction (eps, x0 or v, as any network) and
C more, v_raw, read as v = (v_raw + 1) / 2 in their eq. 15,

    Sigma_theta(x_t, t) = exp(v log beta_t + (1 - v) log beta-tilde_t),

so that v_raw = 0 is halfway between the two fixed choices in log space. Nichol & Dhariwal's code reads its
output this way (v_raw in [-1, 1] at the ends); doing the same lets their checkpoints convert unchanged.
beta-tilde_0 = 0, so at the first step log beta-tilde is clipped to beta-tilde_1, as their code does.

On a respaced timestep list (t -> s, Nichol & Dhariwal section 4), beta and beta-tilde are those of the respaced
process: beta = 1 - alpha_bar_t / alpha_bar_s and beta-tilde = beta (1 - alpha_bar_s) / (1 - alpha_bar_t), while
the network still sees the original t.

L_hybrid = L_simple + lambda L_vlb (their eq. 16, lambda = 0.001) with the mean's gradient stopped in L_vlb, which
therefore trains the variances alone. L_vlb = sum_t L_t is estimated as T L_t at a uniform t, each L_t the mean
over dimensions, in bits (as their code does): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1,
and for t = 0 the decoder -log p(x_0 | x_1) (the discretized Gaussian of Ho et al. section 3.3 for 8-bit data, a
density otherwise).
"""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.schedule import Schedule

LN2 = math.log(2.0)


def gaussian_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per entry, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def log_normal_interval(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails: intervals above 0 are mirrored below it so
    that the difference is taken between two small CDF values rather than two values near 1."""
    flip = (lo + hi) > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    # log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))), with -expm1 for the small case.
    return lb + torch.log(-torch.expm1(la - lb))


def interpolate_log_variance(v_raw: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """log Sigma = v log beta + (1 - v) log beta-tilde, v = (v_raw + 1) / 2 (eq. 15 in their code's convention)."""
    frac = (v_raw + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def step_log_variance(v_raw: torch.Tensor, ab_t: float, ab_s: float) -> torch.Tensor:
    """log Sigma of the ancestral step alpha_bar_t -> alpha_bar_s (any respacing), for a step that adds noise
    (alpha_bar_s < 1): beta and beta-tilde of the respaced process."""
    beta = 1 - ab_t / ab_s
    beta_tilde = beta * (1 - ab_s) / (1 - ab_t)
    return interpolate_log_variance(v_raw, math.log(beta), math.log(beta_tilde))


def log_variance_bounds(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log beta_t, log beta-tilde_t) at integer timesteps t >= 0 of the full schedule, beta-tilde clipped at t = 0
    to beta-tilde_1, shaped to broadcast against `like` and in its dtype. Table lookups on t's device: no sync."""
    idx = t.long()
    beta = schedule.table("betas", t.device)[idx]
    pv = schedule.table("posterior_variance", t.device)
    beta_tilde = torch.where(idx == 0, pv[1].expand_as(beta), pv[idx])
    shape = (-1, *([1] * (like.dim() - 1)))
    return beta.log().to(like.dtype).reshape(shape), beta_tilde.log().to(like.dtype).reshape(shape)


def vlb_term(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    v_raw: torch.Tensor,
    schedule: Schedule,
    *,
    discretized: bool,
) -> torch.Tensor:
    """L_t per example in nats per dimension (mean over dimensions) at integer timesteps t >= 0 of the full
    schedule, for a network whose eps and v_raw were computed at x_t: the KL for t >= 1, the decoder at t = 0
    (8-bit data when `discretized`). Computed in float64; differentiable in eps and v_raw (detach eps for
    L_hybrid). No host-device sync: it runs at every training step."""
    x0, x_t, eps, v_raw = (v.to(torch.float64) for v in (x0, x_t, eps, v_raw))
    dev = t.device
    idx = t.long()
    shape = (-1, *([1] * (x0.dim() - 1)))

    def at(name):
        return schedule.table(name, dev)[idx].reshape(shape)

    ab, ab_prev, beta = at("alpha_bar"), at("alpha_bar_prev"), at("betas")
    x0_hat = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    c0 = ab_prev.sqrt() * beta / (1 - ab)
    ct = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    mean_p = c0 * x0_hat + ct * x_t
    log_beta, log_beta_tilde = log_variance_bounds(schedule, t, x0)
    log_var_p = interpolate_log_variance(v_raw, log_beta, log_beta_tilde)
    # The KL with the log variances written out: beta-tilde_0 = 0 makes var_q's log -inf at t = 0, where the
    # decoder is used instead (torch.where picks it, and the clamp keeps the unused branch finite).
    var_q = at("posterior_variance").clamp(min=1e-40)
    mean_q = c0 * x0 + ct * x_t
    kl = 0.5 * (log_var_p - var_q.log() + (var_q + (mean_q - mean_p) ** 2) * torch.exp(-log_var_p) - 1)
    std = torch.exp(0.5 * log_var_p)
    if discretized:
        dec = -discretized_log_likelihood(x0, mean_p, std)
    else:
        dec = 0.5 * (x0 - mean_p) ** 2 / std**2 + std.log() + 0.5 * math.log(2 * math.pi)
    per = torch.where((idx == 0).reshape(shape), dec, kl)
    return per.flatten(1).mean(1)


def discretized_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) per entry under N(mean, std^2), Ho et al. 2020 section 3.3, for x on the 8-bit grid
    2k/255 - 1 (k is rounded, not checked: metrics.likelihood checks the grid where data comes from a user):
    the bin is [x - 1/255, x + 1/255], widened to -inf at k = 0 and +inf at k = 255."""
    k = ((x.detach().to(torch.float64) + 1) * 127.5).round()
    xd = k / 127.5 - 1
    mean, std = mean.to(torch.float64), torch.as_tensor(std, dtype=torch.float64, device=xd.device)
    lo = torch.where(k <= 0, torch.full_like(xd, -math.inf), (xd - 1 / 255 - mean) / std)
    hi = torch.where(k >= 255, torch.full_like(xd, math.inf), (xd + 1 / 255 - mean) / std)
    return log_normal_interval(lo, hi)
