"""Euler's method on the probability-flow ODE in the sigma parametrization, Karras et al. 2022 ("Elucidating
the Design Space of Diffusion-Based Generative Models"), Algorithm 1 without its second-order correction.

With x~ = x_t / sqrt(alpha_bar_t) and sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) the ODE is (eq. 1, 3)
    dx~/dsigma = (x~ - D(x~; sigma)) / sigma = eps_hat
and one step is  x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) d_i. The step after the last timestep goes to
sigma = 0. On integer timesteps this is DDIM with eta = 0 (Song et al. 2021, eq. 14). NFE = number of timesteps.
Use it with `spacing: karras` (eq. 5 with rho = 7); the timesteps may be fractional.
"""

from __future__ import annotations

import torch

from diffuse.diffusion.noise import Generator
from diffuse.diffusion.samplers.common import check_percentile, ode_steps


@torch.no_grad()
def euler(
    denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    schedule,
    *,
    dynamic_percentile: float = 0.0,
    generator: Generator = None,
    y=None,
    clip_x0: bool = False,
    hook=None,
) -> torch.Tensor:
    dynamic_percentile = check_percentile(dynamic_percentile)
    return ode_steps(
        denoiser,
        x_T,
        timesteps,
        schedule,
        second_order=False,
        y=y,
        clip_x0=clip_x0,
        dynamic_percentile=dynamic_percentile,
        hook=hook,
    )
