"""Noise schedules and the Gaussian forward process of DDPM (Ho et al. 2020).

Notation follows the paper, with timesteps indexed from 0: index t here is the paper's t+1.
    beta_t        variance added at step t
    alpha_t       1 - beta_t
    alpha_bar_t   prod_{s<=t} alpha_s           q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    sigma_t       sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level of x_t / sqrt(alpha_bar_t)
    snr_t         alpha_bar_t / (1 - alpha_bar_t)

Everything is computed in float64 once and cast to the data's dtype where it meets data.
Timesteps may be fractional (continuous-time samplers); alpha_bar between integer steps is interpolated
linearly in log-SNR, which is exact at the integers and monotone in between. Below the first step, fractional
t in [-1, 0) continues the schedule to clean data: 1 - alpha_bar = (1 + t)(1 - alpha_bar_0), from 0 at t = -1
(the DDPM convention alpha_bar_{-1} = 1) to the first step's noise at t = 0. Samplers never go there; the
likelihood ODE does, because the data's density is the one at zero noise.
"""

from __future__ import annotations

import math

import torch

from diffuse.errors import UserError
from diffuse.validate import refuse

SCHEDULES = ("linear", "cosine", "sigmoid")


class Schedule:
    """A discrete noise schedule: every table is float64 on the CPU, copied once to each device that asks."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64)
        self.T = int(betas.shape[0])
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.log_snr = torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)
        # sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the EDM/k-diffusion noise level.
        self.sigmas = torch.exp(-0.5 * self.log_snr)
        # beta-tilde_t of Ho et al. eq. 7; 0 at t=0.
        self.posterior_variance = self.betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        self._on_device: dict = {}

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at timesteps t in [0, T-1] (integer or fractional; fractional t in [-1, 0) gives the
        extension to clean data, and any t < 0 is clean data, alpha_bar = 1), float64, on t's device."""
        if not t.dtype.is_floating_point:
            # A plain index would wrap t = -1 (the samplers' "clean data") round to alpha_bar_{T-1}, the
            # noisiest level. torch.where keeps this free of host-device syncs: it runs at every step.
            t = t.long()
            ab = self.table("alpha_bar", t.device)
            return torch.where(t < 0, 1.0, ab[t.clamp(min=0)])
        t = t.to(torch.float64).clamp(-1, self.T - 1)
        tp = t.clamp(min=0)
        lo = tp.floor().long()
        hi = (lo + 1).clamp(max=self.T - 1)
        w = tp - lo
        ls = self.table("log_snr", t.device)
        ab = torch.sigmoid((1 - w) * ls[lo] + w * ls[hi])
        below = 1 - (1 + t) * (1 - self.table("alpha_bar", t.device)[0])
        return torch.where(t < 0, below, ab)

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of sigma(t): the fractional timestep whose noise level is sigma (log-SNR interpolation;
        sigma below sigma_0 maps into the extension t in [-1, 0))."""
        sigma = sigma.to(torch.float64).cpu()
        below = (sigma**2 / (1 + sigma**2)) / (1 - self.alpha_bar[0]) - 1
        lam = -2.0 * torch.log(sigma)
        ls = self.log_snr  # decreasing in t
        lam = lam.clamp(ls[-1], ls[0])
        rev = ls.flip(0)  # increasing, as searchsorted needs
        idx = torch.searchsorted(rev, lam).clamp(1, self.T - 1)
        lo_val, hi_val = rev[idx - 1], rev[idx]
        pos = (idx - 1) + (lam - lo_val) / (hi_val - lo_val)
        return torch.where(sigma < self.sigmas[0], below.clamp(min=-1), (self.T - 1) - pos)


def _in_open_unit(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise refuse(f"schedule.{name}", value, "it must be in (0, 1)")


def _finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise refuse(f"schedule.{name}", value, "it must be a finite number")


def make_schedule(
    kind: str = "linear",
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    sigmoid_start: float = -3.0,
    sigmoid_end: float = 3.0,
    sigmoid_tau: float = 1.0,
    max_beta: float = 0.999,
    scale_with_T: bool = True,
) -> Schedule:
    """Betas of the named schedule, every one in (0, max_beta] with max_beta < 1: a beta of 1 makes alpha_bar 0
    (x_T carries no signal and x0 = x_t / 0), a beta <= 0 makes alpha_bar >= 1 and the noise variance <= 0.

    linear   linspace(beta_start, beta_end, T), times 1000/T when scale_with_T (Nichol & Dhariwal's convention:
             the parameters are stated for T = 1000); scale_with_T=false is the exact linspace, as diffusers has it.
    """
    # One level leaves nothing to step between: every sampler's step count would have to be 1 and T at once.
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise refuse("schedule.T", T, "it must be an integer >= 2 (the number of noise levels)")
    _in_open_unit("max_beta", max_beta)
    if kind == "linear":
        betas, params = _linear_betas(T, beta_start, beta_end, scale_with_T, max_beta)
    elif kind == "cosine":
        betas, params = _cosine_betas(T, cosine_s, max_beta)
    elif kind == "sigmoid":
        betas, params = _sigmoid_betas(T, sigmoid_start, sigmoid_end, sigmoid_tau, max_beta)
    else:
        raise refuse("schedule.kind", kind, f"choose one of {', '.join(SCHEDULES)}")
    _check_betas(betas, kind, params, max_beta)
    return Schedule(betas=betas)


def _linear_betas(T: int, beta_start, beta_end, scale_with_T, max_beta: float) -> tuple[torch.Tensor, dict]:
    _in_open_unit("beta_start", beta_start)
    _in_open_unit("beta_end", beta_end)
    if not isinstance(scale_with_T, bool):
        raise refuse("schedule.scale_with_T", scale_with_T, "it must be true or false")
    # Ho et al. use 1e-4..0.02 for T=1000; scaling by 1000/T keeps the end point's noise level for other T
    # (Nichol & Dhariwal 2021, section 2.3 footnote), and is the identity at T=1000.
    scale = 1000.0 / T if scale_with_T else 1.0
    # Clipped like the others: at very small T the scaled end point would pass 1 (a negative alpha).
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64).clamp(max=max_beta)
    return betas, {"beta_start": beta_start, "beta_end": beta_end}


def _cosine_betas(T: int, cosine_s, max_beta: float) -> tuple[torch.Tensor, dict]:
    _finite("cosine_s", cosine_s)
    # s < 0 puts f's maximum inside the schedule: alpha_bar would rise above 1 before it falls.
    if cosine_s < 0:
        raise refuse("schedule.cosine_s", cosine_s, "it must be >= 0")
    # Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    # betas clipped at max_beta to avoid the singularity at t = T.
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return _betas_of(f / f[0], max_beta), {"cosine_s": cosine_s}


def _sigmoid_betas(T: int, start, end, tau, max_beta: float) -> tuple[torch.Tensor, dict]:
    for name, v in (("sigmoid_start", start), ("sigmoid_end", end), ("sigmoid_tau", tau)):
        _finite(name, v)
    # alpha_bar must fall with t: the sigmoid's argument has to rise from start to end.
    if not start < end:
        raise refuse("schedule.sigmoid_start", start, f"it must be below schedule.sigmoid_end={end!r}")
    if not tau > 0:
        raise refuse("schedule.sigmoid_tau", tau, "it must be > 0")
    # Jabri et al. 2022 / Chen 2023: alpha_bar follows a shifted, rescaled sigmoid in t.
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    v0 = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v1 = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    out = torch.sigmoid((steps * (end - start) + start) / tau)
    params = {"sigmoid_start": start, "sigmoid_end": end, "sigmoid_tau": tau}
    return _betas_of((v1 - out) / (v1 - v0), max_beta), params


def _betas_of(ab: torch.Tensor, max_beta: float) -> torch.Tensor:
    """The betas of alpha_bar given at t = 0..T (ab[0] = 1, before the first step), clipped at max_beta."""
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def _check_betas(betas: torch.Tensor, kind: str, params: dict, max_beta: float) -> None:
    # The parameter checks leave only float64 rounding (e.g. a sigmoid saturated over a stretch of t, where
    # alpha_bar stops changing) to give a beta outside (0, max_beta].
    bad = torch.nonzero(~((betas > 0) & (betas <= max_beta)))
    if bad.numel():
        i = int(bad[0, 0])
        given = ", ".join(f"schedule.{k}={v!r}" for k, v in params.items())
        raise UserError(
            f"{given} is not allowed for schedule.kind={kind}: it gives beta_{i}={float(betas[i])!r}, "
            f"outside (0, schedule.max_beta={max_beta!r}]"
        )


def coefficients(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at timesteps t, shaped to broadcast against `like`."""
    ab = schedule.alpha_bar_at(t.to(like.device))
    shape = (-1, *([1] * (like.dim() - 1)))
    return ab.sqrt().to(like.dtype).reshape(shape), (1 - ab).sqrt().to(like.dtype).reshape(shape)


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) in closed form (Ho et al. eq. 4): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    a, s = coefficients(schedule, t, x0)
    return a * x0 + s * noise


def posterior(
    schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0), Ho et al. eq. 6-7.

    mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
           + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    var  = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    """
    t = t.cpu().long()
    # There is no x_{t-1} below clean data, and a negative index would wrap round to the noisiest level.
    if bool((t < 0).any()):
        raise ValueError(f"posterior q(x_(t-1) | x_t, x_0) needs timesteps t >= 0, got {int(t.min())}")
    ab, ab_prev, beta = schedule.alpha_bar[t], schedule.alpha_bar_prev[t], schedule.betas[t]
    c0 = ab_prev.sqrt() * beta / (1 - ab)
    ct = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    var = schedule.posterior_variance[t]
    shape = (-1, *([1] * (x0.dim() - 1)))

    def cast(v: torch.Tensor) -> torch.Tensor:
        return v.to(device=x0.device, dtype=x0.dtype).reshape(shape)

    return cast(c0) * x0 + cast(ct) * x_t, cast(var)
