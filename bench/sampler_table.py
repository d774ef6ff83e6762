"""Every sampler at 10, 20 and 50 NFE against the exact mixture denoiser (model=oracle, linear schedule).

Prints, per sampler x NFE x component: freq_z (component frequency's z-score against its weight), mean_err
(RMS of the sample mean's error, in units of the component's std) and std_ratio (sample std / true std).
NFE is counted by wrapping the denoiser. Heun costs 2 steps - 1 NFE, so it runs (NFE + 1) // 2 steps.

    PYTHONPATH=. python bench/sampler_table.py [--n 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffuse.data.gmm import default_mixture
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import SAMPLERS
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import sampler_timesteps
from diffuse.metrics.mixture import mixture_fit
from diffuse.pipeline.sampling import CountingDenoiser

# (label, sampler, spacing, steps for a target NFE)
RUNS = [
    ("ddim", "ddim", "trailing", lambda nfe: nfe),
    ("dpm_solver", "dpm_solver", "trailing", lambda nfe: nfe),
    ("dpm_solver+karras", "dpm_solver", "karras", lambda nfe: nfe),
    ("euler+karras", "euler", "karras", lambda nfe: nfe),
    ("heun+karras", "heun", "karras", lambda nfe: (nfe + 1) // 2),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    args = ap.parse_args()
    mixture, schedule = default_mixture(), make_schedule("linear")
    den = GMMDenoiser(mixture, schedule)
    x_T = torch.randn((args.n, *mixture.shape), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    print(f"default mixture (stds {[round(float(s), 2) for s in mixture.stds]}), linear schedule, n={args.n}, seed={args.seed}")
    print(f"{'sampler':<18} {'NFE':>4} {'k':>2} {'std':>5} {'freq z':>7} {'mean err':>9} {'std ratio':>9}")
    for label, name, spacing, steps_for in RUNS:
        for target in args.nfe:
            counter = CountingDenoiser(den)
            t0 = time.time()
            x = SAMPLERS[name](counter, x_T, sampler_timesteps(schedule, steps_for(target), spacing), schedule)
            for r in mixture_fit(mixture, x):
                print(f"{label:<18} {counter.calls:>4} {r['component']:>2} {r['std']:>5.2f} {r['freq_z']:>7.2f} {r['mean_err']:>9.3f} {r['std_ratio']:>9.3f}")
            print(f"{'':<18} ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
