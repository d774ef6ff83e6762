"""SDE-DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"), the appendix's SDE variant of DPM-Solver++, and its third-order multistep version (3M), with eta
between the reverse SDE (eta = 1) and the probability-flow ODE (eta = 0). One network evaluation per step.

Notation as in dpm_solver.py and dpm_solver_3m.py: lambda_t = log(alpha_t / sigma_t) (alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t)); m0, m1, m2 the data predictions x_theta at the current level and the two
before it; h = lambda_{t_i} - lambda_{t_{i-1}}, h_0, h_1 the previous steps, r0 = h_0 / h, r1 = h_1 / h.

Every member of the family
    dx = [f(t) x - (1 + eta) / 2 g(t)^2 grad log p_t(x)] dt + sqrt(eta) g(t) dw   (reverse time)
has the data's marginals; eta = 1 is the reverse SDE (Song et al. 2021, eq. 6), eta = 0 the probability-flow
ODE (their eq. 13), and larger eta injects more fresh noise per step. In data prediction its linear part
integrates exactly, as in the paper's SDE-DPM-Solver++ (there eta = 1):
    x_t = (sigma_t / sigma_s) e^(-eta h) x_s + (1 + eta) alpha_t int_{lambda_s}^{lambda_t} e^(-(1 + eta)(lambda_t - lambda))
          x_theta(x_lambda, lambda) dlambda + sigma_t sqrt(1 - e^(-2 eta h)) z,   z ~ N(0, I).
Expanding x_theta in lambda about lambda_s, the integral is alpha_t times (H = (1 + eta) h, and phi_k as in
dpm_solver_3m.py but at H)
    -phi_1(H) x_theta + phi_2(H) h x_theta' - phi_3(H) h^2 x_theta'',
    phi_1(H) = expm1(-H),  phi_2(H) = phi_1(H) / H + 1,  phi_3(H) = phi_2(H) / H - 1/2,
and the multistep methods estimate h x_theta' and h^2 x_theta'' from the stored predictions:
    2M:  x_i = (sigma_i / sigma_{i-1}) e^(-eta h) x_{i-1} - alpha_i phi_1(H) (m0 + (m0 - m1) / (2 r0)) + noise
         (the paper's SDE-DPM-Solver++(2M): D_i = (1 + 1/(2 r0)) m0 - 1/(2 r0) m1 in place of x_theta)
    3M:  x_i = (sigma_i / sigma_{i-1}) e^(-eta h) x_{i-1} - alpha_i phi_1(H) m0 + alpha_i phi_2(H) D1
               - alpha_i phi_3(H) D2 + noise,
         D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),  D2 = 2 (D1_0 - D1_1) / (r0 + r1),
         D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1                        (dpm_solver_3m.py)
With eta = 0 these are dpm_solver and dpm_solver_3m exactly (H = h, no noise). Warm start and
`lower_order_final` as there: first step first order, 3M's second step the 2M update; below 15 steps the last
steps lower their order to the steps that remain. The step after the last timestep goes to clean data
(sigma = 0) and is x = m0, without noise. The noise is drawn from `generator`. `afs`: the analytic first
step (Zhou et al. 2024, section 3.3), eps := x_T at the first level.
NFE = number of timesteps (one less with afs).
"""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.noise import Generator, randn_like
from diffuse.diffusion.samplers.common import check_flag, check_percentile, data_prediction, levels
from diffuse.diffusion.samplers.dpm_solver import analytic_first_step
from diffuse.diffusion.samplers.dpm_solver_3m import step_order
from diffuse.diffusion.schedule import Schedule
from diffuse.validate import check_number


def _multistep_sde(
    denoiser,
    x_T,
    timesteps,
    schedule,
    *,
    max_order,
    eta,
    lower_order_final,
    dynamic_percentile,
    afs,
    generator,
    y,
    clip_x0,
    hook,
):
    eta = float(check_number("sampler.eta", eta, minimum=0))
    dynamic_percentile = check_percentile(dynamic_percentile)
    lower_order_final = check_flag("lower_order_final", lower_order_final)
    afs = check_flag("afs", afs)
    path = levels(timesteps, schedule)
    n = len(path) - 1
    x = x_T
    ms: list[torch.Tensor] = []
    hs: list[float] = []
    for i in range(n):
        cur, nxt = path[i], path[i + 1]
        model = analytic_first_step if afs and i == 0 else denoiser
        m0, _ = data_prediction(model, x, cur, y, clip_x0, dynamic_percentile)
        ms = (ms + [m0])[-3:]
        if nxt.clean:
            x = m0
        else:
            h = nxt.lam - cur.lam
            big_h = (1 + eta) * h
            phi_1 = math.expm1(-big_h)
            order = step_order(i, n, lower_order_final, max_order)
            x = (nxt.sigma / cur.sigma * math.exp(-eta * h)) * x - (nxt.alpha * phi_1) * m0
            if order == 2:
                r0 = hs[-1] / h
                x = x - (nxt.alpha * phi_1 / (2 * r0)) * (m0 - ms[-2])
            elif order == 3:
                r0, r1 = hs[-1] / h, hs[-2] / h
                phi_2 = phi_1 / big_h + 1
                phi_3 = phi_2 / big_h - 0.5
                d1_0 = (m0 - ms[-2]) / r0
                d1_1 = (ms[-2] - ms[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (2 / (r0 + r1)) * (d1_0 - d1_1)
                x = x + (nxt.alpha * phi_2) * d1 - (nxt.alpha * phi_3) * d2
            if eta > 0:
                x = x + (nxt.sigma * math.sqrt(-math.expm1(-2 * eta * h))) * randn_like(x, generator)
            hs = (hs + [h])[-2:]
        if hook is not None:
            x = hook(x, nxt.t)
    return x


@torch.no_grad()
def dpm_solver_2m_sde(
    denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    eta: float = 1.0,
    lower_order_final: bool = True,
    dynamic_percentile: float = 0.0,
    afs: bool = False,
    generator: Generator = None,
    y=None,
    clip_x0: bool = False,
    hook=None,
) -> torch.Tensor:
    return _multistep_sde(
        denoiser,
        x_T,
        timesteps,
        schedule,
        max_order=2,
        eta=eta,
        lower_order_final=lower_order_final,
        dynamic_percentile=dynamic_percentile,
        afs=afs,
        generator=generator,
        y=y,
        clip_x0=clip_x0,
        hook=hook,
    )


@torch.no_grad()
def dpm_solver_3m_sde(
    denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    eta: float = 1.0,
    lower_order_final: bool = True,
    dynamic_percentile: float = 0.0,
    afs: bool = False,
    generator: Generator = None,
    y=None,
    clip_x0: bool = False,
    hook=None,
) -> torch.Tensor:
    return _multistep_sde(
        denoiser,
        x_T,
        timesteps,
        schedule,
        max_order=3,
        eta=eta,
        lower_order_final=lower_order_final,
        dynamic_percentile=dynamic_percentile,
        afs=afs,
        generator=generator,
        y=y,
        clip_x0=clip_x0,
        hook=hook,
    )
