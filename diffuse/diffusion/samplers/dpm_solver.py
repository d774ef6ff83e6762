"""DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling"), Algorithm 2, eq. 9-10.

The probability-flow ODE in log-SNR time lambda_t = log(alpha_t / sigma_t) (alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t)) with the data prediction x0_hat; a multistep second-order update that
reuses the previous step's x0_hat, so every step costs one network evaluation:

    h_i = lambda_i - lambda_{i-1},  r_i = h_{i-1} / h_i
    D_i = (1 + 1/(2 r_i)) x0_hat_{i-1} - 1/(2 r_i) x0_hat_{i-2}      (D_1 = x0_hat_0: the first step is first order)
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i

The step after the last timestep goes to clean data (sigma = 0, lambda = inf) where the update is x = D; it is
taken first order (x = x0_hat), the usual choice since h is infinite there. `lower_order_final` also takes the
step before it first order when there are fewer than 15 steps (stabler at very few steps).
NFE = number of timesteps.
"""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.noise import Generator
from diffuse.diffusion.samplers.common import alpha_bar_of, batch_time, check_percentile, threshold_x0, time_list
from diffuse.diffusion.schedule import Schedule


@torch.no_grad()
def dpm_solver(
    denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    lower_order_final: bool = True,
    dynamic_percentile: float = 0.0,
    generator: Generator = None,
    y=None,
    clip_x0: bool = False,
    hook=None,
) -> torch.Tensor:
    dynamic_percentile = check_percentile(dynamic_percentile)
    ts = time_list(timesteps)
    n = len(ts)
    x = x_T
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        ab = alpha_bar_of(schedule, t)
        alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
        eps = denoiser(x, batch_time(t, x), y)
        x0 = threshold_x0((x - sigma * eps) / alpha, clip_x0, dynamic_percentile)
        if i + 1 == n:  # to clean data: lambda = inf, exp(-h) = 0, sigma_next = 0
            x, nxt = x0, -1
        else:
            nxt = ts[i + 1]
            ab_n = alpha_bar_of(schedule, nxt)
            alpha_n, sigma_n = math.sqrt(ab_n), math.sqrt(1 - ab_n)
            lam, lam_n = math.log(alpha / sigma), math.log(alpha_n / sigma_n)
            h = lam_n - lam
            first_order = x0_prev is None or (lower_order_final and n < 15 and i + 2 == n)
            if first_order:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_n / sigma) * x - alpha_n * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if hook is not None:
            x = hook(x, nxt)
    return x
