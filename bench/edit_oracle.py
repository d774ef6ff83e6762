"""SDEdit against its exact answer: on a Gaussian mixture, the edits of one noised image x_t0 should be draws of
q(x_0 | x_t0), a mixture with reweighted, shifted and narrowed components (diffuse.metrics.mixture.noisy_posterior).

The problem of tests/commands/test_edit.py: three components over 1 x 2 x 2 (stds 0.1, 0.15, 0.2; weights 0.3, 0.3, 0.4),
the image halfway between components 0 and 1, its noise fixed; linear schedule, T = 1000, the exact denoiser.
Per strength and sampler: the exact posterior weights, then (responsibility-weighted, no hard assignment)
    weights TV   total variation between the edits' component weights and the exact ones
    mean err     worst component's RMS mean error, in units of its posterior std
    std ratio    the components' spreads over their posterior stds (min - max)
over the components of posterior weight >= 0.05. The floor row is n exact draws of the posterior.

    OMP_NUM_THREADS=1 python -m bench.edit_oracle [N] [--markdown]
"""

import sys
import time

import torch

from diffuse.diffusion.edit import perturb, sdedit, start_timestep
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import ddim, ddpm
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import make_timesteps
from diffuse.metrics.mixture import noisy_posterior, posterior_fit, sample_posterior
from diffuse.pipeline.sampling import CountingDenoiser
from tests.commands.test_edit import problem

STRENGTHS = (0.05, 0.1, 0.3, 1.0)
# (name, function, steps over the whole schedule, options). Deterministic DDIM (eta 0) is left out: from one x_t0
# it returns one point, the end of the probability-flow ODE, whatever n is (std ratio 0).
SAMPLERS = [
    ("ddpm (beta), every level", ddpm, 1000, {"variance": "beta"}),
    ("ddpm (beta_tilde), every level", ddpm, 1000, {"variance": "beta_tilde"}),
    ("ddpm (beta), 100 steps", ddpm, 100, {"variance": "beta"}),
    ("ddim eta 1, 50 steps", ddim, 50, {"eta": 1.0}),
]


def summary(rows) -> tuple[float, float, float, float]:
    tv = 0.5 * sum(abs(r["weight"] - r["exact_weight"]) for r in rows)
    big = [r for r in rows if r["exact_weight"] >= 0.05]
    return tv, max(r["mean_err"] for r in big), min(r["std_ratio"] for r in big), max(r["std_ratio"] for r in big)


def main(n: int, markdown: bool) -> None:
    mixture, image, eps = problem()
    schedule = make_schedule("linear")
    den = GMMDenoiser(mixture, schedule)
    out = []
    t_start = time.time()
    for strength in STRENGTHS:
        t0 = start_timestep(strength, schedule.T)
        # At strength 1 the start is the noise itself (plain sampling), at any other the perturbed image.
        x_t0 = eps if strength == 1.0 else perturb(schedule, image[None], t0, eps)
        w, m, v = noisy_posterior(mixture, x_t0, float(schedule.alpha_bar[t0]))
        weights = " / ".join(f"{float(x):.2f}" for x in w)
        floor = posterior_fit(w, m, v, sample_posterior(w, m, v, n, torch.Generator().manual_seed(1)))
        out.append((strength, t0, weights, f"floor: {n:,} exact draws", "", summary(floor)))
        for name, fn, steps, options in SAMPLERS:
            counter = CountingDenoiser(den)
            x = sdedit(
                fn,
                counter,
                image[None],
                make_timesteps(schedule.T, steps),
                schedule,
                strength=strength,
                noise=eps.expand(n, -1, -1, -1).clone(),
                generator=torch.Generator().manual_seed(5),
                **options,
            )
            out.append((strength, t0, weights, name, str(counter.calls), summary(posterior_fit(w, m, v, x))))
    if markdown:
        print("| strength (t0) | exact weights | sampler | NFE | weights TV | mean err | std ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for strength, t0, weights, name, nfe, (tv, me, lo, hi) in out:
            print(f"| {strength:g} ({t0}) | {weights} | {name} | {nfe} | {tv:.3f} | {me:.3f} | {lo:.3f} - {hi:.3f} |")
    else:
        print(
            f"{'strength':>8} {'t0':>4} {'exact weights':>18}  {'sampler':<30} {'NFE':>5} {'TV':>6} {'mean err':>8} {'std ratio':>13}"
        )
        for strength, t0, weights, name, nfe, (tv, me, lo, hi) in out:
            print(
                f"{strength:>8g} {t0:>4} {weights:>18}  {name:<30} {nfe:>5} {tv:>6.3f} {me:>8.3f} {lo:>6.3f}-{hi:.3f}"
            )
    print(f"# n = {n}, {time.time() - t_start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]) if args else 20000, "--markdown" in sys.argv)
