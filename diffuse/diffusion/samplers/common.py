"""What the sampler loops share: the common call (`sampler`, `Run`), the level walks, the data prediction, the
one-evaluation multistep loop and the checks of the options every family takes."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from diffuse import validate
from diffuse.diffusion.noise import Generator
from diffuse.diffusion.schedule import Schedule
from diffuse.validate import refuse

# A step hook sees the state after each step and may change it (inpainting pastes the known region here):
#     hook(x, t_next) -> x, where t_next is the timestep x now belongs to (an int, or a float for fractional
#     timesteps), or -1 once x is the final x_0.
StepHook = Callable[[torch.Tensor, int], torch.Tensor] | None


class Run(NamedTuple):
    """The arguments every sampler takes besides its own options."""

    denoiser: Callable
    x_T: torch.Tensor
    timesteps: torch.Tensor
    schedule: Schedule
    generator: Generator
    y: Any
    clip_x0: bool
    hook: StepHook

    def hooked(self, x: torch.Tensor, t) -> torch.Tensor:
        """x after the step hook, which sees it at the timestep it now belongs to (-1: the final x_0)."""
        return x if self.hook is None else self.hook(x, t)

    def predict(self, x: torch.Tensor, level: Level, dynamic_percentile: float = 0.0, *, afs: bool = False):
        """(x0_hat, eps_hat) at `level` (data_prediction); with `afs` the analytic first step stands in for the
        network."""
        model = analytic_first_step if afs else self.denoiser
        return data_prediction(model, x, level, self.y, self.clip_x0, dynamic_percentile)


_P = inspect.Parameter
_HEAD = [_P(n, _P.POSITIONAL_OR_KEYWORD) for n in ("denoiser", "x_T", "timesteps", "schedule")]
_TAIL = [
    _P(n, _P.KEYWORD_ONLY, default=d) for n, d in (("generator", None), ("y", None), ("clip_x0", False), ("hook", None))
]


def sampler(core: Callable, *, name: str | None = None) -> Callable:
    """The public sampler of `core(run, *, <options>)`:
        fn(denoiser, x_T, timesteps, schedule, *, <options>, generator=None, y=None, clip_x0=False, hook=None) -> x_0,
    run without autograd. Its signature is the common arguments and core's options: the pipeline reads it to refuse
    config keys a sampler does not take. `name` renames a core made by a factory (a family's members)."""

    @functools.wraps(core)
    def fn(denoiser, x_T, timesteps, schedule, *, generator=None, y=None, clip_x0=False, hook=None, **options):
        with torch.no_grad():
            return core(Run(denoiser, x_T, timesteps, schedule, generator, y, clip_x0, hook), **options)

    if name is not None:
        fn.__name__ = fn.__qualname__ = name
    own = list(inspect.signature(core).parameters.values())[1:]
    fn.__signature__ = inspect.Signature([*_HEAD, *own, *_TAIL], return_annotation=torch.Tensor)
    return fn


def step_pairs(timesteps: torch.Tensor, schedule: Schedule):
    """(t, t_next, alpha_bar_t, alpha_bar_next) along a decreasing timestep sequence (integer or fractional);
    the step after the last goes to t_next = -1, alpha_bar = 1 (clean data), DDIM's alpha_0 := 1 convention."""
    ts = time_list(timesteps)
    for i, t in enumerate(ts):
        nxt = ts[i + 1] if i + 1 < len(ts) else -1
        yield t, nxt, alpha_bar_of(schedule, t), alpha_bar_of(schedule, nxt)


def sigma_steps(timesteps: torch.Tensor, schedule: Schedule) -> list[tuple]:
    """(t, t_next, sigma, sigma_next) along the timesteps in the sigma parametrization (Karras et al. 2022); the
    step after the last goes to sigma = 0, t_next = -1."""
    ts = time_list(timesteps)
    out = []
    for i, t in enumerate(ts):
        last = i + 1 == len(ts)
        nxt = -1 if last else ts[i + 1]
        out.append((t, nxt, sigma_of(schedule, t), 0.0 if last else sigma_of(schedule, nxt)))
    return out


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


def ode_steps(run: Run, *, second_order: bool, dynamic_percentile: float) -> torch.Tensor:
    """The loop shared by euler and heun (Karras et al. 2022, Algorithm 1 with S_churn = 0): it works on
    x~ = x_t / sqrt(alpha_bar_t) and hands the denoiser (and the hook) x_t = x~ / sqrt(1 + sigma^2)."""
    clip_x0 = run.clip_x0

    def to_d(xs, t, sigma):  # dx~/dsigma = (x~ - x0_hat) / sigma
        scale = (1 + sigma**2) ** -0.5  # sqrt(alpha_bar_t)
        x_t = xs * scale
        eps = run.denoiser(x_t, batch_time(t, x_t), run.y)
        if not clip_x0 and not dynamic_percentile:
            return eps
        x0 = threshold_x0(xs - sigma * eps, clip_x0, dynamic_percentile)
        return (xs - x0) / sigma

    steps = sigma_steps(run.timesteps, run.schedule)
    if not steps:
        return run.x_T
    xs = run.x_T * (1 + steps[0][2] ** 2) ** 0.5
    for t, nxt, sigma, sigma_n in steps:
        d = to_d(xs, t, sigma)
        x_next = xs + (sigma_n - sigma) * d
        if second_order and sigma_n > 0:
            d2 = to_d(x_next, nxt, sigma_n)
            x_next = xs + (sigma_n - sigma) * 0.5 * (d + d2)
        xs = x_next
        if run.hook is not None:
            x_t = run.hook(xs * (1 + sigma_n**2) ** -0.5, nxt)
            xs = x_t * (1 + sigma_n**2) ** 0.5
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


def analytic_first_step(x_t: torch.Tensor, t, y=None) -> torch.Tensor:
    """The denoiser AFS puts in place of the network at the first level (Zhou et al. 2024, "Fast ODE-based
    sampling for diffusion models in around 5 steps", section 3.3): at the noisiest level alpha ~ 0 and
    sigma ~ 1, so x_T is itself the noise prediction, eps_hat(x_T) = x_T."""
    return x_t


def multistep(run: Run, step: Callable, *, afs: bool, dynamic_percentile: float = 0.0) -> torch.Tensor:
    """The loop of the solvers that evaluate once per step (the DPM-Solver family, ipndm, deis): at each level
    the denoiser's (x0_hat, eps_hat), AFS in place of the network at the first when asked, then
    `step(i, x, x0_hat, eps_hat, cur, nxt) -> x` at the next level; the step to clean data is x0_hat itself, first
    order as every solver here. The hook sees x after every step."""
    path = levels(run.timesteps, run.schedule)
    x = run.x_T
    for i in range(len(path) - 1):
        cur, nxt = path[i], path[i + 1]
        x0, eps = run.predict(x, cur, dynamic_percentile, afs=afs and i == 0)
        x = x0 if nxt.clean else step(i, x, x0, eps, cur, nxt)
        x = run.hooked(x, nxt.t)
    return x


def check_percentile(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p < 1):
        raise refuse("sampler.dynamic_percentile", p, "it must be in [0, 1) (0 turns it off)")
    return float(p)


def check_flag(name: str, value) -> bool:
    """A sampler option's flag, named as the user sets it (sampler.NAME)."""
    return validate.check_flag(f"sampler.{name}", value)


def check_order(value, allowed: tuple[int, ...]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise refuse("sampler.order", value, f"choose one of {', '.join(map(str, allowed))}")
    return value
