"""Conversions between the four things a network can predict, and the denoiser interface.

With x_t = a x_0 + s eps, a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t) (so a^2 + s^2 = 1):
    x_0   = (x_t - s eps) / a
    eps   = (x_t - a x_0) / s
    v     = a eps - s x_0                    (Salimans & Ho 2022, "v-prediction")
    score = grad log q(x_t) = -eps / s

The denoiser is the one interface every sampler, guidance wrapper, inpainting hook and likelihood uses:
    denoiser(x_t, t, y) -> eps
with t a (B,) tensor of timesteps (integer valued, or fractional for continuous-time samplers) and y the
class labels or None.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from diffuse.diffusion.schedule import Schedule, coefficients
from diffuse.errors import UserError

PREDICTIONS = ("eps", "x0", "v")


class Denoiser(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def eps_to_x0(eps, x_t, a, s):
    return (x_t - s * eps) / a


def x0_to_eps(x0, x_t, a, s):
    return (x_t - a * x0) / s


def eps_x0_to_v(eps, x0, a, s):
    return a * eps - s * x0


def v_to_eps(v, x_t, a, s):
    return s * x_t + a * v


def v_to_x0(v, x_t, a, s):
    return a * x_t - s * v


def eps_to_score(eps, s):
    return -eps / s


def score_to_eps(score, s):
    return -s * score


def to_eps(kind: str, out: torch.Tensor, x_t: torch.Tensor, a, s) -> torch.Tensor:
    """The eps implied by a network output of prediction type `kind`."""
    if kind == "eps":
        return out
    if kind == "x0":
        return x0_to_eps(out, x_t, a, s)
    if kind == "v":
        return v_to_eps(out, x_t, a, s)
    raise UserError(f"objective.prediction={kind!r} is not allowed: choose one of {', '.join(PREDICTIONS)}")


def target(kind: str, x0: torch.Tensor, eps: torch.Tensor, a, s) -> torch.Tensor:
    """What a network of prediction type `kind` is trained to output for (x_0, eps)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return eps_x0_to_v(eps, x0, a, s)
    raise UserError(f"objective.prediction={kind!r} is not allowed: choose one of {', '.join(PREDICTIONS)}")


class NetworkDenoiser:
    """A network F(x, t, y) of a given prediction type, seen as an eps-denoiser under a schedule.

    The network runs in the dtype it was built in (autocast may lower it); the conversion to eps happens in
    the input's dtype so that samplers working in float32/64 keep their precision.
    """

    def __init__(self, net: Callable, prediction: str, schedule: Schedule, autocast_dtype=None):
        if prediction not in PREDICTIONS:
            raise UserError(f"objective.prediction={prediction!r} is not allowed: choose one of {', '.join(PREDICTIONS)}")
        self.net = net
        self.prediction = prediction
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.autocast_dtype is not None:
            with torch.autocast(x_t.device.type, dtype=self.autocast_dtype):
                out = self.net(x_t, t, y)
        else:
            out = self.net(x_t, t, y)
        a, s = coefficients(self.schedule, t, x_t)
        return to_eps(self.prediction, out.to(x_t.dtype), x_t, a, s)
