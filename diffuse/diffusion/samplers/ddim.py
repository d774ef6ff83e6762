"""DDIM, Song, Meng & Ermon 2021, eq. 12 and 16, on any decreasing subset of timesteps.

    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z
    sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s)

eta = 0 is deterministic (the probability-flow ODE's first-order discretisation); eta = 1 has the variance of
ancestral DDPM with the posterior variance beta-tilde.

`ddim_invert` runs the eta = 0 map backwards, x_0 -> x_T (section 4.3: the ODE can be integrated in either
direction), e.g. to find the latent of a real image for editing or to check a sampler.
"""

from __future__ import annotations

import torch

from diffuse.diffusion.noise import Generator, randn_like
from diffuse.diffusion.samplers.common import Run, batch_time, predict_x0, sampler, step_pairs
from diffuse.diffusion.schedule import Schedule
from diffuse.errors import UserError
from diffuse.validate import refuse


@sampler
def ddim(run: Run, *, eta: float = 0.0) -> torch.Tensor:
    # Above 1, sigma^2 exceeds 1 - alpha_bar_s at some steps: more noise than x_s holds, so the direction term would
    # need a negative variance (and clamping it to 0 leaves samples too noisy).
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0 <= eta <= 1):  # also refuses NaN
        raise refuse("sampler.eta", eta, "it must be in [0, 1] (0 deterministic, 1 DDPM's posterior noise)")
    x = run.x_T
    for t, nxt, ab_t, ab_s in step_pairs(run.timesteps, run.schedule):
        eps = run.denoiser(x, batch_time(t, x), run.y)
        x = ddim_step(x, eps, ab_t, ab_s, last=nxt < 0, eta=eta, clip_x0=run.clip_x0, generator=run.generator)
        x = run.hooked(x, nxt)
    return x


def ddim_step(
    x,
    eps,
    ab_t: float,
    ab_s: float,
    *,
    last: bool,
    eta: float = 0.0,
    clip_x0: bool = False,
    generator: Generator = None,
) -> torch.Tensor:
    """One DDIM step (eq. 12) from alpha_bar_t to alpha_bar_s given the denoiser's eps; no noise when `last`."""
    x0 = predict_x0(eps, x, ab_t, clip_x0)
    if clip_x0:  # keep eps consistent with the clipped x0 (the direction term uses it)
        eps = (x - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
    sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)) ** 0.5
    x = ab_s**0.5 * x0 + max(1 - ab_s - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0 and not last:
        x = x + sigma * randn_like(x, generator)
    return x


@torch.no_grad()
def ddim_invert(
    denoiser,
    x_0: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    y=None,
    fixed_point_iters: int = 0,
    hook=None,
) -> torch.Tensor:
    """DDIM inversion: the x_T from which `ddim(..., eta=0)` over the same (decreasing) timesteps returns x_0.

    Each eta = 0 step x_t -> x_s is undone by solving eq. 12 for x_t given x_s and eps = eps(x_t, t). The
    classic inversion (fixed_point_iters=0) takes eps at the point it starts from, x_s, which is exact only as
    the steps shrink; each fixed-point iteration re-evaluates eps at the current estimate of x_t, converging to
    the exact inverse of the sampler's step when the step is small enough to be a contraction (Pan et al.
    2023, "Effective real image editing with accelerated iterative diffusion inversion"). Cost: steps x
    (1 + fixed_point_iters) denoiser calls. `hook(x, t) -> x` sees the state after each inverse step with the
    timestep it now belongs to (editing records the path with it)."""
    if isinstance(fixed_point_iters, bool) or not isinstance(fixed_point_iters, int) or fixed_point_iters < 0:
        raise UserError(f"fixed_point_iters={fixed_point_iters!r} is not allowed: it must be an integer >= 0")
    x = x_0
    for t, nxt, ab_t, ab_s in reversed(list(step_pairs(timesteps, schedule))):
        # There is no denoiser at the clean end (t = -1): the first eps is taken at t, from x_0.
        eps = denoiser(x, batch_time(nxt if nxt >= 0 else t, x), y)
        x_t = _undo_step(x, eps, ab_t, ab_s)
        for _ in range(fixed_point_iters):
            x_t = _undo_step(x, denoiser(x_t, batch_time(t, x), y), ab_t, ab_s)
        x = x_t if hook is None else hook(x_t, t)
    return x


def _undo_step(x_s, eps, ab_t: float, ab_s: float) -> torch.Tensor:
    """x_t with ddim_step(x_t, eps, ab_t, ab_s, eta=0) == x_s: the same x0 and eps, put back at alpha_bar_t."""
    x0 = (x_s - (1 - ab_s) ** 0.5 * eps) / ab_s**0.5
    return ab_t**0.5 * x0 + (1 - ab_t) ** 0.5 * eps
