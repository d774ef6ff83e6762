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

`afs` (analytic first step; Zhou et al. 2024, "Fast ODE-based sampling for diffusion models in around 5
steps", section 3.3): at the noisiest level alpha ~ 0 and sigma ~ 1, so x_T is itself the noise prediction;
the first evaluation is skipped and eps := x_T.
NFE = number of timesteps (one less with afs).
"""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.noise import Generator
from diffuse.diffusion.samplers.common import check_flag, check_percentile, data_prediction, levels
from diffuse.diffusion.schedule import Schedule


def analytic_first_step(x_t: torch.Tensor, t, y=None) -> torch.Tensor:
    """The denoiser AFS puts in place of the network at the first level: eps_hat(x_T) = x_T."""
    return x_t


@torch.no_grad()
def dpm_solver(
    denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    lower_order_final: bool = True,
    dynamic_percentile: float = 0.0,
    afs: bool = False,
    generator: Generator = None,
    y=None,
    clip_x0: bool = False,
    hook=None,
) -> torch.Tensor:
    dynamic_percentile = check_percentile(dynamic_percentile)
    lower_order_final = check_flag("lower_order_final", lower_order_final)
    afs = check_flag("afs", afs)
    path = levels(timesteps, schedule)
    n = len(path) - 1
    x = x_T
    x0_prev, h_prev = None, None
    for i in range(n):
        cur, nxt = path[i], path[i + 1]
        model = analytic_first_step if afs and i == 0 else denoiser
        x0, _ = data_prediction(model, x, cur, y, clip_x0, dynamic_percentile)
        if nxt.clean:  # lambda = inf: exp(-h) = 0 and sigma_next = 0
            x = x0
        else:
            h = nxt.lam - cur.lam
            first_order = x0_prev is None or (lower_order_final and n < 15 and i + 2 == n)
            if first_order:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (nxt.sigma / cur.sigma) * x - nxt.alpha * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if hook is not None:
            x = hook(x, nxt.t)
    return x
