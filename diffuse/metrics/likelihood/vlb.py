"""The discrete-time variational bound of Ho et al. 2020, eq. 5, per example: L = L_T + sum_{t>1} L_{t-1} + L_0,
all T terms summed exactly, each one denoiser call at a fresh x_t ~ q(x_t | x_0); the decoder L_0 is a Gaussian
density for continuous data (nll) or the discretized Gaussian of their section 3.3 for 8-bit data (bpd)."""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.bound import gaussian_kl, interpolate_log_variance, log_variance_bounds
from diffuse.diffusion.noise import Generator, randn
from diffuse.diffusion.schedule import Schedule, coefficients, posterior, q_sample
from diffuse.errors import UserError
from diffuse.metrics.likelihood.units import LN2, Progress, dims, discretized_gaussian_log_likelihood, grid_index

VARIANCES = ("beta_tilde", "beta")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def prior_kl(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, nats; closed form, no denoiser."""
    ab = schedule.alpha_bar[-1]
    x = x0.to(torch.float64).flatten(1)
    return gaussian_kl(ab.sqrt() * x, 1 - ab, torch.zeros_like(x), torch.ones_like(x)).sum(1)


def reverse_variance(schedule: Schedule, t: torch.Tensor, variance: str) -> torch.Tensor:
    """sigma_t^2 of p(x_{t-1} | x_t), float64 (N,): beta-tilde_t or beta_t (Ho et al. section 3.2). At t = 0 (the
    decoder) both are beta-tilde_1, since beta-tilde_0 = 0; Ho et al.'s code does the same."""
    if variance not in VARIANCES:
        raise UserError(f"variance={variance!r} is not allowed: choose one of {', '.join(VARIANCES)}")
    t = t.cpu().long()
    # No reverse step leaves clean data, and a negative index would wrap round to the noisiest level.
    if bool((t < 0).any()):
        raise ValueError(f"reverse variance of p(x_(t-1) | x_t) needs timesteps t >= 0, got {int(t.min())}")
    table = schedule.posterior_variance if variance == "beta_tilde" else schedule.betas
    return torch.where(t == 0, schedule.posterior_variance[1], table[t])


def x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    a, s = coefficients(schedule, t, x_t)
    return (x_t - s * eps) / a


def _var_p(schedule: Schedule, t: torch.Tensor, variance: str, like: torch.Tensor, v_raw) -> torch.Tensor:
    """p(x_{t-1} | x_t)'s variance, broadcast against `like`: fixed, or the learned one of v_raw (bound.py)."""
    if variance == "learned":
        log_beta, log_beta_tilde = log_variance_bounds(schedule, t.to(like.device), like)
        return torch.exp(interpolate_log_variance(v_raw.to(like.dtype), log_beta, log_beta_tilde))
    return _bcast(reverse_variance(schedule, t, variance), like)


def kl_terms(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    variance: str = "beta_tilde",
    v_raw: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) per example in nats, for integer t >= 1, given the
    denoiser's eps at x_t; p's mean is the posterior mean at x0_hat (Ho et al. eq. 11), its variance sigma_t^2
    (variance="learned": the network's, from its v_raw at x_t)."""
    x0, x_t, eps = (v.to(torch.float64) for v in (x0, x_t, eps))
    mean_q, var_q = posterior(schedule, x0, x_t, t)
    mean_p, _ = posterior(schedule, x0_from_eps(eps, x_t, t, schedule), x_t, t)
    var_p = _var_p(schedule, t, variance, x0, v_raw)
    return gaussian_kl(mean_q, var_q, mean_p, var_p).flatten(1).sum(1)


def decoder_nll(
    x0: torch.Tensor,
    x_1: torch.Tensor,
    eps: torch.Tensor,
    schedule: Schedule,
    discretized: bool,
    v_raw: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_0 = -log p(x_0 | x_1) per example in nats, x_1 the sample at index 0: a Gaussian with the posterior mean
    at x0_hat (which at the first step is x0_hat itself) and variance beta-tilde_1 (or the learned one, given the
    network's v_raw); a density for continuous data, the discretized probability of the 8-bit bin for 8-bit data."""
    t = torch.zeros(x0.shape[0], dtype=torch.long)
    x0, x_1, eps = (v.to(torch.float64) for v in (x0, x_1, eps))
    mean, _ = posterior(schedule, x0_from_eps(eps, x_1, t, schedule), x_1, t)
    var = _var_p(schedule, t, "learned" if v_raw is not None else "beta_tilde", x0, v_raw)
    if discretized:
        return -discretized_gaussian_log_likelihood(x0, mean, var.sqrt()).flatten(1).sum(1)
    return (0.5 * (x0 - mean) ** 2 / var + 0.5 * torch.log(2 * math.pi * var)).flatten(1).sum(1)


def _check_variance(variance: str, learned_variance) -> None:
    if variance == "learned" and learned_variance is None:
        raise UserError(
            "variance='learned' needs a model trained with learned variances (objective.learn_sigma=true): "
            f"this one has none; choose one of {', '.join(VARIANCES)}"
        )
    if variance != "learned" and variance not in VARIANCES:
        raise UserError(f"variance={variance!r} is not allowed: choose one of {', '.join(VARIANCES)}, learned")


@torch.no_grad()
def vlb_terms(
    denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    y=None,
    generator: Generator = None,
    variance: str = "beta_tilde",
    discretized: bool = False,
    batch_t: int = 8,
    progress: Progress = None,
    learned_variance=None,
) -> torch.Tensor:
    """(N, T+1) float64 nats: column 0 the decoder L_0, column t = 1..T-1 the KL term L_{t-1} (paper indexing) at
    schedule step t, column T the prior L_T. batch_t timesteps share one denoiser call of batch_t * N inputs.
    variance="learned": the model's learned variances, `learned_variance(x_t, t, y) -> v_raw` (the network's
    variance channels of the call just made, prediction.NetworkDenoiser.variance_output).

    Noise for the chunk is drawn as (N, batch_t, ...) so that a PerSample generator keys it on the example."""
    if isinstance(batch_t, bool) or not isinstance(batch_t, int) or batch_t < 1:
        raise UserError(f"batch_t={batch_t!r} is not allowed: it must be a positive integer")
    _check_variance(variance, learned_variance)  # refuse a bad name before any work
    learned = variance == "learned"
    n, T = x.shape[0], schedule.T
    if discretized:
        grid_index(x)
    terms = torch.empty((n, T + 1), dtype=torch.float64)
    terms[:, T] = prior_kl(x, schedule).cpu()
    done = 0
    for start in range(0, T, batch_t):
        ts = torch.arange(start, min(start + batch_t, T))
        m = ts.numel()
        noise = randn((n, m, *x.shape[1:]), generator, x.device, x.dtype).transpose(0, 1).reshape(m * n, *x.shape[1:])
        t = ts.repeat_interleave(n).to(x.device)
        x0 = x.repeat(m, *([1] * (x.dim() - 1)))
        x_t = q_sample(schedule, x0, t, noise)
        yy = None if y is None else y.repeat(m)
        eps = denoiser(x_t, t, yy)
        v_raw = learned_variance(x_t, t, yy) if learned else None
        out = torch.empty(m * n, dtype=torch.float64, device=x.device)
        first = t == 0
        if first.any():
            out[first] = decoder_nll(
                x0[first], x_t[first], eps[first], schedule, discretized, v_raw[first] if learned else None
            )
        rest = ~first
        if rest.any():
            out[rest] = kl_terms(
                x0[rest], x_t[rest], eps[rest], t[rest], schedule, variance, v_raw[rest] if learned else None
            )
        terms[:, start : start + m] = out.view(m, n).T.cpu()
        done += m
        if progress is not None:
            progress(done, T)
    return terms


def vlb_nll(denoiser, x: torch.Tensor, schedule: Schedule, **kwargs) -> torch.Tensor:
    """The variational bound on -log p(x) of continuous data, nats/dim (Gaussian decoder density); the keywords
    are vlb_terms'."""
    return vlb_terms(denoiser, x, schedule, discretized=False, **kwargs).sum(1) / dims(x)


def vlb_bpd(denoiser, x: torch.Tensor, schedule: Schedule, **kwargs) -> torch.Tensor:
    """The variational bound on -log2 P(x) of 8-bit data, bits/dim (discretized decoder, Ho et al. section 3.3); the
    keywords are vlb_terms'."""
    return vlb_terms(denoiser, x, schedule, discretized=True, **kwargs).sum(1) / (dims(x) * LN2)
