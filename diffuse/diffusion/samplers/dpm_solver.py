"""The DPM-Solver++ family, Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): the multistep data-prediction solvers of the probability-flow ODE, second order
(dpm_solver, Algorithm 2, eq. 9-10) and third order (dpm_solver_3m, section 3.3 and the appendix), and their SDE
variants (dpm_solver_2m_sde, dpm_solver_3m_sde, the appendix's SDE-DPM-Solver++), which are the same updates with
a decay and a noise term. One network evaluation per step.

Notation (paper -> code): lambda_t = log(alpha_t / sigma_t) -> Level.lam (alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t)); x_theta(x_{t_{i-1}}, t_{i-1}) -> m0, and the two stored ones before it -> m1,
m2; h = lambda_{t_i} - lambda_{t_{i-1}}, and h_0, h_1 the two previous steps (newest first).

The exact solution of the probability-flow ODE in data prediction (eq. 8),
    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_theta(x_lambda, lambda) dlambda,
with x_theta expanded to second order in lambda about lambda_s integrates to
    x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1 x_theta + alpha_t phi_2 h x_theta' - alpha_t phi_3 h^2 x_theta''
    phi_1 = expm1(-h),  phi_2 = phi_1 / h + 1,  phi_3 = phi_2 / h - 1/2
(phi_3 h^2 = -int_0^h e^(u - h) u^2 / 2 du carries the Taylor term's 1/2). The multistep methods estimate the
derivatives from the stored data predictions by backward divided differences in lambda:
    r0 = h_0 / h,  r1 = h_1 / h
    2M:  x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i phi_1 D_i,   D_i = (1 + 1/(2 r0)) m0 - 1/(2 r0) m1
    3M:  D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1
         D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)        ~ h x_theta'
         D2 = 2 (D1_0 - D1_1) / (r0 + r1)                ~ h^2 x_theta''
         x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i phi_1 m0 + alpha_i phi_2 D1 - alpha_i phi_3 D2
D2 is normalised as in the paper's singlestep third-order update (an estimate of h^2 x_theta''). Implementations
of the multistep update that take D2 = (D1_0 - D1_1) / (r0 + r1), h^2 x_theta'' / 2, get half the
third-order term and a solver of order 2 (measured on the Gaussian flow of tests/unit/diffusion/samplers/test_dpm_solvers.py).

SDE variants, with eta between the reverse SDE (eta = 1) and the probability-flow ODE (eta = 0). Every member of
the family
    dx = [f(t) x - (1 + eta) / 2 g(t)^2 grad log p_t(x)] dt + sqrt(eta) g(t) dw   (reverse time)
has the data's marginals; eta = 1 is the reverse SDE (Song et al. 2021, eq. 6), eta = 0 the probability-flow
ODE (their eq. 13), and larger eta injects more fresh noise per step. In data prediction its linear part
integrates exactly, as in the paper's SDE-DPM-Solver++ (there eta = 1):
    x_t = (sigma_t / sigma_s) e^(-eta h) x_s
          + (1 + eta) alpha_t int_{lambda_s}^{lambda_t} e^(-(1 + eta)(lambda_t - lambda)) x_theta(x_lambda, lambda) dl
          + sigma_t sqrt(1 - e^(-2 eta h)) z,   z ~ N(0, I) from `generator`     (dl: dlambda).
Expanding x_theta as above, the integral is alpha_t times (H = (1 + eta) h, and phi_k at H)
    -phi_1(H) x_theta + phi_2(H) h x_theta' - phi_3(H) h^2 x_theta'',
so the SDE updates are the 3M one (`_step`) with phi_k at H, the factor e^(-eta h) on x and the noise added:
    2M:  x_i = (sigma_i / sigma_{i-1}) e^(-eta h) x_{i-1} - alpha_i phi_1(H) (m0 + (m0 - m1) / (2 r0)) + noise
         (the paper's SDE-DPM-Solver++(2M): its D_i in place of x_theta)
    3M:  x_i = (sigma_i / sigma_{i-1}) e^(-eta h) x_{i-1} - alpha_i phi_1(H) m0 + alpha_i phi_2(H) D1
               - alpha_i phi_3(H) D2 + noise
With eta = 0 these are dpm_solver and dpm_solver_3m (dpm_solver_3m exactly; dpm_solver to rounding, as it forms
D_i first, the way Algorithm 2 writes it).

Warm start: the first step is first order (DDIM), 3M's second the 2M update. The step after the last timestep
goes to clean data (sigma = 0, lambda = inf, where the update is x = D) and is x = m0, without noise: first order,
the usual choice since h is infinite there. `lower_order_final` (fewer than 15 steps) takes the step before it
first order and the one before that second order: at most as many history terms as steps remain (stabler at
very few steps), so with 5 or fewer timesteps 3M is 2M exactly.
`afs` (analytic first step; Zhou et al. 2024, "Fast ODE-based sampling for diffusion models in around 5
steps", section 3.3): at the noisiest level alpha ~ 0 and sigma ~ 1, so x_T is itself the noise prediction;
the first evaluation is skipped and eps := x_T.
NFE = number of timesteps (one less with afs).
"""

from __future__ import annotations

import functools
import math

import torch

from diffuse.diffusion.noise import randn_like
from diffuse.diffusion.samplers.common import Level, Run, check_flag, check_percentile, multistep, sampler
from diffuse.validate import check_number


def step_order(i: int, n: int, lower_order_final: bool, max_order: int = 3) -> int:
    """The order of step i of n (the step to clean data, i = n - 1, is not asked): the history it has, and with
    lower_order_final below 15 steps no more than the steps that remain."""
    order = min(max_order, i + 1)
    if lower_order_final and n < 15:
        order = min(order, n - 1 - i)
    return order


def _first_order(x, cur: Level, nxt: Level, h: float, eta: float, d: torch.Tensor) -> torch.Tensor:
    """The step with x_theta held at d: (sigma_t / sigma_s) e^(-eta h) x_s - alpha_t phi_1((1 + eta) h) d."""
    return (nxt.sigma / cur.sigma * math.exp(-eta * h)) * x - (nxt.alpha * math.expm1(-((1 + eta) * h))) * d


def _step_2m(x, ms: list, hs: list, h: float, cur: Level, nxt: Level, order: int) -> torch.Tensor:
    """dpm_solver's update, D_i formed first as Algorithm 2 writes it (it rounds apart from `_step` at order 2)."""
    d = ms[-1]
    if order == 2:
        r = hs[-1] / h
        d = (1 + 1 / (2 * r)) * ms[-1] - (1 / (2 * r)) * ms[-2]
    return _first_order(x, cur, nxt, h, 0.0, d)


def _step(x, ms: list, hs: list, h: float, cur: Level, nxt: Level, order: int, eta: float = 0.0, generator=None):
    """The 3M update (its lower orders the warm start), with the SDE variants' decay and noise when eta > 0."""
    m0 = ms[-1]
    big_h = (1 + eta) * h
    phi_1 = math.expm1(-big_h)
    x = _first_order(x, cur, nxt, h, eta, m0)
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
    return x


def _solve(run: Run, update, max_order: int, lower_order_final, dynamic_percentile, afs) -> torch.Tensor:
    """The family's loop: `update(x, ms, hs, h, cur, nxt, order)` with ms the last three data predictions
    (newest last) and hs the steps in lambda that led to the two before m0."""
    dynamic_percentile = check_percentile(dynamic_percentile)
    lower_order_final = check_flag("lower_order_final", lower_order_final)
    afs = check_flag("afs", afs)
    n = len(run.timesteps)
    ms: list[torch.Tensor] = []
    hs: list[float] = []

    def step(i, x, x0, eps, cur, nxt):
        nonlocal ms, hs
        h = nxt.lam - cur.lam
        ms = (ms + [x0])[-3:]
        x = update(x, ms, hs, h, cur, nxt, step_order(i, n, lower_order_final, max_order))
        hs = (hs + [h])[-2:]
        return x

    return multistep(run, step, afs=afs, dynamic_percentile=dynamic_percentile)


def _ode_member(name: str, update, max_order: int):
    def core(run: Run, *, lower_order_final: bool = True, dynamic_percentile: float = 0.0, afs: bool = False):
        return _solve(run, update, max_order, lower_order_final, dynamic_percentile, afs)

    return sampler(core, name=name)


def _sde_member(name: str, max_order: int):
    def core(
        run: Run,
        *,
        eta: float = 1.0,
        lower_order_final: bool = True,
        dynamic_percentile: float = 0.0,
        afs: bool = False,
    ):
        eta = float(check_number("sampler.eta", eta, minimum=0))
        update = functools.partial(_step, eta=eta, generator=run.generator)
        return _solve(run, update, max_order, lower_order_final, dynamic_percentile, afs)

    return sampler(core, name=name)


dpm_solver = _ode_member("dpm_solver", _step_2m, 2)
dpm_solver_3m = _ode_member("dpm_solver_3m", _step, 3)
dpm_solver_2m_sde = _sde_member("dpm_solver_2m_sde", 2)
dpm_solver_3m_sde = _sde_member("dpm_solver_3m_sde", 3)
