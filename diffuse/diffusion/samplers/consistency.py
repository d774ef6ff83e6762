"""Multistep consistency sampling, Song et al. 2023 ("Consistency Models"), Algorithm 1.

    x0 <- f(x_T, t_1);
    for each further level t_i:  x_{t_i} = sqrt(alpha_bar_i) x0 + sqrt(1 - alpha_bar_i) z,  x0 <- f(x_{t_i}, t_i)

f is read through the denoiser interface: a consistency model's denoiser (diffusion.consistency.ConsistencyDenoiser)
returns the eps whose x0 prediction is f, so the same loop runs any model (for a diffusion model it is a crude
sampler: each step forgets everything but the current x0 guess). The levels are the given timesteps: the first
should be the noisiest; the others decide what each extra step repairs (time-uniform `trailing` levels by default:
for 2 steps the second at t = T/2). NFE = number of timesteps; fresh noise from `generator` at each level after
the first.
"""

from __future__ import annotations

import torch

from diffuse.diffusion.noise import randn_like
from diffuse.diffusion.samplers.common import Run, levels, sampler


@sampler
def consistency(run: Run) -> torch.Tensor:
    lv = levels(run.timesteps, run.schedule)[:-1]
    x = run.x_T
    x0 = run.x_T
    for i, level in enumerate(lv):
        if i > 0:  # back up to this level along the forward process from the current guess
            x = run.hooked(level.alpha * x0 + level.sigma * randn_like(x0, run.generator), level.t)
        x0, _ = run.predict(x, level)
    return run.hooked(x0, -1) if lv else x0
