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

from collections.abc import Callable
from typing import Protocol

import torch

from diffuse.diffusion.schedule import Schedule, coefficients
from diffuse.errors import UserError

PREDICTIONS = ("eps", "x0", "v")


class Denoiser(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


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

    learn_sigma: the network also outputs the variance channels v_raw of diffusion.bound (2C channels in all).
    A call returns eps only, so every sampler and wrapper uses the mean; variance_output(x_t, t, y) gives v_raw.
    It reuses the last call's forward pass when that call's leading rows were these inputs (the ancestral
    sampler asks right after its eps; classifier-free guidance's batch leads with the conditional rows, whose
    variances guided-diffusion's sampler uses too), else it runs the network again.
    """

    def __init__(
        self, net: Callable, prediction: str, schedule: Schedule, autocast_dtype=None, learn_sigma: bool = False
    ):
        if prediction not in PREDICTIONS:
            raise UserError(
                f"objective.prediction={prediction!r} is not allowed: choose one of {', '.join(PREDICTIONS)}"
            )
        self.net = net
        self.prediction = prediction
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype
        self.learn_sigma = learn_sigma
        self._last = None  # (x_t, t, y, v_raw) of the last call, learn_sigma only

    def _forward(self, x_t, t, y):
        if self.autocast_dtype is not None:
            with torch.autocast(x_t.device.type, dtype=self.autocast_dtype):
                return self.net(x_t, t, y)
        return self.net(x_t, t, y)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self._forward(x_t, t, y)
        if self.learn_sigma:
            c = out.shape[1] // 2
            # A copy of x_t: a caller may update it in place before asking for the variances.
            self._last = (x_t.clone(), t, y, out[:, c:].to(x_t.dtype))
            out = out[:, :c]
        a, s = coefficients(self.schedule, t, x_t)
        return to_eps(self.prediction, out.to(x_t.dtype), x_t, a, s)

    @torch.no_grad()
    def variance_output(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """v_raw at (x_t, t, y): the variance channels of a learn_sigma network (diffusion.bound)."""
        if not self.learn_sigma:
            raise ValueError("variance_output: this network has no learned variances")
        if self._last is not None:
            lx, lt, ly, v = self._last
            b = x_t.shape[0]
            same_y = (y is None and ly is None) or (
                y is not None and ly is not None and ly.shape[0] >= b and torch.equal(ly[:b], y)
            )
            if (
                lx.shape[0] >= b
                and lx.shape[1:] == x_t.shape[1:]
                and same_y
                and torch.equal(lt[:b], t)
                and torch.equal(lx[:b], x_t)
            ):
                return v[:b]
        self(x_t, t, y)
        return self._last[3]


# -- EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
# section 5 and Table 1) ---------------------------------------------------------------------------------------
#
# In the EDM variables of our variance-preserving process, x~ = x_t / a and sigma = s / a (so x~ = x_0 + sigma eps),
# the network F is wrapped as
#     D(x~; sigma) = c_skip(sigma) x~ + c_out(sigma) F(c_in(sigma) x~; c_noise(sigma))
#     c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2)
# with sd = sigma_data. D is a clean-image prediction; F regresses (x_0 - c_skip x~) / c_out, which has unit
# variance for data of std sd, as does its input c_in x~, at every noise level.
#
# The time input. Karras et al. feed c_noise = ln(sigma) / 4 to their backbones; we feed the (fractional) timestep
# t whose noise level is sigma instead. Any strictly monotone function of sigma tells F the same thing, so the
# choice only matters through the embedding that reads it: ours (layers.timestep_embedding) has frequencies from 1
# down to 1/10000 laid out for t in [0, T-1], over which ln(sigma) / 4 spans only about [-1.2, 1.3] (the linear
# schedule's sigma_min 0.01 to sigma_max 157): all but the fastest few of its frequencies would see a constant.
# With t every backbone (U-Net, DiT) runs unchanged and sees the same conditioning as under eps or v training,
# so a comparison with them measures the preconditioning, loss weight and noise distribution, not an embedding;
# and the sampler's t is already the network's t, with no second conversion.


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of Karras et al. Table 1 at noise levels sigma, in sigma's dtype."""
    sd2 = sigma_data**2
    norm = (sigma**2 + sd2).sqrt()
    return sd2 / (sigma**2 + sd2), sigma * sigma_data / norm, 1 / norm


def edm_denoise(
    net, x_tilde: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, y=None, *, sigma_data: float
) -> torch.Tensor:
    """D(x~; sigma): the clean image the preconditioned network F assigns to x~ = x_0 + sigma eps (differentiable).
    sigma broadcasts against x~ (shape (B, 1, ..., 1)); t is the timestep of each sigma, F's time input."""
    c_skip, c_out, c_in = edm_scalings(sigma, sigma_data)
    return c_skip * x_tilde + c_out * net(c_in * x_tilde, t, y).to(x_tilde.dtype)


class EDMDenoiser:
    """An EDM-preconditioned network through the one denoiser interface: the eps at (x_t, t) whose x0 is D. Every
    sampler, guidance wrapper and inpainting hook then drives it as it drives a NetworkDenoiser."""

    def __init__(self, net: Callable, schedule: Schedule, sigma_data: float = 0.5, autocast_dtype=None):
        self.net, self.schedule, self.sigma_data, self.autocast_dtype = net, schedule, sigma_data, autocast_dtype

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        a, s = coefficients(self.schedule, t, x_t)
        # The conversions stay in x_t's dtype (samplers work in float32/64); only F runs under autocast.
        with torch.autocast(x_t.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            d = edm_denoise(self.net, x_t / a, s / a, t, y, sigma_data=self.sigma_data)
        return (x_t - a * d.to(x_t.dtype)) / s
