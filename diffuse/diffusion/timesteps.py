"""Which of the T training timesteps a sampler visits (DDIM section 4.2; Lin et al. 2024 on spacings)."""

from __future__ import annotations

import torch

from diffuse.errors import UserError

SPACINGS = ("leading", "trailing", "linspace")


def make_timesteps(T: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """`steps` distinct timesteps in [0, T-1], in decreasing order (the order a sampler visits them).

    leading:  0, k, 2k, ...           (DDIM's original; never reaches t=T-1, so it starts from a less noisy x_T)
    trailing: T-1, T-1-k, ...         (starts at the last training step; the right choice at few steps)
    linspace: round(linspace(0, T-1)) (both ends)
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UserError(f"steps={steps!r} is not allowed: it must be an integer between 1 and {T}")
    if not 1 <= steps <= T:
        raise UserError(f"steps={steps} is not allowed: it must be between 1 and T={T} (the schedule's length)")
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.int64) * (T // steps)
    elif spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
    else:
        raise UserError(f"sampler.spacing={spacing!r} is not allowed: choose one of {', '.join(SPACINGS)}")
    ts = torch.unique(ts).flip(0)
    if ts.numel() != steps:  # cannot happen for steps <= T with these rules, but a sampler must not silently do less
        raise UserError(f"steps={steps} with spacing={spacing!r} gives only {ts.numel()} distinct timesteps")
    return ts
