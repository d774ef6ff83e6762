"""Progressive distillation, Salimans & Ho 2022 ("Progressive Distillation for Fast Sampling of Diffusion Models"),
Algorithm 2, on a nested grid of levels.

The first teacher's S levels (distill.start_steps, spaced trailing or evenly in log-SNR) fix every round's: a
student of N steps visits every (S/N)-th of them, t_N > ... > t_1, then clean data, so the 2N-step grid holds the
N-step one exactly. The teacher takes twice as many steps: from the student's level t_i, two DDIM steps (eta = 0)
through the midpoint level to t_{i-1}. Log-SNR spacing matters on narrow data: trailing integer timesteps leave the
last step from sigma ~ 0.05 (64 steps, linear schedule) straight to clean data, and the teacher's DDIM there already
shrinks a component of std 0.05 by 40%, which its students would inherit. The student is
trained so that ONE DDIM step from t_i lands where the teacher's two do, which fixes its clean-image target
(their eq. 8, here with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)):

    x~ = (z_{t''} - (sigma_{t''} / sigma_t) z_t) / (alpha_{t''} - (sigma_{t''} / sigma_t) alpha_t)

and x~ = z_{t''} at the clean end. The loss is the student's x0 error weighted by max(SNR_t, 1) ("truncated SNR",
their section 4) or SNR_t + 1, whatever the student predicts (eps, x0 or v; the paper recommends v or x0, which
stay well-posed at the noisiest level where eps does not).
"""

from __future__ import annotations

import torch

from diffuse.diffusion.prediction import to_eps
from diffuse.diffusion.schedule import Schedule, coefficients
from diffuse.diffusion.timesteps import sampler_timesteps
from diffuse.errors import UserError

WEIGHTINGS = ("truncated_snr", "snr_plus_one")
SPACINGS = ("logsnr", "trailing")


def teacher_grid(schedule: Schedule, start_steps: int, spacing: str) -> torch.Tensor:
    """The first teacher's start_steps levels, decreasing (integer timesteps for trailing, fractional for logsnr)."""
    if spacing not in SPACINGS:
        raise UserError(f"distill.spacing={spacing!r} is not allowed: choose one of {', '.join(SPACINGS)}")
    if start_steps > schedule.T:
        raise UserError(
            f"distill.start_steps={start_steps} is not allowed: at most the schedule's T={schedule.T} levels"
        )
    return sampler_timesteps(schedule, start_steps, spacing)


def student_levels(grid: torch.Tensor, steps: int) -> torch.Tensor:
    """The N-step student's levels: every (len(grid) / N)-th level of the first teacher's grid, its top one first."""
    return grid[:: len(grid) // steps][:steps]


def rounds(start_steps: int, target_steps: int) -> list[int]:
    """The students' step counts, start/2, start/4, ..., target: each round halves the teacher's steps, so target must
    be start divided by a power of two."""
    if isinstance(target_steps, bool) or not isinstance(target_steps, int) or target_steps < 1:
        raise UserError(f"distill.target_steps={target_steps!r} is not allowed: a positive integer")
    if isinstance(start_steps, bool) or not isinstance(start_steps, int) or start_steps < 2:
        raise UserError(f"distill.start_steps={start_steps!r} is not allowed: an integer >= 2, the teacher's steps")
    ratio = start_steps // target_steps
    if start_steps % target_steps or ratio < 2 or ratio & (ratio - 1):
        raise UserError(
            f"distill.target_steps={target_steps} is not allowed: it must be distill.start_steps={start_steps} "
            "divided by a power of two (each round halves the steps)"
        )
    out, n = [], start_steps
    while n > target_steps:
        n //= 2
        out.append(n)
    return out


def x0_of(prediction: str, out: torch.Tensor, x_t: torch.Tensor, a, s) -> torch.Tensor:
    return (x_t - s * to_eps(prediction, out, x_t, a, s)) / a


def ddim_step(x: torch.Tensor, x0: torch.Tensor, a, s, a_next, s_next) -> torch.Tensor:
    """DDIM (eta = 0) from (a, s) to (a_next, s_next) given x0: per-sample coefficients."""
    eps = (x - a * x0) / s
    return a_next * x0 + s_next * eps


def coefs_at(schedule: Schedule, t: torch.Tensor, like: torch.Tensor):
    """(alpha, sigma) at integer timesteps t, t = -1 being clean data (1, 0)."""
    return coefficients(schedule, t, like)


@torch.no_grad()
def teacher_target(
    teacher, x_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor, schedule: Schedule, y=None
) -> torch.Tensor:
    """x~: the clean image whose single DDIM step from (x_t, t) reaches the teacher's two steps t -> t_mid -> t_next.
    `teacher(x, t, y) -> eps` is any denoiser (a network, the exact mixture oracle)."""
    a, s = coefs_at(schedule, t, x_t)
    am, sm = coefs_at(schedule, t_mid, x_t)
    an, sn = coefs_at(schedule, t_next, x_t)
    eps = teacher(x_t, t, y).to(x_t.dtype)
    x_mid = ddim_step(x_t, (x_t - s * eps) / a, a, s, am, sm)
    eps_mid = teacher(x_mid, t_mid, y).to(x_t.dtype)
    x_next = ddim_step(x_mid, (x_mid - sm * eps_mid) / am, am, sm, an, sn)
    ratio = sn / s
    return torch.where(sn == 0, x_next, (x_next - ratio * x_t) / (an - ratio * a).where(sn != 0, torch.ones_like(an)))


def weight(schedule: Schedule, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weight on the x0 error: max(SNR, 1) or SNR + 1."""
    ab = schedule.alpha_bar_at(t)
    snr = ab / (1 - ab)
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    if weighting == "snr_plus_one":
        return snr + 1
    raise UserError(f"distill.weighting={weighting!r} is not allowed: choose one of {', '.join(WEIGHTINGS)}")


def progressive_loss(
    student,
    prediction: str,
    teacher,
    x0: torch.Tensor,
    schedule: Schedule,
    grid: torch.Tensor,
    steps: int,
    index: torch.Tensor,
    noise: torch.Tensor,
    *,
    weighting: str,
    y=None,
    teacher_y=None,
) -> torch.Tensor:
    """Per-sample loss of the `steps`-step student at its level number `index` (0: the noisiest), on the first
    teacher's `grid` (see student_levels). `index` (B,) and `noise` come from the caller's generators."""
    g = grid.to(x0.device)
    r = len(grid) // steps
    if r < 2 or len(grid) % steps:
        raise ValueError(f"a {steps}-step student needs a grid of 2^k * {steps} levels, not {len(grid)}")
    t = g[index * r]
    t_mid = g[index * r + r // 2]
    t_next = torch.where(index + 1 < steps, g[((index + 1) * r).clamp(max=len(grid) - 1)], torch.full_like(t, -1))
    a, s = coefs_at(schedule, t, x0)
    x_t = a * x0 + s * noise
    target = teacher_target(teacher, x_t, t, t_mid, t_next, schedule, teacher_y if teacher_y is not None else y)
    x0_student = x0_of(prediction, student(x_t, t, y).float(), x_t, a, s)
    err = (x0_student - target.float()).pow(2).flatten(1).mean(1)
    return err * weight(schedule, t, weighting).to(err.dtype)
