"""Small helpers shared by the sampler loops."""

from __future__ import annotations

import math

import torch

from diffuse.diffusion.schedule import Schedule


def step_pairs(timesteps: torch.Tensor, schedule: Schedule):
    """(t, t_next, alpha_bar_t, alpha_bar_next) along a decreasing timestep sequence (integer or fractional);
    the step after the last goes to t_next = -1, alpha_bar = 1 (clean data), DDIM's alpha_0 := 1 convention."""
    ts = time_list(timesteps)
    for i, t in enumerate(ts):
        nxt = ts[i + 1] if i + 1 < len(ts) else -1
        yield t, nxt, alpha_bar_of(schedule, t), alpha_bar_of(schedule, nxt)


def predict_x0(eps: torch.Tensor, x: torch.Tensor, ab_t: float, clip_x0: bool) -> torch.Tensor:
    x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
    return x0.clamp(-1, 1) if clip_x0 else x0


def time_list(timesteps: torch.Tensor) -> list:
    """The timesteps as Python numbers: ints for an integer tensor, floats for fractional ones."""
    if timesteps.dtype.is_floating_point:
        return [float(t) for t in timesteps]
    return [int(t) for t in timesteps]


def batch_time(t, x: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor of timestep t: long for an integer step, float64 for a fractional one."""
    if isinstance(t, int):
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)


def alpha_bar_of(schedule: Schedule, t) -> float:
    """alpha_bar at one timestep (integer or fractional) as a float64 Python number; 1 at t = -1 (clean data)."""
    if isinstance(t, int) and t < 0:
        return 1.0
    if isinstance(t, int):
        return float(schedule.alpha_bar[t])
    return float(schedule.alpha_bar_at(torch.tensor([float(t)], dtype=torch.float64))[0])


def sigma_of(schedule: Schedule, t) -> float:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level of x_t / sqrt(alpha_bar_t)."""
    ab = alpha_bar_of(schedule, t)
    return ((1 - ab) / ab) ** 0.5


THRESHOLDS = ("none", "clip", "dynamic")


def threshold_x0(x0: torch.Tensor, clip_x0: bool, dynamic_percentile: float = 0.0) -> torch.Tensor:
    """Static clipping to [-1, 1], or dynamic thresholding (Saharia et al. 2022, section 2.3): per sample,
    s = max(1, the `dynamic_percentile` quantile of |x0|), then x0 -> clamp(x0, -s, s) / s."""
    if dynamic_percentile and dynamic_percentile > 0:
        flat = x0.flatten(1).abs().to(torch.float32)
        s = torch.quantile(flat, float(dynamic_percentile), dim=1).clamp(min=1.0).to(x0.dtype)
        s = s.reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    return x0.clamp(-1, 1) if clip_x0 else x0


def check_percentile(p) -> float:
    from diffuse.errors import UserError

    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p < 1):
        raise UserError(f"sampler.dynamic_percentile={p!r} is not allowed: it must be in [0, 1) (0 turns it off)")
    return float(p)


def ode_steps(
    denoiser, x_T, timesteps, schedule, *, second_order: bool, y, clip_x0: bool, dynamic_percentile: float, hook
):
    """The loop shared by euler and heun (Karras et al. 2022, Algorithm 1 with S_churn = 0): it works on
    x~ = x_t / sqrt(alpha_bar_t) and hands the denoiser (and the hook) x_t = x~ / sqrt(1 + sigma^2)."""
    ts = time_list(timesteps)

    def to_d(xs, t, sigma):  # dx~/dsigma = (x~ - x0_hat) / sigma
        scale = (1 + sigma**2) ** -0.5  # sqrt(alpha_bar_t)
        x_t = xs * scale
        eps = denoiser(x_t, batch_time(t, x_t), y)
        if not clip_x0 and not dynamic_percentile:
            return eps
        x0 = threshold_x0(xs - sigma * eps, clip_x0, dynamic_percentile)
        return (xs - x0) / sigma

    if not ts:
        return x_T
    sigma = sigma_of(schedule, ts[0])
    xs = x_T * (1 + sigma**2) ** 0.5
    for i, t in enumerate(ts):
        nxt = ts[i + 1] if i + 1 < len(ts) else -1
        sigma_n = sigma_of(schedule, nxt) if i + 1 < len(ts) else 0.0
        d = to_d(xs, t, sigma)
        x_next = xs + (sigma_n - sigma) * d
        if second_order and sigma_n > 0:
            d2 = to_d(x_next, nxt, sigma_n)
            x_next = xs + (sigma_n - sigma) * 0.5 * (d + d2)
        xs, sigma = x_next, sigma_n
        if hook is not None:
            x_t = hook(xs * (1 + sigma**2) ** -0.5, nxt)
            xs = x_t * (1 + sigma**2) ** 0.5
    return xs


class Level:
    """One noise level of a solver's path, as float64 Python numbers: x_t = alpha x_0 + sigma eps with
    alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t), and the half log-SNR lambda = log(alpha / sigma)
    (the exponential integrators' time, Lu et al. 2022). The clean end is t = -1: alpha 1, sigma 0, lambda inf."""

    __slots__ = ("t", "alpha", "sigma", "lam")

    def __init__(self, t, schedule: Schedule):
        ab = alpha_bar_of(schedule, t)
        self.t = t
        self.alpha, self.sigma = ab**0.5, max(1.0 - ab, 0.0) ** 0.5
        self.lam = float("inf") if self.sigma == 0 else math.log(self.alpha / self.sigma)

    @property
    def clean(self) -> bool:
        return self.sigma == 0.0


def levels(timesteps: torch.Tensor, schedule: Schedule) -> list[Level]:
    """The levels a solver visits: each timestep, then the clean end (t = -1)."""
    return [Level(t, schedule) for t in time_list(timesteps)] + [Level(-1, schedule)]


def data_prediction(denoiser, x: torch.Tensor, level: Level, y, clip_x0: bool, dynamic_percentile: float = 0.0):
    """(x0_hat, eps_hat) of the denoiser at `level`, x0 thresholded as the options ask (eps kept consistent
    with it, so that solvers written in either prediction agree)."""
    eps = denoiser(x, batch_time(level.t, x), y)
    x0 = (x - level.sigma * eps) / level.alpha
    if clip_x0 or dynamic_percentile:
        x0 = threshold_x0(x0, clip_x0, dynamic_percentile)
        eps = (x - level.alpha * x0) / level.sigma
    return x0, eps


def check_flag(name: str, value) -> bool:
    from diffuse.errors import UserError

    if not isinstance(value, bool):
        raise UserError(f"sampler.{name}={value!r} is not allowed: true or false")
    return value


def check_order(value, allowed: tuple[int, ...]) -> int:
    from diffuse.errors import UserError

    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise UserError(f"sampler.order={value!r} is not allowed: choose one of {', '.join(map(str, allowed))}")
    return value
