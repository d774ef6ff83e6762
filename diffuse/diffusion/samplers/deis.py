"""DEIS with the time-based Adams-Bashforth method (tAB-DEIS), Zhang & Chen 2022 ("Fast Sampling of Diffusion
Models with Exponential Integrator": the exponential integrator on eps with high-order polynomial
extrapolation of eps in t, their tAB-DEIS).

Notation: x_t = alpha x_0 + sigma eps (alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t)). The
exponential integrator solves the linear part of the probability-flow ODE exactly; with x~ = x_t / alpha and
sigma~ = sigma / alpha (the paper's Psi(t, s) = alpha_t / alpha_s, and (1/2) Psi G G^T L^-T = alpha d(sigma~)/dtau)

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} int_{t_i}^{t_{i+1}} eps(tau) dsigma~/dtau dtau.

tAB-q replaces eps(tau) by its Lagrange polynomial in t through the last q levels t_i, t_{i-1}, ...,
t_{i-q+1} (q = min(order, i + 1), the lower-order warm start), which gives the multistep update

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} sum_j C_ij eps_{i-j},
    C_ij = int_{t_i}^{t_{i+1}} prod_{k != j} (tau - t_{i-k}) / (t_{i-j} - t_{i-k}) dsigma~/dtau dtau.

The C_ij are computed once per call in float64 by Gauss-Legendre quadrature on each unit interval of t, where
the schedule's alpha_bar_at interpolates log-SNR linearly and sigma~ is therefore an exact exponential (the
rule is exact up to rounding on each piece). The Lagrange basis sums to one, so sum_j C_ij = sigma~_{i+1} -
sigma~_i exactly; C_i0 takes the quadrature's remainder, which makes tAB-1 exactly DDIM (eta = 0).
The step after the last timestep goes to clean data, first order as every solver here: the output is x0_hat
at the last level. NFE = number of timesteps (one fewer with `afs`: at the first level eps := x_T).
`afs` is the analytic first step of Zhou et al. 2024 ("Fast ODE-based sampling for diffusion models in around
5 steps", section 3.3).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffuse.diffusion.samplers.common import Run, check_flag, check_order, multistep, sampler, time_list
from diffuse.diffusion.schedule import Schedule

_GAUSS = np.polynomial.legendre.leggauss(8)


def _dsigma_quadrature(schedule: Schedule, t_from: float, t_to: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes tau and weights w with sum_k w_k f(tau_k) = int_{t_from}^{t_to} f(tau) dsigma~/dtau dtau for
    polynomials f of low degree. On [j, j+1] log-SNR is linear, ls = ls_j + (tau - j) s, so
    sigma~ = exp(-ls / 2) and dsigma~/dtau = -(s / 2) sigma~."""
    ls = schedule.log_snr.numpy()
    lo_t, hi_t = min(t_from, t_to), max(t_from, t_to)
    cuts = np.arange(math.floor(lo_t) + 1, math.ceil(hi_t), dtype=np.float64)
    edges = np.concatenate([[lo_t], cuts, [hi_t]])
    a, b = edges[:-1], edges[1:]
    j = np.minimum(np.floor(0.5 * (a + b)), len(ls) - 2).astype(np.int64)
    slope = ls[j + 1] - ls[j]
    x, wq = _GAUSS
    tau = 0.5 * (b - a)[:, None] * x[None, :] + 0.5 * (a + b)[:, None]
    ls_tau = ls[j][:, None] + (tau - j[:, None]) * slope[:, None]
    w = 0.5 * (b - a)[:, None] * wq[None, :] * (-0.5 * slope[:, None]) * np.exp(-0.5 * ls_tau)
    sign = 1.0 if t_to >= t_from else -1.0
    return tau.ravel(), sign * w.ravel()


def tab_coefficients(schedule: Schedule, ts: list[float], order: int) -> list[list[float]]:
    """C_ij for each step i -> i+1 along the levels ts (all >= 0), newest level first."""
    coeffs = []
    for i in range(len(ts) - 1):
        nodes = [ts[i - j] for j in range(min(order, i + 1))]
        tau, w = _dsigma_quadrature(schedule, ts[i], ts[i + 1])
        row = []
        for j, tj in enumerate(nodes):
            basis = np.ones_like(tau)
            for k, tk in enumerate(nodes):
                if k != j:
                    basis = basis * (tau - tk) / (tj - tk)
            row.append(float(np.dot(w, basis)))
        coeffs.append(row)
    return coeffs


@sampler
def deis(run: Run, *, order: int = 3, afs: bool = False) -> torch.Tensor:
    order = check_order(order, (1, 2, 3))
    afs = check_flag("afs", afs)
    coeffs = tab_coefficients(run.schedule, [float(t) for t in time_list(run.timesteps)], order)
    history = []  # the last `order` eps, newest first

    def step(i, x, x0, eps, cur, nxt):
        history[:] = [eps] + history[: order - 1]
        c = coeffs[i]
        # sum_j C_ij = sigma~_{i+1} - sigma~_i exactly (the basis sums to one): C_i0 takes the remainder.
        c0 = (nxt.sigma / nxt.alpha - cur.sigma / cur.alpha) - sum(c[1:])
        d = c0 * history[0]
        for cj, e in zip(c[1:], history[1:]):
            d = d + cj * e
        return (nxt.alpha / cur.alpha) * x + nxt.alpha * d

    return multistep(run, step, afs=afs)
