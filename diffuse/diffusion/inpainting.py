"""Inpainting: fill the unknown pixels of an image given the known ones.

`keep` is a 0/1 tensor broadcastable to x (1 = known pixel, 0 = pixel to generate); `x0_known` holds the known
image in model space (its values under keep=0 are ignored).

replace   (Song et al. 2021, appendix I; Lugmayr et al. 2022 eq. 8) a step hook for any sampler: after each
          reverse step, the known pixels are replaced by a fresh sample of q(x_t | x_0 = known) at the timestep
          the state now belongs to; at the end they are pasted exactly.
repaint   (Lugmayr et al. 2022, section 4.2 and Algorithm 1) the same replacement, plus resampling: the reverse
          process is walked back up `jump_length` steps by the forward process
              x_t = sqrt(alpha_bar_t / alpha_bar_s) x_s + sqrt(1 - alpha_bar_t / alpha_bar_s) z      (s < t)
          and down again, `resamples` times in all at every jump point, so that the generated pixels have time
          to agree with the known ones. Where the jumps go matters (jump_last): measured against the exact
          conditional of a mixture, resampling near the clean end, where the known pixels are clear, is what
          corrects the component choice (bench/inpaint_table.py).
conditioned
          a network trained with random masks (objective.mask_training) that sees the clean known pixels and the
          mask as extra input channels (MaskConditioned), so it is a denoiser of the conditional itself; the
          replace hook still keeps x_t's known pixels on q(x_t | x_0), as in training, and pastes them at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from diffuse.diffusion.noise import Generator, randn_like
from diffuse.diffusion.samplers import STEPS
from diffuse.diffusion.samplers.common import alpha_bar_of, batch_time, time_list
from diffuse.diffusion.schedule import Schedule, q_sample
from diffuse.errors import UserError

METHODS = ("replace", "repaint", "conditioned")


def mask_context(x0_known: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """What a mask-conditioned network sees besides x_t: the known image with zeros where pixels are to be
    generated (C channels), then the generate mask (1 channel, 1 = generate). Nothing known: zeros and ones."""
    keep = keep.to(x0_known.dtype).expand(x0_known.shape[0], 1, *x0_known.shape[2:])
    return torch.cat([x0_known * keep, 1 - keep], dim=1)


class MaskConditioned:
    """A network trained with objective.mask_training (in_channels = 2C + 1) seen as F(x_t, t, y): the context
    (mask_context of the known image and keep mask) is concatenated to x_t. Without a context it is told that
    nothing is known, which is how `diffuse sample` draws from such a model."""

    def __init__(self, net, context: torch.Tensor | None = None):
        self.net = net
        self.context = context

    def with_known(self, x0_known: torch.Tensor, keep: torch.Tensor) -> MaskConditioned:
        return MaskConditioned(self.net, mask_context(x0_known, keep))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        ctx = self.context
        if ctx is None:
            b, _, h, w = x.shape
            ctx = torch.cat([torch.zeros(b, x.shape[1], h, w), torch.ones(b, 1, h, w)], dim=1)
        ctx = ctx.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return self.net(torch.cat([x, ctx], dim=1), t, y)


def require_mask_conditioned(denoiser) -> None:
    """Refuse the conditioned method for a denoiser that is not a network trained with masks."""
    if not isinstance(getattr(denoiser, "net", None), MaskConditioned):
        raise UserError(
            "inpaint.method=conditioned needs a model trained with objective.mask_training=true; "
            "this one was not: use inpaint.method=replace or repaint"
        )


def condition_on(denoiser, x0_known: torch.Tensor, keep: torch.Tensor):
    """The denoiser of a mask-conditioned network (a NetworkDenoiser, or an EDMDenoiser, over MaskConditioned) told
    the known pixels."""
    require_mask_conditioned(denoiser)
    # A copy with only the network swapped keeps whatever reads its output as eps (a prediction type, a
    # preconditioning) as it was.
    told = copy.copy(denoiser)
    told.net = denoiser.net.with_known(x0_known, keep)
    return told


def paste(x: torch.Tensor, x0_known: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The known pixels of x0_known, the others of x."""
    return torch.where(keep.bool(), x0_known.to(x.dtype), x)


def replace_hook(x0_known: torch.Tensor, keep: torch.Tensor, schedule: Schedule, generator: Generator) -> Callable:
    """A sampler step hook: known pixels := q(x_t | x0_known) at the step's timestep; exact at the end (t=-1)."""

    def hook(x: torch.Tensor, t_next: int) -> torch.Tensor:
        if t_next < 0:
            return paste(x, x0_known, keep)
        known_t = q_sample(schedule, x0_known.to(x.dtype).expand_as(x), batch_time(t_next, x), randn_like(x, generator))
        return paste(x, known_t, keep)

    return hook


def jump_points(steps: int, jump_length: int) -> range:
    """Every level RePaint may jump back up from (Lugmayr et al. 2022, Algorithm 1 and their code): levels
    1, 1 + jump_length, ... with r + jump_length <= steps. Their code's timestep index j in
    range(0, T - jump_length, jump_length) is level j + 1 here: index 0 is still one reverse step from clean.
    Level 0 is never one: the algorithm resamples only at t > 1, so the final output is not noised again."""
    return range(1, steps - jump_length + 1, jump_length)


def jump_schedule(steps: int, jump_length: int, resamples: int, jump_last: float = 1.0) -> list[int]:
    """The sequence of levels RePaint visits, as the number of reverse steps still to go (steps .. 0).

    Levels decrease by one on each reverse step. At every jump point r, the walk jumps back up to
    r + jump_length and comes down again, resamples - 1 times, so each stretch is traversed `resamples` times
    in all. Jump points are those of jump_points() that lie in the last `jump_last` fraction of the walk,
    r <= jump_last * steps: jump_last = 1 is Lugmayr et al.'s schedule (jumps all along), a small jump_last
    resamples only near the clean end, and 0 none at all (replace).
    """
    for name, v, lo in (("inpaint.jump_length", jump_length, 1), ("inpaint.resamples", resamples, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UserError(f"{name}={v!r} is not allowed: it must be an integer >= {lo}")
    if isinstance(jump_last, bool) or not isinstance(jump_last, (int, float)) or not 0 <= jump_last <= 1:
        raise UserError(f"inpaint.jump_last={jump_last!r} is not allowed: it must be a number in [0, 1]")
    # The tolerance keeps a point that jump_last * steps names but rounding misses: 0.29 * 100 is 28.999999999999996.
    points = [r for r in jump_points(steps, jump_length) if r <= jump_last * steps + 1e-9]
    return walk(steps, jump_length, {r: resamples - 1 for r in points})


def walk(steps: int, jump_length: int, jumps_left: dict[int, int]) -> list[int]:
    """The levels visited from `steps` down to 0, jumping back up by jump_length at level r while
    jumps_left[r] > 0 (consumed as it goes). The walk ends on reaching 0, so jump points are levels >= 1."""
    if any(n > 0 and not 1 <= r <= steps - jump_length for r, n in jumps_left.items()):
        raise ValueError(
            f"jump points must be levels in [1, steps - jump_length] = [1, {steps - jump_length}]: {sorted(jumps_left)}"
        )
    jumps_left = dict(jumps_left)
    levels, r = [steps], steps
    while r > 0:
        if jumps_left.get(r, 0) > 0:
            jumps_left[r] -= 1
            r += jump_length
        else:
            r -= 1
        levels.append(r)
    return levels


def repaint_nfe(steps: int, jump_length: int, resamples: int, jump_last: float = 1.0) -> int:
    """Number of denoiser evaluations RePaint makes: one per reverse move of the jump schedule."""
    levels = jump_schedule(steps, jump_length, resamples, jump_last)
    return sum(1 for a, b in zip(levels, levels[1:]) if b < a)


@torch.no_grad()
def repaint(
    denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    x0_known: torch.Tensor,
    keep: torch.Tensor,
    *,
    jump_length: int = 10,
    resamples: int = 3,
    jump_last: float = 1.0,
    step: str = "ddpm",
    generator: Generator = None,
    y=None,
    **step_options,
) -> torch.Tensor:
    """RePaint on a decreasing timestep sequence (any step count), with a sampler's single step as the reverse
    update (`step`: ddpm or ddim, with its options). Known pixels are replaced after every reverse step."""
    if step not in STEPS:
        raise UserError(f"sampler={step!r} cannot drive repaint: choose one of {', '.join(sorted(STEPS))}")
    update = STEPS[step]
    learned_variance = step_options.pop("learned_variance", None)
    if step == "ddpm":
        from diffuse.diffusion.samplers.ddpm import resolve_variance

        step_options["variance"] = resolve_variance(step_options.get("variance"), learned_variance)
    learned = step_options.get("variance") == "learned"
    ts = time_list(timesteps) + [-1]  # level r is timestep ts[steps - r]; -1 is clean data
    steps = len(ts) - 1
    levels = jump_schedule(steps, jump_length, resamples, jump_last)

    hook = replace_hook(x0_known, keep, schedule, generator)
    x = x_T
    for r, r_next in zip(levels, levels[1:]):
        t, t_next = ts[steps - r], ts[steps - r_next]
        if r_next < r:  # reverse step t -> t_next
            tt = batch_time(t, x)
            eps = denoiser(x, tt, y)
            if learned:
                step_options["v_raw"] = learned_variance(x, tt, y) if t_next >= 0 else None
            x = update(
                x,
                eps,
                alpha_bar_of(schedule, t),
                alpha_bar_of(schedule, t_next),
                last=t_next < 0,
                generator=generator,
                **step_options,
            )
            x = hook(x, t_next)
        else:  # forward jump t -> t_next > t: q(x_{t_next} | x_t)
            ratio = alpha_bar_of(schedule, t_next) / alpha_bar_of(schedule, t)
            x = ratio**0.5 * x + (1 - ratio) ** 0.5 * randn_like(x, generator)
    return paste(x, x0_known, keep)
