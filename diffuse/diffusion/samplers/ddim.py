"""DDIM, Song, Meng & Ermon 2021, eq. 12 and 16, on any decreasing subset of timesteps.

    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z
    sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s)

eta = 0 is deterministic (the probability-flow ODE's first-order discretisation); eta = 1 has the variance of
ancestral DDPM with the posterior variance beta-tilde.
"""

from __future__ import annotations

import torch

from diffuse.diffusion.noise import Generator, randn_like
from diffuse.diffusion.samplers.common import batch_time, predict_x0, step_pairs
from diffuse.diffusion.schedule import Schedule
from diffuse.errors import UserError


@torch.no_grad()
def ddim(
    denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    generator: Generator = None,
    y=None,
    clip_x0: bool = False,
    hook=None,
) -> torch.Tensor:
    if not (eta >= 0):  # also refuses NaN
        raise UserError(f"sampler.eta={eta!r} is not allowed: it must be >= 0")
    x = x_T
    for t, nxt, ab_t, ab_s in step_pairs(timesteps, schedule):
        eps = denoiser(x, batch_time(t, x), y)
        x = ddim_step(x, eps, ab_t, ab_s, last=nxt < 0, eta=eta, clip_x0=clip_x0, generator=generator)
        if hook is not None:
            x = hook(x, nxt)
    return x


def ddim_step(x, eps, ab_t: float, ab_s: float, *, last: bool, eta: float = 0.0, clip_x0: bool = False,
              generator: Generator = None) -> torch.Tensor:
    """One DDIM step (eq. 12) from alpha_bar_t to alpha_bar_s given the denoiser's eps; no noise when `last`."""
    x0 = predict_x0(eps, x, ab_t, clip_x0)
    if clip_x0:  # keep eps consistent with the clipped x0 (the direction term uses it)
        eps = (x - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
    sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)) ** 0.5
    x = ab_s**0.5 * x0 + max(1 - ab_s - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0 and not last:
        x = x + sigma * randn_like(x, generator)
    return x
