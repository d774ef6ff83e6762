"""Ancestral DDPM sampling, Ho et al. 2020, Algorithm 2 (eq. 6-7 and 11), on any decreasing subset of timesteps.

On a subset, step t -> s uses the respaced process of Nichol & Dhariwal 2021 (section 4):
beta = 1 - alpha_bar_t / alpha_bar_s. On all T timesteps it is exactly Ho et al.'s sampler.

variance="learned": the network's own variances (Nichol & Dhariwal eq. 15, diffusion.bound), interpolated
between the respaced step's beta and beta-tilde; `learned_variance(x_t, t, y) -> v_raw` gives the network's
variance channels (prediction.NetworkDenoiser.variance_output), passed by the caller, never by a config.
"""

from __future__ import annotations

import torch

from diffuse.diffusion.bound import step_log_variance
from diffuse.diffusion.noise import Generator, randn_like
from diffuse.diffusion.samplers.common import Run, batch_time, predict_x0, sampler, step_pairs
from diffuse.errors import UserError

VARIANCES = ("beta", "beta_tilde", "learned")


def resolve_variance(variance, learned_variance) -> str:
    """sampler.variance: null is the model's choice, its learned variances if it has them, else beta (Ho et al.'s
    CIFAR-10 setting); "learned" on a model without them is refused."""
    if variance is None:
        return "learned" if learned_variance is not None else "beta"
    if variance not in VARIANCES:
        raise UserError(
            f"sampler.variance={variance!r} is not allowed: choose one of {', '.join(VARIANCES)} (or null: the model's)"
        )
    if variance == "learned" and learned_variance is None:
        raise UserError(
            "sampler.variance=learned needs a model trained with objective.learn_sigma=true: this one has fixed "
            "variances; choose beta or beta_tilde (or null)"
        )
    return variance


@sampler
def ddpm(run: Run, *, variance: str | None = "beta_tilde", learned_variance=None) -> torch.Tensor:
    """x_{t-1} = mu~(x_t, x0_hat) + sigma_t z, sigma_t^2 = beta_t ("beta"), beta-tilde_t ("beta_tilde") or the
    network's ("learned"); no noise on the last step."""
    variance = resolve_variance(variance, learned_variance)
    x = run.x_T
    for t, nxt, ab_t, ab_s in step_pairs(run.timesteps, run.schedule):
        tt = batch_time(t, x)
        eps = run.denoiser(x, tt, run.y)
        v_raw = learned_variance(x, tt, run.y) if variance == "learned" and nxt >= 0 else None
        x = ddpm_step(
            x,
            eps,
            ab_t,
            ab_s,
            last=nxt < 0,
            variance=variance,
            clip_x0=run.clip_x0,
            generator=run.generator,
            v_raw=v_raw,
        )
        x = run.hooked(x, nxt)
    return x


def ddpm_step(
    x,
    eps,
    ab_t: float,
    ab_s: float,
    *,
    last: bool,
    variance: str = "beta_tilde",
    clip_x0: bool = False,
    generator: Generator = None,
    v_raw=None,
) -> torch.Tensor:
    """One ancestral step from alpha_bar_t to alpha_bar_s given the denoiser's eps (and for variance="learned"
    the network's v_raw at x); no noise when `last`."""
    x0 = predict_x0(eps, x, ab_t, clip_x0)
    beta = 1 - ab_t / ab_s
    # Posterior mean, Ho et al. eq. 7 with (alpha_bar_{t-1}, beta_t) -> (alpha_bar_s, beta).
    mean = (ab_s**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_s) / (1 - ab_t)) * x
    if last:
        return mean
    if variance == "learned":
        if v_raw is None:
            raise ValueError("ddpm_step: variance='learned' needs the network's v_raw")
        return mean + torch.exp(0.5 * step_log_variance(v_raw.to(x.dtype), ab_t, ab_s)) * randn_like(x, generator)
    var = beta if variance == "beta" else beta * (1 - ab_s) / (1 - ab_t)
    return mean + var**0.5 * randn_like(x, generator)
