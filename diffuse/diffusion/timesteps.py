"""Which of the T training timesteps a sampler visits (DDIM section 4.2; Lin et al. 2024 on spacings)."""

from __future__ import annotations

import math

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


def karras_timesteps(schedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """`steps` fractional timesteps (float64, decreasing) whose noise levels follow Karras et al. 2022, eq. 5:

        sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..n-1

    between sigma_max = sigma(T-1) and sigma_min = sigma(0) of the schedule; rho = 7 spends the steps where the
    noise is low. The step after the last goes to sigma = 0 (clean data), as with the integer spacings.
    """
    T = schedule.T
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise UserError(f"steps={steps!r} is not allowed: it must be an integer between 1 and T={T}")
    if not (rho > 0):
        raise UserError(f"sampler.rho={rho!r} is not allowed: it must be > 0")
    s_max, s_min = float(schedule.sigmas[-1]), float(schedule.sigmas[0])
    if steps == 1:
        return torch.tensor([float(T - 1)], dtype=torch.float64)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv = s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))
    ts = schedule.t_from_sigma(inv**rho)
    ts[0], ts[-1] = T - 1, 0.0  # exact at the ends, whatever the interpolation's rounding
    return ts


def sigma_timesteps(schedule, sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timesteps (float64, decreasing) at the noise levels `sigmas` (decreasing, > 0), exact at the
    schedule's ends."""
    ts = schedule.t_from_sigma(sigmas.to(torch.float64))
    s_max, s_min = float(schedule.sigmas[-1]), float(schedule.sigmas[0])
    ts = torch.where(
        torch.isclose(sigmas, torch.tensor(s_max, dtype=torch.float64), rtol=1e-12), float(schedule.T - 1), ts
    )
    return torch.where(torch.isclose(sigmas, torch.tensor(s_min, dtype=torch.float64), rtol=1e-12), 0.0, ts)


def level_sigmas(schedule, steps: int, kind: str, rho: float = 7.0) -> torch.Tensor:
    """`steps` noise levels (decreasing) between sigma_max = sigma(T-1) and sigma_min = sigma(0):

    logsnr   uniform in log sigma, i.e. in log-SNR (Lu et al. 2022's uniform-lambda steps)
    polyexp  log sigma polynomial in the step index, ramp^rho (k-diffusion's polyexponential): rho = 1 is logsnr,
             rho > 1 spends the steps at low noise
    """
    s_max, s_min = float(schedule.sigmas[-1]), float(schedule.sigmas[0])
    if steps == 1:
        return torch.tensor([s_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if kind == "polyexp":
        ramp = 1 - (1 - ramp) ** rho
    return torch.exp(math.log(s_max) + ramp * (math.log(s_min) - math.log(s_max)))


def explicit_timesteps(schedule, *, sigmas=None, timesteps=None) -> torch.Tensor:
    """A solver's levels given as a list: noise levels sigma (decreasing, in [sigma_min, sigma_max]) or timesteps
    (decreasing, in [0, T-1], fractional allowed). The step after the last goes to clean data."""
    T = schedule.T
    if sigmas is not None and timesteps is not None:
        raise UserError("sampler.sigmas and sampler.timesteps cannot both be given: choose one")
    name, values = ("sampler.sigmas", sigmas) if sigmas is not None else ("sampler.timesteps", timesteps)
    if (
        not isinstance(values, (list, tuple))
        or not values
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values)
    ):
        raise UserError(f"{name}={values!r} is not allowed: give a non-empty list of numbers")
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    if not torch.isfinite(v).all() or (len(v) > 1 and not (v[1:] < v[:-1]).all()):
        raise UserError(f"{name}={list(values)!r} is not allowed: the values must be finite and strictly decreasing")
    if sigmas is not None:
        s_max, s_min = float(schedule.sigmas[-1]), float(schedule.sigmas[0])
        if v[0] > s_max * (1 + 1e-9) or v[-1] < s_min * (1 - 1e-9):
            raise UserError(
                f"{name}={list(values)!r} is not allowed: noise levels must lie in [{s_min:.6g}, {s_max:.6g}], the schedule's"
            )
        return sigma_timesteps(schedule, v.clamp(s_min, s_max))
    if v[0] > T - 1 or v[-1] < 0:
        raise UserError(f"{name}={list(values)!r} is not allowed: timesteps must lie in [0, {T - 1}]")
    return v.long() if all(float(x).is_integer() for x in values) else v


LEVEL_SPACINGS = ("karras", "logsnr", "polyexp")


def sampler_timesteps(schedule, steps: int, spacing: str = "trailing", rho: float = 7.0) -> torch.Tensor:
    """Integer timesteps for the uniform spacings, fractional ones for the noise-level spacings."""
    if spacing == "karras":
        return karras_timesteps(schedule, steps, rho)
    if spacing in ("logsnr", "polyexp"):
        T = schedule.T
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise UserError(f"steps={steps!r} is not allowed: it must be an integer between 1 and T={T}")
        if not (rho > 0):
            raise UserError(f"sampler.rho={rho!r} is not allowed: it must be > 0")
        return sigma_timesteps(schedule, level_sigmas(schedule, steps, spacing, rho))
    if spacing not in SPACINGS:
        raise UserError(
            f"sampler.spacing={spacing!r} is not allowed: choose one of {', '.join(SPACINGS + LEVEL_SPACINGS)}"
        )
    return make_timesteps(schedule.T, steps, spacing)
