"""Inpainting against the exact conditional of a Gaussian mixture (model=oracle): replace vs RePaint.

The mixture and known region are those of tests/test_inpainting.py: three 1x4x4 components; the left half is
known and ambiguous between components 0 and 1, which differ on the missing pixels. Prints, per method, the
component frequencies of the completions against the posterior weights (TV distance) and the filled pixels'
per-component mean error / std ratio.

    PYTHONPATH=. python bench/inpaint_table.py [N]
"""

import sys
import time

import torch

from diffuse.diffusion.inpainting import repaint, repaint_nfe, replace_hook
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import ddpm
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import make_timesteps
from diffuse.metrics.mixture import format_inpaint_fit, inpaint_fit
from tests.test_inpainting import problem


def run_methods(n: int, seed: int = 0):
    mix, keep, x_known = problem()
    sched = make_schedule("linear")
    den = GMMDenoiser(mix, sched)
    x_T = torch.randn((n, 1, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    known = x_known.expand(n, -1, -1, -1)
    out = {}

    def gen(s):
        return torch.Generator().manual_seed(s)

    t0 = time.time()
    for steps in (50, 150):
        x = ddpm(den, x_T, make_timesteps(1000, steps), sched, variance="beta_tilde", generator=gen(1),
                 hook=replace_hook(known, keep, sched, gen(2)))
        out[f"replace ddpm {steps}"] = (steps, inpaint_fit(mix, x, x_known, keep))
    for steps, jl, r in ((50, 10, 3), (50, 10, 5), (100, 10, 5)):
        g = gen(3)
        x = repaint(den, x_T, make_timesteps(1000, steps), sched, known, keep, jump_length=jl, resamples=r,
                    step="ddpm", variance="beta_tilde", generator=g)
        out[f"repaint {steps} j={jl} r={r}"] = (repaint_nfe(steps, jl, r), inpaint_fit(mix, x, x_known, keep))
    return mix, out, time.time() - t0


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    mix, out, secs = run_methods(n)
    print(f"n={n} completions per method, oracle denoiser, linear schedule T=1000 ({secs:.1f} s)")
    for name, (nfe, fit) in out.items():
        print(f"\n{name}  (NFE {nfe})\n" + format_inpaint_fit(fit))
    print("\nsummary")
    print(f"{'method':<24} {'NFE':>5} {'TV':>6} {'max mean err':>13} {'known exact':>12}")
    for name, (nfe, fit) in out.items():
        me = max(r["mean_err"] for r in fit["rows"] if r["n"] >= 20)
        print(f"{name:<24} {nfe:>5d} {fit['tv']:>6.3f} {me:>13.3f} {str(fit['known_exact']):>12}")
