"""Adaptive-step DPM-Solver-12 / DPM-Solver-23, Lu et al. 2022 ("DPM-Solver: A Fast ODE Solver for Diffusion
Probabilistic Model Sampling in Around 10 Steps"), section 4 and appendix C (the adaptive step size algorithm),
written in data prediction as in DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", section 4), the form of the other
solvers here.

The probability-flow ODE in lambda = log(alpha / sigma) (alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t))
has the exact solution from s to t (h = lambda_t - lambda_s, D = x0_hat as a function of lambda)

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda D(lambda) dlambda
        = (sigma_t / sigma_s) x_s + alpha_t (c1 D_s + c2 D'_s + c3 D''_s + ...)          (Taylor in lambda)
    c1 = 1 - e^-h,  c2 = h - 1 + e^-h,  c3 = 1 - h + h^2/2 - e^-h                    (c_k = h^k phi_k(-h))

Each attempted step from s to t = lambda_s + h is a pair of singlestep solvers sharing their evaluations:

  order 2 (DPM-Solver-12), r1 = 1/2:  D_s at s; u1 = first-order step to s1 = lambda_s + r1 h; D_1 = D(u1, s1)
      x_low  = (sigma_t / sigma_s) x_s + alpha_t c1 D_s                                     (first order)
      x_high = x_low + alpha_t (c2 / (r1 h)) (D_1 - D_s)                                     (second order)
  order 3 (DPM-Solver-23), r1 = 1/3, r2 = 2/3: D_s; u1 as above; D_1; u2 = second-order step to s2 (from D_s,
      D_1); D_2 = D(u2, s2). With d_k = D_k - D_s ~ r_k h D' + (r_k h)^2 D'' / 2:
      x_low  = second-order step to t from D_s, D_1                                        (second order)
      h D'   ~ (r2 d_1 / r1 - r1 d_2 / r2) / (r2 - r1),   h^2 D'' ~ 2 (d_2 / r2 - d_1 / r1) / (r2 - r1)
      x_high = (sigma_t / sigma_s) x_s + alpha_t (c1 D_s + (c2 / h) h D' + (c3 / h^2) h^2 D'')  (third order;
               r2 = 2/3 is what makes the first-order u1 harmless at this order, as in the paper's DPM-Solver-3)

Step control (the paper's algorithm; Hairer, Norsett & Wanner, "Solving ODEs I", II.4, for the norm):

    delta = max(atol, rtol max(|x_low|, |x_prev|))    elementwise; x_prev: x_low of the last accepted step (x_T first)
    E     = sqrt(mean(((x_high - x_low) / delta)^2))  per sample (RMS)
    accept when E <= 1 (x := x_high, the higher-order result); in either case h := theta h E^(-1/order), theta = 0.9,
    capped at what is left of the interval.

It integrates from timesteps[0] to timesteps[-1] (the timesteps in between are ignored: only the interval's ends
count) and then takes the usual last step to clean data, x0_hat at timesteps[-1].

NFE: every attempted step costs `order` evaluations (2 or 3), rejected attempts included (a retry re-evaluates
at s rather than keeping that evaluation), plus 1 for the final x0_hat: NFE = order * attempts + 1, at most
`max_nfe`; when the budget would be exceeded before the end the run stops with a UserError. NFE is what the
tolerance asks for, so count it (the pipeline wraps the denoiser in a counter); it is not known beforehand.

Batch vs. per-sample control. With per_sample=false the batch is one ODE system: the error is the max over the
images of their RMS errors, and the whole batch accepts or rejects each step, so image i depends (by about the
tolerance) on the other images of its batch. With per_sample=true (the default) each image has its own lambda,
step size and accept/reject, by masking, so image i depends only on its own x_T (the project's "image i depends
only on (seed, i)"). Every call still evaluates the whole batch, each image at its own timestep (images already
at the end are evaluated there and ignored), so that the network sees one shape; the calls counted are then
those of the slowest image of the batch. A step hook (inpainting) is called after each accepted step with the
timestep the batch now sits at; per-sample control puts the images at different timesteps, so it cannot call a
hook for a batch of more than one image and refuses (use per_sample=false).

Order 3 is the default: on the default mixture it keeps the sample std within 5% at 49-61 NFE where order 2
leaves the narrowest component (std 0.05) 15% short at 39-53 NFE, per-sample control at rtol 0.1-0.02.

Notation: lam ~ lambda; D_s, D_1, D_2 ~ the paper's x_theta(x, s), x_theta(u_1, s_1), x_theta(u_2, s_2); h ~ h_i;
x_low / x_high ~ the paper's lower- and higher-order solutions; theta, atol, rtol as in the paper.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffuse.diffusion.samplers.common import (
    Level,
    Run,
    batch_time,
    check_flag,
    check_order,
    check_percentile,
    data_prediction,
    sampler,
    threshold_x0,
    time_list,
)
from diffuse.diffusion.schedule import Schedule
from diffuse.errors import UserError
from diffuse.validate import check_number

THETA = 0.9  # safety factor of the step-size update (the paper's theta)
SNAP = 1e-9  # a step that ends this close (in lambda) to the interval's end ends on it exactly
E_FLOOR = 1e-12  # an error estimate of exactly 0 would ask for an infinite step


class _Control(NamedTuple):
    """The step-size control's options, checked."""

    order: int
    rtol: float
    atol: float
    h_init: float
    max_nfe: int
    per_sample: bool


@sampler
def adaptive(
    run: Run,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    max_nfe: int = 1000,
    per_sample: bool = True,
    dynamic_percentile: float = 0.0,
) -> torch.Tensor:
    order = check_order(order, (2, 3))
    control = _Control(
        order,
        float(check_number("sampler.rtol", rtol, minimum=0)),
        float(check_number("sampler.atol", atol, minimum=0, exclusive_min=True)),
        float(check_number("sampler.h_init", h_init, minimum=0, exclusive_min=True)),
        check_number("sampler.max_nfe", max_nfe, minimum=order + 1, integer=True),
        check_flag("per_sample", per_sample),
    )
    dynamic_percentile = check_percentile(dynamic_percentile)
    ts = time_list(run.timesteps)
    if not ts:
        return run.x_T
    if run.hook is not None and control.per_sample and run.x_T.shape[0] > 1:
        raise UserError(
            "sampler.per_sample=true cannot be used with a step hook (inpainting) on a batch of more than one "
            "image: its images sit at different timesteps; set sampler.per_sample=false"
        )

    start, end = Level(ts[0], run.schedule), Level(ts[-1], run.schedule)
    x = run.x_T
    if end.lam > start.lam + SNAP:
        x, _ = _integrate(run, x, start, end, control, dynamic_percentile)
    x0, _ = data_prediction(run.denoiser, x, end, run.y, run.clip_x0, dynamic_percentile)
    return run.hooked(x0, -1)


class _Levels:
    """Per-sample noise levels (B,) in float64 on the CPU: timestep, alpha, sigma, lambda."""

    __slots__ = ("t", "alpha", "sigma", "lam")

    def __init__(self, t, alpha, sigma, lam):
        self.t, self.alpha, self.sigma, self.lam = t, alpha, sigma, lam

    @classmethod
    def full(cls, level: Level, n: int) -> _Levels:
        f = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
        return cls(f(level.t), f(level.alpha), f(level.sigma), f(level.lam))

    @classmethod
    def at(cls, lam: torch.Tensor, end: Level, schedule: Schedule) -> _Levels:
        """The levels at log-SNR `lam` (the end exactly when within SNAP of it); alpha and sigma are those of the
        timestep the denoiser is handed, so that the solver and the network agree on where x is."""
        t = schedule.t_from_sigma(torch.exp(-lam.clamp(max=end.lam)))
        ab = schedule.alpha_bar_at(t)
        alpha, sigma = ab.sqrt(), (1 - ab).clamp(min=0).sqrt()
        got = torch.log(alpha / sigma)
        snap = lam >= end.lam - SNAP
        pick = lambda v, e: torch.where(snap, torch.full_like(v, float(e)), v)  # noqa: E731
        return cls(pick(t, end.t), pick(alpha, end.alpha), pick(sigma, end.sigma), pick(got, end.lam))

    def where(self, mask: torch.Tensor, other: _Levels) -> _Levels:
        return _Levels(
            *(
                torch.where(mask, a, b)
                for a, b in zip(
                    (self.t, self.alpha, self.sigma, self.lam), (other.t, other.alpha, other.sigma, other.lam)
                )
            )
        )


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) float64 coefficient, broadcast against x in x's dtype and device."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _first_order(x, cur: _Levels, to: _Levels, d_s, hh):
    """x at `to` from x at `cur` and D_s, hh = lambda_to - lambda_cur (DPM-Solver++ first order = DDIM)."""
    return _col(to.sigma / cur.sigma, x) * x + _col(to.alpha * -torch.expm1(-hh), x) * d_s


def _second_order(x, cur: _Levels, to: _Levels, d_s, d_1, hh, r1h):
    """... with D_1 taken r1h past cur as well: the D' term with its exact coefficient c2 = h^2 phi_2(-h)."""
    c2 = hh + torch.expm1(-hh)
    return _first_order(x, cur, to, d_s, hh) + _col(to.alpha * c2 / r1h, x) * (d_1 - d_s)


def step_pair(D, x, cur: _Levels, nxt: _Levels, schedule: Schedule, end: Level, order: int, moving: torch.Tensor):
    """One attempted step cur -> nxt: (x_low, x_high), the embedded lower- and higher-order solutions, from
    `order` calls of D(u, levels) -> x0_hat. Rows where `moving` is false stay put (their calls see x at cur)."""
    hh = torch.where(moving, nxt.lam - cur.lam, torch.ones_like(cur.lam))  # 1: a harmless stand-in for rows at rest
    keep = _col(moving, x).bool()
    mids, rs = [], []
    for r in (0.5,) if order == 2 else (1 / 3, 2 / 3):
        m = _Levels.at(cur.lam + r * hh, end, schedule).where(moving, cur)
        mids.append(m)  # the r actually taken: that of the timestep the network is handed
        rs.append(torch.where(moving, (m.lam - cur.lam) / hh, torch.full_like(hh, r)))
    d_s = D(x, cur)
    u1 = torch.where(keep, _first_order(x, cur, mids[0], d_s, rs[0] * hh), x)
    d_1 = D(u1, mids[0])
    if order == 2:
        return _first_order(x, cur, nxt, d_s, hh), _second_order(x, cur, nxt, d_s, d_1, hh, rs[0] * hh)
    r1, r2 = rs
    u2 = torch.where(keep, _second_order(x, cur, mids[1], d_s, d_1, r2 * hh, r1 * hh), x)
    d_2 = D(u2, mids[1])
    x_low = _second_order(x, cur, nxt, d_s, d_1, hh, r1 * hh)
    g1, g2 = d_1 - d_s, d_2 - d_s
    hd1 = _col((r2 / r1) / (r2 - r1), x) * g1 - _col((r1 / r2) / (r2 - r1), x) * g2  # ~ h D'
    hd2 = _col(2 / (r2 * (r2 - r1)), x) * g2 - _col(2 / (r1 * (r2 - r1)), x) * g1  # ~ h^2 D''
    c2 = hh + torch.expm1(-hh)
    c3 = -(torch.expm1(-hh) + hh - hh**2 / 2)  # 1 - h + h^2/2 - e^-h, summed so that it keeps its digits at small h
    x_high = (
        _first_order(x, cur, nxt, d_s, hh) + _col(nxt.alpha * c2 / hh, x) * hd1 + _col(nxt.alpha * c3 / hh**2, x) * hd2
    )
    return x_low, x_high


def _data_model(run: Run, x: torch.Tensor, start: Level, end: Level, dynamic_percentile: float):
    """D(u, levels) -> x0_hat, each image at its own level."""

    def times(lv: _Levels):
        # One timestep for the whole batch keeps the caller's type (an integer end stays an integer step).
        if bool((lv.t == lv.t[0]).all()):
            t0 = float(lv.t[0])
            for py in (start.t, end.t):
                if float(py) == t0:
                    return batch_time(py, x)
            return batch_time(t0, x)
        return lv.t.to(x.device)

    def D(u, lv: _Levels):
        eps = run.denoiser(u, times(lv), run.y)
        return threshold_x0((u - _col(lv.sigma, u) * eps) / _col(lv.alpha, u), run.clip_x0, dynamic_percentile)

    return D


def _step_error(x_low, x_high, x_prev, control: _Control, active: torch.Tensor, nxt: _Levels) -> torch.Tensor:
    """E per image (B,) on the CPU: the RMS of the embedded pair's difference over delta, 0 for images at rest,
    the batch's largest for every moving image under batch control."""
    delta = torch.maximum(torch.full_like(x_low, control.atol), control.rtol * torch.maximum(x_low.abs(), x_prev.abs()))
    err = ((x_high - x_low) / delta).flatten(1).to(torch.float64).pow(2).mean(1).sqrt().cpu()
    err = torch.where(active, err, torch.zeros_like(err))
    if not bool(torch.isfinite(err).all()):
        i = int((~torch.isfinite(err)).nonzero()[0, 0])
        raise UserError(
            f"sampler adaptive: the denoiser gave non-finite values (image {i}, near t={float(nxt.t[i]):.4g}), "
            "so no step size can be chosen"
        )
    return err if control.per_sample else torch.where(active, err.max(), err)


def _integrate(run: Run, x, start: Level, end: Level, control: _Control, dynamic_percentile: float):
    """x at `end` from x at `start` by accepted steps, and the NFE spent."""
    D = _data_model(run, x, start, end, dynamic_percentile)
    order, B = control.order, x.shape[0]
    cur = _Levels.full(start, B)
    h = torch.full((B,), min(control.h_init, end.lam - start.lam), dtype=torch.float64)
    done = torch.zeros(B, dtype=torch.bool)
    x_prev = x
    nfe = 0
    while not bool(done.all()):
        if nfe + order + 1 > control.max_nfe:
            i = int((~done).nonzero()[0, 0])
            raise UserError(
                f"sampler.max_nfe={control.max_nfe} was spent before the end of the interval (image {i} at lambda "
                f"{float(cur.lam[i]):.3g} of {end.lam:.3g}): raise it, or loosen sampler.rtol / sampler.atol"
            )
        active = ~done
        # Images that are done stay at the end: evaluated there (one batch shape for the network) and ignored.
        nxt = _Levels.at(torch.where(active, cur.lam + h, cur.lam), end, run.schedule).where(active, cur)
        x_low, x_high = step_pair(D, x, cur, nxt, run.schedule, end, order, active)
        nfe += order
        err = _step_error(x_low, x_high, x_prev, control, active, nxt)
        accept = active & (err <= 1)
        acc = _col(accept, x).bool()
        hh = nxt.lam - cur.lam
        x = torch.where(acc, x_high, x)
        x_prev = torch.where(acc, x_low, x_prev)
        cur = nxt.where(accept, cur)
        done = done | (accept & (cur.lam >= end.lam))
        h = torch.minimum(THETA * hh * err.clamp(min=E_FLOOR) ** (-1.0 / order), end.lam - cur.lam)
        if run.hook is not None and bool(accept.any()):
            # Every image moved together here (batch control, or a batch of one): one timestep for all.
            x = run.hook(x, end.t if bool(done.all()) else float(cur.t[0]))
    return x, nfe
