"""Euler ancestral in the sigma parametrization of Karras et al. 2022 ("Elucidating the Design Space of
Diffusion-Based Generative Models", eq. 1-3), with the ancestral step of k-diffusion (Crowson): each step is a
deterministic Euler step to a lower level sigma_down followed by fresh noise of std sigma_up, sized so that
the level reached is sigma_next. One network evaluation per step.

With x~ = x_t / sqrt(alpha_bar_t), sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) and d = (x~ - x0_hat) / sigma
(= eps_hat, the ODE's dx~/dsigma):
    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2,    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x~_next = x~ + (sigma_down - sigma) d + sigma_up z,                    z ~ N(0, I) from `generator`
eta = 1 draws x~_next from the Gaussian posterior q(x~_next | x~, x_0 = x0_hat) of x~_s = x_0 + sigma_s eps
(mean x0_hat + (sigma_next^2 / sigma^2)(x~ - x0_hat), variance sigma_up^2): ancestral sampling as in DDPM (Ho et
al. 2020, eq. 6-7), and exactly DDIM with the same eta (Song et al. 2021, eq. 12 and 16) written in x~. eta = 0
is Euler (euler.py). eta > 1 is allowed; sigma_up is capped at sigma_next (then sigma_down = 0: the step goes to
x0_hat and re-noises it). The step after the last timestep goes to sigma = 0 (no noise): x = x0_hat.
NFE = number of timesteps.
"""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.noise import randn_like
from diffuse.diffusion.samplers.common import Run, batch_time, check_percentile, sampler, sigma_steps, threshold_x0
from diffuse.validate import check_number


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of the step sigma -> sigma_next."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma)
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


@sampler
def euler_ancestral(run: Run, *, eta: float = 1.0, dynamic_percentile: float = 0.0) -> torch.Tensor:
    eta = float(check_number("sampler.eta", eta, minimum=0))
    dynamic_percentile = check_percentile(dynamic_percentile)
    steps = sigma_steps(run.timesteps, run.schedule)
    if not steps:
        return run.x_T
    xs = run.x_T * math.sqrt(1 + steps[0][2] ** 2)
    for t, nxt, sigma, sigma_n in steps:
        x_t = xs / math.sqrt(1 + sigma**2)
        d = run.denoiser(x_t, batch_time(t, x_t), run.y)
        if run.clip_x0 or dynamic_percentile:
            d = (xs - threshold_x0(xs - sigma * d, run.clip_x0, dynamic_percentile)) / sigma
        down, up = ancestral_step(sigma, sigma_n, eta)
        xs = xs + (down - sigma) * d
        if up > 0:
            xs = xs + up * randn_like(xs, run.generator)
        if run.hook is not None:
            xs = run.hook(xs / math.sqrt(1 + sigma_n**2), nxt) * math.sqrt(1 + sigma_n**2)
    return xs
