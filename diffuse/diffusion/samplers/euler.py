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

from diffuse.diffusion.samplers.common import Run, check_percentile, ode_steps, sampler


@sampler
def euler(run: Run, *, dynamic_percentile: float = 0.0) -> torch.Tensor:
    return ode_steps(run, second_order=False, dynamic_percentile=check_percentile(dynamic_percentile))
