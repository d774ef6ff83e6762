"""Editing real images with a diffusion model: SDEdit and DDIM-inversion editing.

SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations",
section 3 and Algorithm 1): perturb the image x to the level t0 in closed form,

    x_t0 = sqrt(alpha_bar_t0) x + sqrt(1 - alpha_bar_t0) eps,        t0 = strength * T

and run the reverse process from there. A reverse process that samples the model exactly draws from
q(x_0 | x_t0): the edit keeps what survives the noise (coarse layout, colours) and redraws the rest. strength 0
returns the image, strength 1 starts from pure noise and is plain sampling.

Inversion editing (Song et al. 2021, DDIM section 4.3; Mokady et al. 2023 on its use for editing): the
deterministic DDIM map is run backwards from the image to its latent x_t0 (`ddim_invert`, optionally with
fixed-point refinement), then forwards again with other conditioning (a label, a guidance scale). The plain
round trip (forwards with the conditioning it was inverted with) gives back the image up to the inversion's
error, which is what the edit is measured against.

Levels follow the codebase's 0-based timesteps (index t is the paper's t + 1): t0 = round(strength * T) - 1,
and -1 (clean data) means nothing to do. A sampler's own levels are truncated at t0 (SDEdit with N steps visits
the levels of N steps that lie below t0, as img2img pipelines do), so the NFE is about strength * steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffuse.diffusion.inpainting import paste
from diffuse.diffusion.samplers.common import batch_time
from diffuse.diffusion.schedule import Schedule, q_sample
from diffuse.errors import UserError


def check_strength(strength) -> float:
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not math.isfinite(strength)
        or not 0 <= strength <= 1
    ):
        raise UserError(
            f"edit.strength={strength!r} is not allowed: it must be a number in [0, 1] "
            "(0 returns the image, 1 ignores it)"
        )
    return float(strength)


def start_timestep(strength: float, T: int) -> int:
    """t0 for `strength` in [0, 1]: T - 1 (the noisiest level) at 1, -1 (the image itself) at 0."""
    return min(T, round(check_strength(strength) * T)) - 1


def truncate(timesteps: torch.Tensor, t0: int) -> torch.Tensor:
    """The levels a sampler visits when it starts at t0: t0, then those of `timesteps` below it (the same dtype:
    integer levels stay integers)."""
    below = timesteps[timesteps < t0]
    first = torch.tensor([t0], dtype=timesteps.dtype, device=timesteps.device)
    return torch.cat([first, below])


def perturb(schedule: Schedule, x0: torch.Tensor, t0: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t0 ~ q(x_t0 | x0) from the given noise (Ho et al. eq. 4)."""
    return q_sample(schedule, x0.to(noise.dtype).expand_as(noise), batch_time(t0, noise), noise)


def sdedit(
    sampler: Callable,
    denoiser,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    strength: float,
    noise: torch.Tensor,
    generator,
    y=None,
    hook=None,
    **options,
) -> torch.Tensor:
    """SDEdit of the images x0 (broadcast to noise's batch) with `sampler(denoiser, x, levels, schedule, ...)` over
    its `timesteps` truncated at t0. At strength 1 the start is `noise` itself and the levels are the sampler's
    own: exactly what sampling from that noise gives, whatever x0 is. At strength 0 x0 comes back untouched."""
    t0 = start_timestep(strength, schedule.T)
    if t0 < 0:
        return x0.to(noise.dtype).expand_as(noise).clone()
    if strength == 1.0:
        x, levels = noise, timesteps
    else:
        x, levels = perturb(schedule, x0, t0, noise), truncate(timesteps, t0)
    return sampler(denoiser, x, levels, schedule, generator=generator, y=y, hook=hook, **options)


def trajectory_hook(trajectory: dict, x0_known: torch.Tensor, keep: torch.Tensor) -> Callable:
    """A sampler step hook for masked inversion editing: the kept pixels follow the image's own inverted path
    (trajectory: level -> x at that level, recorded by ddim_invert's hook), so that the regenerated region sits
    on the latents the kept one came from; exact at the end. A level the inversion did not visit is left alone."""

    def hook(x: torch.Tensor, t_next) -> torch.Tensor:
        if t_next < 0:
            return paste(x, x0_known, keep)
        known = trajectory.get(t_next)
        return x if known is None else paste(x, known.to(x.dtype).expand_as(x), keep)

    return hook
