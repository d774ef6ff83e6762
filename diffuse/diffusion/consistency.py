"""Consistency models (Song et al. 2023, "Consistency Models"; Song & Dhariwal 2023, "Improved Techniques for
Training Consistency Models"; Geng et al. 2024, "Consistency Models Made Easy").

A consistency function maps any point of a probability-flow trajectory to its clean end. In the EDM variables of
the VP process (x~ = x_t / alpha_t, sigma = sigma_t / alpha_t, so that x~ = x_0 + sigma eps), with the network's own
clean-image prediction x0_net (whatever its prediction type), Song et al.'s parametrisation (their eq. 3 and
appendix C) is

    f(x_t, sigma) = c_skip(sigma) x~ + c_out(sigma) x0_net(x_t, t)
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),  c_out = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2)

so that f(x, sigma_min) = x~ exactly (the boundary condition), whatever the weights. Taking x0_net (rather than a raw
output) as the free part lets a diffusion network start as a consistency model: at high noise f is its denoiser.
sigma_min is the schedule's smallest noise level, sigma(t = 0).

Training pairs adjacent noise levels sigma_n < sigma_{n+1} of a discretisation (Karras et al.'s rho = 7 levels,
Song et al. eq. 5 with their N(k)) and pulls f(x_{n+1}) towards a target network's f at x_n, where x_n is one ODE
step of a teacher from x_{n+1} (distillation) or the same noise at the lower level (training from scratch).
"""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.prediction import PREDICTIONS, to_eps
from diffuse.diffusion.schedule import Schedule, coefficients
from diffuse.errors import UserError

LOSSES = ("l2", "pseudo_huber")


def skip_out(
    sigma: torch.Tensor, sigma_min: float, sigma_data: float, at_min=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(sigma), c_out(sigma) of Song et al. appendix C: exactly 1 and 0 at sigma_min (and wherever `at_min`:
    sigma recomputed from a timestep differs from sigma_min by rounding, which must not break the boundary)."""
    d = (sigma - sigma_min).clamp(min=0)
    if at_min is not None:
        d = torch.where(at_min, torch.zeros_like(d), d)
    return sigma_data**2 / (d**2 + sigma_data**2), sigma_data * d / (sigma_data**2 + sigma**2).sqrt()


def consistency_fn(
    net, prediction: str, schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, y=None, *, sigma_data: float = 0.5
) -> torch.Tensor:
    """f(x_t, t): the clean image the consistency model assigns to x_t at timestep t (differentiable)."""
    if prediction not in PREDICTIONS:
        raise UserError(f"objective.prediction={prediction!r} is not allowed: choose one of {', '.join(PREDICTIONS)}")
    a, s = coefficients(schedule, t, x_t)
    out = net(x_t, t, y).to(x_t.dtype)
    x0_net = (x_t - s * to_eps(prediction, out, x_t, a, s)) / a
    sigma = s / a
    at_min = (t.to(x_t.device) <= 0).reshape(sigma.shape)
    c_skip, c_out = skip_out(sigma, float(schedule.sigmas[0]), sigma_data, at_min)
    return c_skip * (x_t / a) + c_out * x0_net


class ConsistencyDenoiser:
    """A consistency model seen through the one denoiser interface: the eps whose x0 is f(x_t, t), so that any
    sampler that reads the denoiser's x0 (the consistency sampler, DDIM) uses f."""

    def __init__(self, net, prediction: str, schedule: Schedule, sigma_data: float = 0.5, autocast_dtype=None):
        self.net, self.prediction, self.schedule = net, prediction, schedule
        self.sigma_data, self.autocast_dtype = sigma_data, autocast_dtype

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x_t.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            f = consistency_fn(self.net, self.prediction, self.schedule, x_t, t, y, sigma_data=self.sigma_data)
        a, s = coefficients(self.schedule, t, x_t)
        return (x_t - a * f.to(x_t.dtype)) / s


def karras_levels(schedule: Schedule, n: int, rho: float = 7.0) -> torch.Tensor:
    """n noise levels sigma (float64, increasing) from sigma_min to sigma_max, Karras et al. eq. 5."""
    s_min, s_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (s_min ** (1 / rho) + ramp * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho


def ict_levels(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) of improved consistency training (Song & Dhariwal 2023, eq. 7): the number of levels doubles from s0 to
    s1 over the run, in log2(s1/s0) + 1 stages."""
    stages = math.floor(math.log2(s1 / s0)) + 1
    per_stage = max(1, math.floor(total / stages))
    return min(s0 * 2 ** (k // per_stage), s1) + 1


def cd_levels(k: int, total: int, s0: int = 2, s1: int = 150) -> int:
    """N(k) of consistency training/distillation (Song et al. 2023, appendix C): sqrt-growing from s0 to s1."""
    return math.ceil(math.sqrt(k / max(total, 1) * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def lognormal_indices(
    levels: torch.Tensor, n: int, generator: torch.Generator, p_mean: float = -1.1, p_std: float = 2.0
) -> torch.Tensor:
    """Indices i of the lower level of each pair (sigma_i, sigma_{i+1}), drawn with probability proportional to
    erf((log sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_i - P_mean) / (sqrt 2 P_std)): iCT's
    discretised log-normal (Song & Dhariwal 2023, section 3.5)."""
    log_s = levels.log()
    cdf = torch.erf((log_s - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp(min=0)
    if float(p.sum()) <= 0:
        p = torch.ones_like(p)
    return torch.multinomial(p.to(torch.float64), n, replacement=True, generator=generator)


def pair_distance(a: torch.Tensor, b: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample distance: mean squared error (l2), or iCT's pseudo-Huber sqrt(||a - b||^2 + c^2) - c with
    c = 0.00054 sqrt(d) for d dimensions (Song & Dhariwal 2023, section 3.3), divided by sqrt(d) to keep the
    per-element scale of l2."""
    d = a[0].numel()
    sq = (a.float() - b.float()).pow(2).flatten(1).sum(1)
    if loss == "l2":
        return sq / d
    if loss == "pseudo_huber":
        c = 0.00054 * math.sqrt(d)
        return ((sq + c * c).sqrt() - c) / math.sqrt(d)
    raise UserError(f"objective.loss={loss!r} is not allowed: choose one of {', '.join(LOSSES)}")


def t_of_sigma(schedule: Schedule, sigma: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each noise level sigma in [sigma_min, sigma_max], on sigma's device (the training
    step's levels: no trip to the host), by the schedule's log-SNR interpolation."""
    ls = schedule.table("log_snr", sigma.device)  # decreasing in t
    lam = (-2 * sigma.to(torch.float64).log()).clamp(float(ls[-1]), float(ls[0]))
    rev = ls.flip(0)
    idx = torch.searchsorted(rev, lam).clamp(1, schedule.T - 1)
    lo, hi = rev[idx - 1], rev[idx]
    return (schedule.T - 1) - ((idx - 1) + (lam - lo) / (hi - lo))


@torch.no_grad()
def heun_step(
    teacher, x: torch.Tensor, s_from: torch.Tensor, s_to: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, y=None
) -> torch.Tensor:
    """One Heun step of the teacher's probability-flow ODE in x~ = x_0 + sigma eps (Karras et al. 2022, Algorithm 1,
    the step samplers/heun.py takes), dx~/dsigma = eps, from sigma_from to sigma_to per sample: consistency
    distillation draws a different pair of levels for every example, which the samplers' shared levels cannot."""

    def shaped(v):
        return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def eps(x_tilde, s, t):
        return teacher(x_tilde / shaped((1 + s**2).sqrt()), t, y).to(x.dtype)

    h = shaped(s_to - s_from)
    d1 = eps(x, s_from, t_from)
    x_euler = x + h * d1
    d2 = eps(x_euler, s_to, t_to)
    return x + h * (d1 + d2) / 2
