"""Guidance as denoiser -> denoiser wrappers: classifier-free guidance (Ho & Salimans 2022) and classifier guidance
(Dhariwal & Nichol 2021).

Classifier-free guidance, eq. 6 of Ho & Salimans in the eps form:

    eps_guided = eps_null + s (eps_cond - eps_null)

s = 0 is the unconditional model, s = 1 the conditional one, s > 1 pushes samples toward the class. The
conditional and null passes run as ONE batched forward (the batch concatenated with itself, the second half
labelled `null_label`). Options:
    interval  (t_lo, t_hi): guide only for timesteps t_lo <= t <= t_hi, elsewhere use eps_cond
              (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval").
    rescale   phi in [0, 1]: Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"),
              eq. 15-16, in x0 space: x0_r = x0_guided * std(x0_cond) / std(x0_guided) per sample, then
              x0 = phi x0_r + (1 - phi) x0_guided. Needs the schedule to move between eps and x0.

Classifier guidance adds s grad_x log p(y | x_t) to the score, -eps / sqrt(1 - alpha_bar_t) (Dhariwal & Nichol,
Algorithm 2, their eq. 14):

    eps_guided = eps - sqrt(1 - alpha_bar_t) s grad_x log p(y | x_t)                       (mode eps)

Since p(x_t) p(y | x_t) = p(x_t | y) p(y), at s = 1 an unconditional eps becomes the conditional one exactly,
whatever the sampler. Their Algorithm 1 moves the ancestral step's mean instead, mu + s Sigma grad (mode mean):
written here as the eps shift that moves the DDPM step's mean by exactly that, for the steps of one timestep list.

Because they are denoisers, both work with every sampler and with inpainting hooks, and they compose: classifier
guidance wraps a classifier-free-guided denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffuse.diffusion.schedule import Schedule, coefficients
from diffuse.errors import UserError

CLASSIFIER_MODES = ("eps", "mean")


def check_guidance(scale, interval=None, rescale=0.0, schedule: Schedule | None = None):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise UserError(f"guidance.scale={scale!r} is not allowed: it must be a finite number >= 0")
    if interval is not None:
        if (
            not isinstance(interval, Sequence)
            or len(interval) != 2
            or not all(isinstance(v, (int, float)) for v in interval)
            or interval[0] > interval[1]
        ):
            raise UserError(
                f"guidance.interval={interval!r} is not allowed: give [t_lo, t_hi] with t_lo <= t_hi, or null"
            )
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1:
        raise UserError(f"guidance.rescale={rescale!r} is not allowed: it must be in [0, 1]")
    if rescale > 0 and schedule is None:
        raise UserError("guidance.rescale > 0 needs the schedule (to convert eps to x0)")


def cfg_denoiser(
    denoiser, scale: float, null_label: int, interval=None, rescale: float = 0.0, schedule: Schedule | None = None
):
    """A denoiser computing eps_null + scale (eps_cond - eps_null); unlabelled calls (y=None) pass through."""
    check_guidance(scale, interval, rescale, schedule)
    scale = float(scale)

    def guided(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None or scale == 1.0:
            return denoiser(x_t, t, y)
        null = torch.full_like(y, null_label)
        # eps_null alone is the answer only when nothing else needs eps_cond: outside the interval the output is
        # eps_cond, and the rescale takes its std from x0_cond.
        if scale == 0.0 and interval is None and rescale == 0:
            return denoiser(x_t, t, null)
        b = x_t.shape[0]
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        eps_c, eps_u = both[:b], both[b:]
        eps = eps_u + scale * (eps_c - eps_u)
        if rescale > 0:
            a, s = coefficients(schedule, t, x_t)
            x0_c, x0_g = (x_t - s * eps_c) / a, (x_t - s * eps) / a
            dims = tuple(range(1, x_t.dim()))
            ratio = x0_c.std(dim=dims, keepdim=True) / x0_g.std(dim=dims, keepdim=True).clamp(min=1e-12)
            x0 = rescale * x0_g * ratio + (1 - rescale) * x0_g
            eps = (x_t - a * x0) / s
        if interval is not None:
            inside = ((t >= interval[0]) & (t <= interval[1])).reshape(-1, *([1] * (x_t.dim() - 1)))
            eps = torch.where(inside, eps, eps_c)
        return eps

    return guided


def classifier_guided(
    denoiser, grad: Callable, scale: float, schedule: Schedule, *, interval=None, factors: dict | None = None
):
    """A denoiser computing eps - scale c_t grad(x_t, t, y), grad(x_t, t, y) = grad_x log p(y | x_t) (the classifier);
    c_t = sqrt(1 - alpha_bar_t), or with `factors` ({timestep: c_t}, mean_shift_factors) the ancestral mean's.
    Unlabelled calls (y=None) and scale 0 pass through; outside `interval` the classifier is not asked."""
    check_guidance(scale, interval)
    scale = float(scale)

    def guided(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        eps = denoiser(x_t, t, y)
        if y is None or scale == 0.0:
            return eps
        shape = (-1, *([1] * (x_t.dim() - 1)))
        if factors is None:
            c = (1 - schedule.alpha_bar_at(t.to(x_t.device))).sqrt()
        else:
            c = torch.tensor([factors[step_key(v)] for v in t.tolist()], dtype=torch.float64, device=x_t.device)
        if interval is not None:
            c = torch.where((t >= interval[0]) & (t <= interval[1]), c, 0.0)
        return eps - (scale * c).to(eps.dtype).reshape(shape) * grad(x_t, t, y).to(eps.dtype)

    return guided


def step_key(t) -> float:
    return round(float(t), 9)


def mean_shift_factors(timesteps: torch.Tensor, schedule: Schedule, variance: str) -> dict:
    """{t: c_t} such that eps - s c_t g moves the mean of the ancestral step t -> t_next (samplers.ddpm_step, over
    `timesteps`, with its `variance`) by exactly s Sigma_t g. The step's mean is A x0_hat + B x_t with
    x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) and A = sqrt(ab_s) beta / (1 - ab_t), beta = 1 - ab_t / ab_s, so
    d mean / d eps = -A sqrt(1 - ab_t) / sqrt(ab_t), and c_t = Sigma_t sqrt(ab_t (1 - ab_t)) / (sqrt(ab_s) beta).
    At the last step (to clean data) Sigma is the one that step would add (0 for beta_tilde)."""
    from diffuse.diffusion.samplers.common import step_pairs

    out = {}
    for t, _, ab_t, ab_s in step_pairs(timesteps, schedule):
        beta = 1 - ab_t / ab_s
        var = beta if variance == "beta" else beta * (1 - ab_s) / (1 - ab_t)
        out[step_key(t)] = var * (ab_t * (1 - ab_t)) ** 0.5 / (ab_s**0.5 * beta)
    return out
