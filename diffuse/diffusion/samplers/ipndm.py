"""iPNDM, the improved pseudo numerical method of Zhang & Chen 2022 ("Fast Sampling of Diffusion Models with
Exponential Integrator", appendix on PNDM / iPNDM): PNDM's linear multistep update on the noise prediction with
its Runge-Kutta warm start replaced by lower-order multistep steps, so that every step costs one evaluation.

Notation: x_t = alpha x_0 + sigma eps (alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t)); the EDM
variables (the paper's rho-parametrisation) x~ = x_t / alpha and sigma~ = sigma / alpha turn the
probability-flow ODE into dx~/dsigma~ = eps(x_t, t), whose Euler step is DDIM. iPNDM replaces eps in that
step by the Adams-Bashforth combination of the last q outputs eps_i, eps_{i-1}, ... (q = min(order, i + 1)):

    q = 1:  eps_i
    q = 2:  (3 eps_i - eps_{i-1}) / 2
    q = 3:  (23 eps_i - 16 eps_{i-1} + 5 eps_{i-2}) / 12
    q = 4:  (55 eps_i - 59 eps_{i-1} + 37 eps_{i-2} - 9 eps_{i-3}) / 24
    x~_{i+1} = x~_i + (sigma~_{i+1} - sigma~_i) eps'

These are the constant-step coefficients, used as the paper does whatever the spacing. Once warm, a step on
levels uniform in sigma~ has local error O(h^(q+1)); on other spacings the step-size changes add an O(h^3)
term, and the first-order warm-up step leaves a global O(h^2) error of its own, so as the steps shrink the
global order is 2 for every order >= 2 (tests/unit/diffusion/samplers/test_unipc_ipndm_deis.py measures it). The higher orders still pay
off at few steps, where the constants matter more than the rate.
The step after the last timestep goes to clean data, sigma~ = 0, first order as every solver here: the output
is x0_hat = x~ - sigma~ eps at the last level. NFE = number of timesteps (one fewer with `afs`: at the first
level eps := x_T).
`afs` is the analytic first step of Zhou et al. 2024 ("Fast ODE-based sampling for diffusion models in around
5 steps", section 3.3).
"""

from __future__ import annotations

import torch

from diffuse.diffusion.samplers.common import Run, check_flag, check_order, multistep, sampler

# Adams-Bashforth coefficients, newest output first.
AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@sampler
def ipndm(run: Run, *, order: int = 4, afs: bool = False) -> torch.Tensor:
    order = check_order(order, (1, 2, 3, 4))
    afs = check_flag("afs", afs)
    history = []  # the last `order` eps, newest first

    def step(i, x, x0, eps, cur, nxt):
        history[:] = [eps] + history[: order - 1]
        d = sum(c * e for c, e in zip(AB[len(history)], history))
        return nxt.alpha * (x / cur.alpha + (nxt.sigma / nxt.alpha - cur.sigma / cur.alpha) * d)

    return multistep(run, step, afs=afs)
