"""DPM-Solver++(3M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"), section 3.3 and the appendix: the multistep third-order data-prediction solver, one network evaluation
per step.

Notation (paper -> code): lambda_t = log(alpha_t / sigma_t) -> Level.lam (alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t)); x_theta(x_{t_{i-1}}, t_{i-1}) -> m0, and the two stored ones before it -> m1,
m2; h = lambda_{t_i} - lambda_{t_{i-1}}, and h_0, h_1 the two previous steps (newest first).

The exact solution of the probability-flow ODE in data prediction (eq. 8),
    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_theta(x_lambda, lambda) dlambda,
with x_theta expanded to second order in lambda about lambda_s integrates to
    x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1 x_theta + alpha_t phi_2 h x_theta' - alpha_t phi_3 h^2 x_theta''
    phi_1 = expm1(-h),  phi_2 = phi_1 / h + 1,  phi_3 = phi_2 / h - 1/2
(phi_3 h^2 = -int_0^h e^(u - h) u^2 / 2 du carries the Taylor term's 1/2). The multistep method estimates the
derivatives from the stored data predictions by backward divided differences in lambda:
    r0 = h_0 / h,  r1 = h_1 / h
    D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)        ~ h x_theta'
    D2 = 2 (D1_0 - D1_1) / (r0 + r1)                ~ h^2 x_theta''
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i phi_1 m0 + alpha_i phi_2 D1 - alpha_i phi_3 D2
D2 is normalised as in the paper's singlestep third-order update (an estimate of h^2 x_theta''). Implementations
of the multistep update that take D2 = (D1_0 - D1_1) / (r0 + r1), h^2 x_theta'' / 2, get half the
third-order term and a solver of order 2 (measured on the Gaussian flow of tests/test_dpm_solvers.py).

Warm start: the first step is first order (DDIM), the second the 2M update of dpm_solver.py,
x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i phi_1 (m0 + (m0 - m1) / (2 r0)). The step after the last timestep
goes to clean data (lambda = inf) and is x = m0, as in dpm_solver.py. `lower_order_final` (fewer than 15 steps)
takes the step before it first order and the one before that second order: at most as many history terms as
steps remain, so with 5 or fewer timesteps this is DPM-Solver++(2M) exactly.
`afs`: the analytic first step of dpm_solver.py (Zhou et al. 2024, section 3.3), eps := x_T at the first level.
NFE = number of timesteps (one less with afs).
"""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.noise import Generator
from diffuse.diffusion.samplers.common import check_flag, check_percentile, data_prediction, levels
from diffuse.diffusion.samplers.dpm_solver import analytic_first_step
from diffuse.diffusion.schedule import Schedule


def step_order(i: int, n: int, lower_order_final: bool, max_order: int = 3) -> int:
    """The order of step i of n (the step to clean data, i = n - 1, is not asked): the history it has, and with
    lower_order_final below 15 steps no more than the steps that remain."""
    order = min(max_order, i + 1)
    if lower_order_final and n < 15:
        order = min(order, n - 1 - i)
    return order


@torch.no_grad()
def dpm_solver_3m(
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
    ms: list[torch.Tensor] = []  # data predictions, newest last (at most three kept)
    hs: list[float] = []  # the steps in lambda that led to them
    for i in range(n):
        cur, nxt = path[i], path[i + 1]
        model = analytic_first_step if afs and i == 0 else denoiser
        m0, _ = data_prediction(model, x, cur, y, clip_x0, dynamic_percentile)
        ms = (ms + [m0])[-3:]
        if nxt.clean:
            x = m0
        else:
            h = nxt.lam - cur.lam
            phi_1 = math.expm1(-h)
            order = step_order(i, n, lower_order_final)
            x = (nxt.sigma / cur.sigma) * x - nxt.alpha * phi_1 * m0
            if order == 2:
                r0 = hs[-1] / h
                x = x - (nxt.alpha * phi_1 / (2 * r0)) * (m0 - ms[-2])
            elif order == 3:
                r0, r1 = hs[-1] / h, hs[-2] / h
                phi_2 = phi_1 / h + 1
                phi_3 = phi_2 / h - 0.5
                d1_0 = (m0 - ms[-2]) / r0
                d1_1 = (ms[-2] - ms[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (2 / (r0 + r1)) * (d1_0 - d1_1)
                x = x + (nxt.alpha * phi_2) * d1 - (nxt.alpha * phi_3) * d2
            hs = (hs + [h])[-2:]
        if hook is not None:
            x = hook(x, nxt.t)
    return x
