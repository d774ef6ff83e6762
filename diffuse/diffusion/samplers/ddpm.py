"""Ancestral DDPM sampling, Ho et al. 2020, Algorithm 2 (eq. 6-7 and 11), on any decreasing subset of timesteps.

On a subset, step t -> s uses the respaced process of Nichol & Dhariwal 2021 (section 4):
beta = 1 - alpha_bar_t / alpha_bar_s. On all T timesteps it is exactly Ho et al.'s sampler.
"""

from __future__ import annotations

import torch

from diffuse.diffusion.noise import Generator, randn_like
from diffuse.diffusion.samplers.common import batch_time, predict_x0, step_pairs
from diffuse.diffusion.schedule import Schedule
from diffuse.errors import UserError

VARIANCES = ("beta", "beta_tilde")


@torch.no_grad()
def ddpm(
    denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    variance: str = "beta_tilde",
    generator: Generator = None,
    y=None,
    clip_x0: bool = False,
    hook=None,
) -> torch.Tensor:
    """x_{t-1} = mu~(x_t, x0_hat) + sigma_t z, sigma_t^2 = beta_t ("beta") or beta-tilde_t ("beta_tilde");
    no noise on the last step."""
    if variance not in VARIANCES:
        raise UserError(f"sampler.variance={variance!r} is not allowed: choose one of {', '.join(VARIANCES)}")
    x = x_T
    for t, nxt, ab_t, ab_s in step_pairs(timesteps, schedule):
        eps = denoiser(x, batch_time(t, x), y)
        x = ddpm_step(x, eps, ab_t, ab_s, last=nxt < 0, variance=variance, clip_x0=clip_x0, generator=generator)
        if hook is not None:
            x = hook(x, nxt)
    return x


def ddpm_step(x, eps, ab_t: float, ab_s: float, *, last: bool, variance: str = "beta_tilde", clip_x0: bool = False,
              generator: Generator = None) -> torch.Tensor:
    """One ancestral step from alpha_bar_t to alpha_bar_s given the denoiser's eps; no noise when `last`."""
    x0 = predict_x0(eps, x, ab_t, clip_x0)
    beta = 1 - ab_t / ab_s
    # Posterior mean, Ho et al. eq. 7 with (alpha_bar_{t-1}, beta_t) -> (alpha_bar_s, beta).
    mean = (ab_s**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_s) / (1 - ab_t)) * x
    if last:
        return mean
    var = beta if variance == "beta" else beta * (1 - ab_s) / (1 - ab_t)
    return mean + var**0.5 * randn_like(x, generator)
