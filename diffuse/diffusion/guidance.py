"""Classifier-free guidance, Ho & Salimans 2022 (eq. 6 in the eps form), as a denoiser -> denoiser wrapper.

    eps_guided = eps_null + s (eps_cond - eps_null)

s = 0 is the unconditional model, s = 1 the conditional one, s > 1 pushes samples toward the class. The
conditional and null passes run as ONE batched forward (the batch concatenated with itself, the second half
labelled `null_label`). Options:
    interval  (t_lo, t_hi): guide only for timesteps t_lo <= t <= t_hi, elsewhere use eps_cond
              (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval").
    rescale   phi in [0, 1]: Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"),
              eq. 15-16, in x0 space: x0_r = x0_guided * std(x0_cond) / std(x0_guided) per sample, then
              x0 = phi x0_r + (1 - phi) x0_guided. Needs the schedule to move between eps and x0.
Because it is a denoiser, it works with every sampler and with inpainting hooks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from diffuse.diffusion.schedule import Schedule, coefficients
from diffuse.errors import UserError


def check_guidance(scale, interval=None, rescale=0.0, schedule: Optional[Schedule] = None):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise UserError(f"guidance.scale={scale!r} is not allowed: it must be a finite number >= 0")
    if interval is not None:
        if not isinstance(interval, Sequence) or len(interval) != 2 or not all(isinstance(v, (int, float)) for v in interval) or interval[0] > interval[1]:
            raise UserError(f"guidance.interval={interval!r} is not allowed: give [t_lo, t_hi] with t_lo <= t_hi, or null")
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1:
        raise UserError(f"guidance.rescale={rescale!r} is not allowed: it must be in [0, 1]")
    if rescale > 0 and schedule is None:
        raise UserError("guidance.rescale > 0 needs the schedule (to convert eps to x0)")


def cfg_denoiser(denoiser, scale: float, null_label: int, interval=None, rescale: float = 0.0, schedule: Optional[Schedule] = None):
    """A denoiser computing eps_null + scale (eps_cond - eps_null); unlabelled calls (y=None) pass through."""
    check_guidance(scale, interval, rescale, schedule)
    scale = float(scale)

    def guided(x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
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
