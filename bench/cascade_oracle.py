"""Super-resolution and cascades against their exact answer, on a Gaussian mixture (diffuse.diffusion.superres).

The problem of tests/unit/diffusion/test_superres.py: three components over 2 x 8 x 8 (stds 0.12, 0.12, 0.2; weights 0.3, 0.5, 0.2),
components 0 and 1 equal at 4 x 4 (1 adds a checkerboard whose 2 x 2 block means are 0), so a low-resolution image of
component 0 leaves the choice between them to their weights; cosine schedule, DPM-Solver++(2M) at 25 steps.

    conditional   one augmented low-resolution image z, N super-resolutions by the exact conditional denoiser: per
                  component the exact posterior weight and the samples' (responsibility-weighted), their mean error
                  (units of the posterior std) and spreads on the block-constant subspace P and off it (1 is exact),
                  and the RMS of z - sqrt(g) D x, the part of z the samples do not explain (the augmentation noise)
    cascade       the mixture's 4 x 4 oracle, then the super-resolution oracle at level 0.2, truncated or not: the
                  cascade's images against the 8 x 8 mixture itself (frequency z-scores, mean errors, std ratios)

    OMP_NUM_THREADS=1 python -m bench.cascade_oracle [N]
"""

import math
import sys
import time

import torch

from diffuse.data.gmm import GaussianMixture
from diffuse.diffusion.noise import PerSample, randn
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.superres import (
    LowResOracle,
    aug_alpha_bar,
    augment,
    condition_lowres,
    downsample,
    lowres_fit,
    lowres_mixture,
    lowres_posterior,
)
from diffuse.metrics.mixture import format_fit, mixture_fit
from diffuse.pipeline.cascade import CascadeJob, plan_superres
from diffuse.pipeline.job import prepare_sampling
from diffuse.pipeline.model import Model

F = 2
DPM = {
    "name": "dpm_solver",
    "spacing": "logsnr",
    "default_steps": 25,
    "clip_x0": False,
    "rho": 7.0,
    "polyexp_rho": 2.0,
    "sigmas": None,
    "timesteps": None,
    "schedule": "stock",
    "lower_order_final": True,
    "dynamic_percentile": 0.0,
    "afs": False,
}


def mixture(res: int = 8) -> GaussianMixture:
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, res, dtype=torch.float64), torch.linspace(-1, 1, res, dtype=torch.float64), indexing="ij"
    )
    checker = torch.where((torch.arange(res)[:, None] + torch.arange(res)[None]) % 2 == 0, 1.0, -1.0).to(torch.float64)
    ramp = 0.5 * xx
    means = torch.stack(
        [
            torch.stack([ramp, -ramp]),
            torch.stack([ramp + 0.3 * checker, -ramp - 0.3 * checker]),
            torch.stack([0.4 * yy, 0.4 - 0.3 * yy]),
        ]
    )
    return GaussianMixture(
        means, torch.tensor([0.12, 0.12, 0.2], dtype=torch.float64), torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
    )


def stage(mix, sched, level, truncated=False):
    lowres = {
        "name": "lowres",
        "from_resolution": mix.shape[1] // F,
        "aug_max": 0.5,
        "aug_level": level,
        "truncated": truncated,
        "factor": F,
    }
    return plan_superres(
        Model(LowResOracle(mix, sched, F), sched, mix.shape, mix.K, False, {"model": "oracle"}, lowres=lowres), DPM, 25
    )


def main(n: int) -> None:
    mix, sched = mixture(), make_schedule("cosine")
    x0 = mix.means[:1] + 0.12 * torch.randn(
        1, *mix.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    print(
        "| level | k | exact weight | weight | mean err | std on P | std off P | RMS(z - sqrt(g) D x) | sqrt(1 - g) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for level in (0.0, 0.1, 0.3, 0.6):
        g = float(aug_alpha_bar(level))
        z = augment(downsample(x0, F), torch.tensor(level), noise)
        post = lowres_posterior(mix, z, level, F)
        st = stage(mix, sched, level)
        gen = PerSample(0, range(n))
        x = st.plan(
            condition_lowres(st.model.denoiser, z.expand(n, -1, -1, -1), level),
            randn((n, *mix.shape), gen, "cpu", torch.float64),
            generator=gen,
        )
        resid = float((z - math.sqrt(g) * downsample(x, F)).pow(2).mean().sqrt())
        for r in lowres_fit(post, 0, x):
            if r["exact_weight"] < 0.01:
                continue
            print(
                f"| {level} | {r['component']} | {r['exact_weight']:.3f} | {r['weight']:.3f} ± {r['weight_se']:.3f} | {r['mean_err']:.3f} "
                f"| {r['std_p']:.3f} | {r['std_q']:.3f} | {resid:.3f} | {math.sqrt(1 - g):.3f} |"
            )
    low = lowres_mixture(mix, F)
    base = Model(GMMDenoiser(low, sched), sched, low.shape, low.K, False, {"model": "oracle"})
    job = prepare_sampling(base, sampler=DPM, steps=25, guidance=None, label=None, labels=None, n=n, seed=0)
    for truncated in (False, True):
        t0 = time.perf_counter()
        drawn = CascadeJob(job, (stage(mix, sched, 0.2, truncated),), job.denoiser).generate(
            list(range(n)), device=torch.device("cpu"), batch_size=1000, progress=False
        )
        print(
            f"\ncascade 4x4 -> 8x8, level 0.2, truncated={truncated}: NFE {drawn.nfe}, {time.perf_counter() - t0:.1f} s"
        )
        print(format_fit(mixture_fit(mix, drawn.images)))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000)
