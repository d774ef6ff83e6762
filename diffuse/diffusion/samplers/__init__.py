"""Samplers: pure functions (denoiser, x_T, timesteps, schedule, ...) -> x_0. One file per algorithm or family
(dpm_solver.py: the DPM-Solver++ ODE and SDE solvers); their common call and loops are in common.py."""

from __future__ import annotations

from collections.abc import Callable

from diffuse.diffusion.samplers.adaptive import adaptive
from diffuse.diffusion.samplers.common import StepHook  # noqa: F401  (the hook's type, for callers)
from diffuse.diffusion.samplers.consistency import consistency
from diffuse.diffusion.samplers.ddim import ddim, ddim_step
from diffuse.diffusion.samplers.ddpm import ddpm, ddpm_step
from diffuse.diffusion.samplers.deis import deis
from diffuse.diffusion.samplers.dpm_solver import dpm_solver, dpm_solver_2m_sde, dpm_solver_3m, dpm_solver_3m_sde
from diffuse.diffusion.samplers.euler import euler
from diffuse.diffusion.samplers.euler_ancestral import euler_ancestral
from diffuse.diffusion.samplers.heun import heun
from diffuse.diffusion.samplers.ipndm import ipndm
from diffuse.diffusion.samplers.unipc import unipc

SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "euler_ancestral": euler_ancestral,
    "dpm_solver": dpm_solver,
    "dpm_solver_3m": dpm_solver_3m,
    "dpm_solver_2m_sde": dpm_solver_2m_sde,
    "dpm_solver_3m_sde": dpm_solver_3m_sde,
    "unipc": unipc,
    "ipndm": ipndm,
    "deis": deis,
    "adaptive": adaptive,
    "consistency": consistency,
}
# Samplers whose output is not a function of x_T alone (ddim too, when eta > 0).
STOCHASTIC = {"ddpm", "dpm_solver_2m_sde", "dpm_solver_3m_sde", "euler_ancestral", "consistency"}
# Samplers that choose their own levels between the first timestep and the last.
SELF_STEPPING = {"adaptive"}
# One step of a sampler, for algorithms that drive the reverse process themselves (RePaint):
#     step(x, eps, alpha_bar_t, alpha_bar_s, *, last, <sampler options>, generator) -> x_s
STEPS: dict[str, Callable] = {"ddpm": ddpm_step, "ddim": ddim_step}


def get_sampler(name: str) -> Callable:
    from diffuse.errors import UserError

    if name not in SAMPLERS:
        raise UserError(f"sampler={name!r} is not allowed: choose one of {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]
