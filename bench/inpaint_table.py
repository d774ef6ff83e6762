"""Inpainting against the exact conditional of a Gaussian mixture (model=oracle): replace vs RePaint schedules.

Two problems of tests/unit/diffusion/test_inpainting.py, 1x4x4 images, linear schedule T=1000, DDPM steps with variance beta
(the CLI's default sampler):
    rare       the known pixels sit on a component of prior weight 0.2 (exact conditional: it, with certainty)
    ambiguous  the known pixels weakly favour one of two components (1.6 nats; conditional 0.38 : 0.62)
Per method: NFE, the total variation between the completions' component frequencies and the exact posterior
weights, and for the most probable component the filled pixels' mean error (RMS, in units of its std) and std
ratio (sample std / true std).

    python -m bench.inpaint_table [N]
"""

import sys
import time

import torch

from diffuse.diffusion import inpainting as inp
from diffuse.diffusion.inpainting import repaint, repaint_nfe, replace_hook
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import ddpm
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import make_timesteps
from diffuse.metrics.mixture import inpaint_fit
from tests.unit.diffusion.test_inpainting import problem, rare_component

METHODS = [  # (name, steps, RePaint options or None for replace)
    ("replace", 50, None),
    ("replace", 200, None),
    ("repaint j=10 r=3 all along", 50, {"jump_length": 10, "resamples": 3, "jump_last": 1.0}),
    ("repaint j=10 r=10 all along", 50, {"jump_length": 10, "resamples": 10, "jump_last": 1.0}),
    ("repaint j=10 r=10 first half", 50, {"jump_length": 10, "resamples": 10, "jump_last": 1.0, "first_half": True}),
    ("repaint j=5 r=10 last 0.1", 50, {"jump_length": 5, "resamples": 10, "jump_last": 0.1}),
    ("repaint j=5 r=10 last 0.2", 50, {"jump_length": 5, "resamples": 10, "jump_last": 0.2}),
    ("repaint j=5 r=20 last 0.1", 50, {"jump_length": 5, "resamples": 20, "jump_last": 0.1}),
    ("repaint j=5 r=20 last 0.2", 50, {"jump_length": 5, "resamples": 20, "jump_last": 0.2}),
]


def high_noise_only(steps, jump_length, resamples):
    """Jump points only in the first, noisiest half of the walk: the schedule jump_last cannot express, kept
    here to show what resampling at high noise buys."""
    return inp.walk(
        steps, jump_length, {r: resamples - 1 for r in inp.jump_points(steps, jump_length) if r >= steps // 2}
    )


def run(problem_fn, n: int, seed: int = 0):
    mix, keep, x_known = problem_fn()
    sched = make_schedule("linear")
    den = GMMDenoiser(mix, sched)
    x_T = torch.randn((n, *mix.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    known = x_known.expand(n, -1, -1, -1)
    rows = []
    for name, steps, opts in METHODS:
        g = torch.Generator().manual_seed(seed + 1)
        ts = make_timesteps(1000, steps)
        if opts is None:
            x = ddpm(den, x_T, ts, sched, variance="beta", generator=g, hook=replace_hook(known, keep, sched, g))
            nfe = steps
        elif opts.get("first_half"):
            saved = inp.jump_schedule
            inp.jump_schedule = lambda s, j, r, _last=1.0: high_noise_only(s, j, r)
            try:
                x = repaint(
                    den,
                    x_T,
                    ts,
                    sched,
                    known,
                    keep,
                    jump_length=opts["jump_length"],
                    resamples=opts["resamples"],
                    variance="beta",
                    generator=g,
                )
                levels = high_noise_only(steps, opts["jump_length"], opts["resamples"])
            finally:
                inp.jump_schedule = saved
            nfe = sum(1 for a, b in zip(levels, levels[1:]) if b < a)
        else:
            x = repaint(den, x_T, ts, sched, known, keep, variance="beta", generator=g, **opts)
            nfe = repaint_nfe(steps, opts["jump_length"], opts["resamples"], opts["jump_last"])
        fit = inpaint_fit(mix, x, x_known, keep)
        top = max(fit["rows"], key=lambda r: r["weight"])
        rows.append((f"{name} ({steps} steps)", nfe, fit["tv"], top["mean_err"], top["std_ratio"], fit["known_exact"]))
    return rows


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for label, fn in (("rare", rare_component), ("ambiguous", problem)):
        t0 = time.time()
        rows = run(fn, n)
        print(
            f"\n{label}: n={n} completions per method, oracle denoiser, linear schedule T=1000 ({time.time() - t0:.1f} s)"
        )
        print(f"{'method':<48} {'NFE':>5} {'freq TV':>8} {'mean err':>9} {'std ratio':>10} {'known exact':>12}")
        for name, nfe, tv, me, sr, exact in rows:
            print(f"{name:<48} {nfe:>5d} {tv:>8.3f} {me:>9.3f} {sr:>10.3f} {str(exact):>12}")
