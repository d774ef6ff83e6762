"""Heun's second-order method on the probability-flow ODE, Karras et al. 2022, Algorithm 1 (deterministic),
lines 4-8, in the sigma parametrization x~ = x_t / sqrt(alpha_bar_t):

    d_i      = (x~_i - D(x~_i; sigma_i)) / sigma_i
    x~'      = x~_i + (sigma_{i+1} - sigma_i) d_i                   (Euler step)
    d'_i     = (x~' - D(x~'; sigma_{i+1})) / sigma_{i+1}            (only if sigma_{i+1} != 0)
    x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2      (trapezoidal correction)

The step after the last timestep goes to sigma = 0 and is an Euler step, so n timesteps cost 2n - 1 network
evaluations. Use it with `spacing: karras` (eq. 5 with rho = 7).
"""

from __future__ import annotations

import torch

from diffuse.diffusion.samplers.common import Run, check_percentile, ode_steps, sampler


@sampler
def heun(run: Run, *, dynamic_percentile: float = 0.0) -> torch.Tensor:
    return ode_steps(run, second_order=True, dynamic_percentile=check_percentile(dynamic_percentile))
