"""Small helpers shared by the sampler loops."""

from __future__ import annotations

import torch

from diffuse.diffusion.schedule import Schedule


def step_pairs(timesteps: torch.Tensor, schedule: Schedule):
    """(t, alpha_bar_t, alpha_bar_next) along a decreasing timestep sequence; the step after the last goes to
    alpha_bar = 1 (clean data), as DDIM's alpha_0 := 1 convention."""
    ts = [int(t) for t in timesteps]
    ab = schedule.alpha_bar
    for i, t in enumerate(ts):
        nxt = ts[i + 1] if i + 1 < len(ts) else -1
        yield t, nxt, float(ab[t]), (float(ab[nxt]) if nxt >= 0 else 1.0)


def predict_x0(eps: torch.Tensor, x: torch.Tensor, ab_t: float, clip_x0: bool) -> torch.Tensor:
    x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
    return x0.clamp(-1, 1) if clip_x0 else x0


def batch_t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
