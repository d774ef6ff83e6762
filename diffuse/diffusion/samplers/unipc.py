"""UniPC, Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"): the multistep UniP-p predictor with the UniC-p corrector, data prediction (x0_hat), B(h) variants.

Notation (paper -> here): alpha_t, sigma_t are the schedule's (x_t = alpha x_0 + sigma eps), lambda_t =
log(alpha_t / sigma_t) the half log-SNR, h_i = lambda_{t_i} - lambda_{t_{i-1}} > 0, x_theta the data prediction
(`x0`; the last `order` are kept in `outs`), r_m = (lambda_{t_{i-1-m}} - lambda_{t_{i-1}}) / h_i < 0 the ratios of the
previous levels and r_p = 1 for the corrector's new level, D_m = x_theta(t_{i-1-m}) - x_theta(t_{i-1}).

Integrating the data-prediction ODE exactly from t_{i-1} to t_i (variation of constants in lambda) and expanding
x_theta in lambda gives

    x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i sum_{k>=0} h^{k+1} phi_{k+1}(-h) x_theta^{(k)}(lambda_{i-1})

with phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z. The k = 0 term is DPM-Solver++(1) (= DDIM);
UniPC writes the rest with the differences D_m:

    x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i (1 - e^{-h}) x_theta_{i-1} + alpha_i B(h) sum_m a_m D_m / r_m

and the order conditions (Theorem 3.1, UniC-p; Corollary 3.2, UniP-p) are R_p a_p = g_p(h) / B(h) with the
Vandermonde matrix R_p[k, m] = r_m^(k-1) and g_k(h) = k! h phi_{k+1}(-h), k = 1..p (the paper's R_p(h_i) and
g_p(h_i) with their powers of h divided out of both sides):

  UniP-q (predictor, order q): the q-1 previous levels, a from the (q-1) x (q-1) system;
  UniC-q (corrector, order q+1): the same levels plus the new output x_theta(x~_i, t_i) at r = 1, a q x q
  system. The new output is the one the next step starts from, so the corrector costs no evaluation; the next
  step starts from the corrected x_i but keeps the output at the predicted point, as the paper's multistep
  UniPC algorithm does.

This is the data-prediction form of the paper's appendix: there the integral runs in -lambda, so B is taken at
-h and its sign flipped: variant "bh1" is B(h) = h and "bh2" is B(h) = 1 - e^{-h} (the paper's B(h) = e^h - 1 at
-h). When the system is solved exactly B cancels (B a = R^-1 g); it matters where the paper (and its code)
simplify the one-unknown systems (the order-2 predictor and the order-1 corrector) to a_1 = 1/2, which keeps
their order for any B(h) = h + O(h^2): there B a_1 = B(h) / 2.

Warm start: step i uses order min(order, i) (only i outputs exist yet); `lower_order_final` also lowers the
last steps to min(order, steps - i) when there are fewer than 15 timesteps (dpm_solver's rule, generalised).
The step after the last timestep goes to clean data (lambda = inf), first order as every solver here: the
output is x0_hat at the last level, taken at the corrected point with the last evaluation's eps,
x_0 = (x_{n-1} - sigma_{n-1} eps) / alpha_{n-1}; there is no corrector after it (it would need one more
evaluation). NFE = number of timesteps (one fewer with `afs`: at the first level eps := x_T).

`corrector=False` leaves UniP-p alone (Corollary 3.2, order p). UniP-2 with "bh2" is then DPM-Solver++(2M):
B(h) a_1 / r_1 = (1 - e^{-h}) / (2 r_1) is its coefficient 1 / (2 r) on the difference of x0_hat.
`afs` is the analytic first step of Zhou et al. 2024 ("Fast ODE-based sampling for diffusion models in around
5 steps", section 3.3).
"""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.samplers.common import (
    Level,
    Run,
    check_flag,
    check_order,
    check_percentile,
    levels,
    sampler,
    threshold_x0,
)
from diffuse.validate import check_choice

VARIANTS = ("bh1", "bh2")


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_j z^j / (j + k)!, the exponential integrators' functions (phi_0 = e^z). The recursion
    phi_{k+1} = (phi_k - 1/k!) / z cancels catastrophically for small z, so there the series is summed."""
    if abs(z) < 1.0:
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(40):
            total += term
            term *= z / (j + k + 1)
        return total
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    a = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return [float(v) for v in a]


def unipc_weights(h: float, rs: list[float], variant: str) -> list[float]:
    """B(h) a_m / r_m for the differences D_m at the ratios `rs` (Theorem 3.1's a_p, scaled so that the update
    is alpha_i sum_m w_m D_m). One difference: a_1 = 1/2 (the paper's simplification, where B(h) enters)."""
    if not rs:
        return []
    b = h if variant == "bh1" else -math.expm1(-h)
    if len(rs) == 1:
        return [b * 0.5 / rs[0]]
    p = len(rs)
    rows = [[r ** (k - 1) for r in rs] for k in range(1, p + 1)]
    g = [math.factorial(k) * h * phi(k + 1, -h) for k in range(1, p + 1)]
    return [ba / r for ba, r in zip(_solve(rows, g), rs)]


@sampler
def unipc(
    run: Run,
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    corrector: bool = True,
    afs: bool = False,
    dynamic_percentile: float = 0.0,
) -> torch.Tensor:
    order = check_order(order, (1, 2, 3))
    variant = check_choice("sampler.variant", variant, VARIANTS)
    lower_order_final = check_flag("lower_order_final", lower_order_final)
    corrector = check_flag("corrector", corrector)
    afs = check_flag("afs", afs)
    dynamic_percentile = check_percentile(dynamic_percentile)
    if len(run.timesteps) == 0:
        return run.x_T
    lv = levels(run.timesteps, run.schedule)
    n = len(lv) - 1  # timesteps; lv[n] is the clean end
    x = run.x_T
    x0, eps = run.predict(x, lv[0], dynamic_percentile, afs=afs)
    outs = [x0]  # x_theta at the last `order` levels, newest first, each taken at the predicted point
    for i in range(1, n):
        q = min(order, i)
        if lower_order_final and n < 15:
            q = min(q, n - i)
        x, x0, eps = _step(run, x, outs, lv, i, q, variant, corrector, dynamic_percentile)
        outs = [x0] + outs[: order - 1]
        x = run.hooked(x, lv[i].t)
    last = lv[n - 1]
    # x0_hat at the corrected point with the last eps: the predicted point's x0 shifted by the correction.
    x = (x - last.sigma * eps) / last.alpha
    if run.clip_x0 or dynamic_percentile:
        x = threshold_x0(x, run.clip_x0, dynamic_percentile)
    return run.hooked(x, -1)


def _combine(base: torch.Tensor, cur: Level, weights: list[float], ds: list[torch.Tensor]) -> torch.Tensor:
    """base + alpha_i sum_m w_m D_m: the update of the predictor and of the corrector."""
    x = base
    for w, d in zip(weights, ds):
        x = x + cur.alpha * w * d
    return x


def _step(run: Run, x, outs: list, lv: list[Level], i: int, q: int, variant: str, corrector: bool, percentile):
    """Level i - 1 -> i: UniP-q, the evaluation at the predicted point, and UniC-q with the output just computed
    (r = 1: no extra evaluation). Returns x_i and (x_theta, eps) at the predicted point."""
    prev, cur = lv[i - 1], lv[i]
    h = cur.lam - prev.lam
    rs = [(lv[i - 1 - m].lam - prev.lam) / h for m in range(1, q)]
    ds = [outs[m] - outs[0] for m in range(1, q)]
    base = (cur.sigma / prev.sigma) * x - cur.alpha * math.expm1(-h) * outs[0]
    x_pred = _combine(base, cur, unipc_weights(h, rs, variant), ds)
    x0, eps = run.predict(x_pred, cur, percentile)
    if not corrector:
        return x_pred, x0, eps
    return _combine(base, cur, unipc_weights(h, rs + [1.0], variant), ds + [x0 - outs[0]]), x0, eps
