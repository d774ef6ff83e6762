"""Super-resolution and cascades against the exact conditional of a Gaussian mixture given its low-resolution image."""

import math

import pytest
import torch

from diffuse.data.gmm import GaussianMixture
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.superres import (
    LowResOracle,
    aug_alpha_bar,
    aug_level_of,
    augment,
    downsample,
    lowres_fit,
    lowres_mixture,
    lowres_posterior,
)
from diffuse.metrics.mixture import mixture_fit
from diffuse.pipeline.cascade import CascadeJob, check_chain, plan_superres, truncation
from diffuse.pipeline.job import prepare_sampling
from diffuse.pipeline.model import Model

pytestmark = pytest.mark.usefixtures("one_thread")

F = 2
# DPM-Solver++(2M): its spread is within 2% of the exact one at 25 steps, where DPM's is 10% short.
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
STEPS = 25


def detail_mixture(res: int = 8) -> GaussianMixture:
    """Components 0 and 1 share their low-resolution image (1 adds a checkerboard whose block means are 0) and std,
    so given x_low only their weights tell them apart; 2 is elsewhere."""
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


def test_oracle_is_the_dense_gaussian_conditional():
    """E[eps | x_t, z] and the label-conditioned one, against the Gaussian conditioning formulas with dense matrices."""
    torch.manual_seed(0)
    mix = GaussianMixture(
        torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1,
        torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64),
        torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
    )
    sched = make_schedule("linear", T=1000)
    d = 16
    D = downsample(torch.eye(d, dtype=torch.float64).reshape(d, 1, 4, 4), F).reshape(d, -1).T
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64) * 0.5
    level, x, t = torch.tensor([0.3, 0.0]), torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([300, 700])
    oracle = LowResOracle(mix, sched, F).with_lowres(z, level)
    eps, eps_y = oracle(x, t), oracle(x, t, torch.tensor([1, 1]))
    for i in range(2):
        g, ab = float(aug_alpha_bar(level[i])), float(sched.alpha_bar[t[i]])
        A = torch.cat([math.sqrt(g) * D, math.sqrt(ab) * torch.eye(d, dtype=torch.float64)])
        N = torch.block_diag((1 - g) * torch.eye(4, dtype=torch.float64), (1 - ab) * torch.eye(d, dtype=torch.float64))
        o = torch.cat([z[i].flatten(), x[i].flatten()])
        logs, means = [], []
        for k in range(3):
            S = mix.stds[k] ** 2 * torch.eye(d, dtype=torch.float64)
            mu = mix.means[k].flatten()
            C = A @ S @ A.T + N
            logs.append(torch.distributions.MultivariateNormal(A @ mu, C).log_prob(o) + math.log(mix.weights[k]))
            means.append(mu + S @ A.T @ torch.linalg.solve(C, o - A @ mu))
        r = torch.softmax(torch.stack(logs), 0)
        to_eps = lambda x0: (x[i].flatten() - math.sqrt(ab) * x0) / math.sqrt(1 - ab)  # noqa: E731
        assert torch.allclose(eps[i].flatten(), to_eps(sum(r[k] * means[k] for k in range(3))), atol=1e-10)
        assert torch.allclose(eps_y[i].flatten(), to_eps(means[1]), atol=1e-10)


def test_levels_and_lowres_mixture():
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    assert aug_alpha_bar(levels)[0] == 1 and aug_alpha_bar(levels)[-1] == 0
    assert torch.allclose(aug_level_of(aug_alpha_bar(levels)), levels.double(), atol=1e-7)
    mix = detail_mixture()
    x, _ = mix.sample(4000, torch.Generator().manual_seed(0))
    low = lowres_mixture(mix, F)
    # D x_0 of each component: mean D mu_k, std s_k / f per low-resolution pixel
    rows = mixture_fit(low, downsample(x, F))
    # components 0 and 1 coincide at low resolution: the classifier splits their images between them
    assert abs(rows[2]["std_ratio"] - 1) < 0.05 and abs(rows[2]["freq_z"]) < 3.5


def oracle_stage(mix: GaussianMixture, sched, level: float, truncated: bool = False, steps: int = STEPS):
    lowres = {
        "name": "lowres",
        "from_resolution": mix.shape[1] // F,
        "aug_max": 0.5,
        "aug_level": level,
        "truncated": truncated,
        "factor": F,
    }
    model = Model(LowResOracle(mix, sched, F), sched, mix.shape, mix.K, False, {"model": "oracle"}, lowres=lowres)
    return plan_superres(model, DPM, steps)


@pytest.mark.parametrize("level", [0.0, 0.3])
def test_oracle_super_resolution_is_the_exact_conditional(level):
    """Given one augmented low-resolution image (ambiguous between components 0 and 1), the oracle's samples have
    the exact posterior's weights, means and spreads on and off the block-constant subspace, and their
    downsampled image matches the input within the augmentation noise (exactly, at level 0)."""
    mix, sched = detail_mixture(), make_schedule("cosine")
    g = float(aug_alpha_bar(level))
    x0 = mix.means[:1] + 0.12 * torch.randn(
        1, *mix.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = augment(downsample(x0, F), torch.tensor(level), noise)
    post = lowres_posterior(mix, z, level, F)
    assert 0.1 < float(post.weights[0, 0]) < 0.9 and float(post.weights[0, 2]) < 1e-4  # a real choice
    stage = oracle_stage(mix, sched, level)
    n = 2000
    from diffuse.diffusion.noise import PerSample, randn
    from diffuse.diffusion.superres import condition_lowres

    gen = PerSample(0, range(n))
    den = condition_lowres(stage.model.denoiser, z.expand(n, -1, -1, -1), level)
    x = stage.plan(den, randn((n, *mix.shape), gen, "cpu", torch.float64), generator=gen)
    rows = lowres_fit(post, 0, x)
    for r in rows[:2]:
        assert abs(r["weight"] - r["exact_weight"]) < 3 * r["weight_se"] + 0.01, rows
        assert r["mean_err"] < 0.1 and abs(r["std_q"] - 1) < 0.05, rows
        if level > 0:
            assert abs(r["std_p"] - 1) < 0.05, rows
    # the output's low-resolution image against z: z = b D x_0 + c e, so (z - b D x) / c is the noise, N(0, I)
    # up to the posterior's spread on P (exactly 0 at level 0)
    resid = z - math.sqrt(g) * downsample(x, F)
    if level == 0:
        assert float(resid.abs().max()) < 0.02
    else:
        post_sd = math.sqrt(float((post.weights[0] * post.var_p[0]).sum()))
        expected = math.sqrt((1 - g) - g * post_sd**2)  # Var(z - b D x) = c^2 - b^2 var_p (x from the posterior)
        assert abs(float(resid.std()) / expected - 1) < 0.1


@pytest.mark.parametrize("truncated", [False, True])
def test_oracle_cascade_reproduces_the_mixture(truncated):
    """Base oracle on the low-resolution mixture, then the super-resolution oracle: the cascade samples the
    high-resolution mixture itself (weights, means, spreads), truncated or not."""
    mix, sched = detail_mixture(), make_schedule("cosine")
    low = lowres_mixture(mix, F)
    base = Model(GMMDenoiser(low, sched), sched, low.shape, low.K, False, {"model": "oracle"})
    base_job = prepare_sampling(base, sampler=DPM, steps=STEPS, guidance=None, label=None, labels=None, n=1500, seed=0)
    stage = oracle_stage(mix, sched, 0.2, truncated=truncated)
    check_chain(base, [stage])
    job = CascadeJob(base_job, (stage,), base_job.denoiser)
    drawn = job.generate(list(range(1500)), device=torch.device("cpu"), batch_size=500, progress=False)
    assert drawn.images.shape == (1500, *mix.shape)
    base_calls = (
        len(truncation(base_job.plan, 0.2)[0].timesteps) - 1 if truncated else STEPS
    )  # up to the level, not below
    assert drawn.nfe == base_calls + STEPS and (base_calls < STEPS) == truncated
    rows = mixture_fit(mix, drawn.images)
    for r in rows:
        assert abs(r["freq_z"]) < 3.5 and r["mean_err"] < 0.15 and abs(r["std_ratio"] - 1) < 0.07, rows
    # the same images whatever the batch size: image i depends only on (seed, i)
    again = job.generate([7, 3], device=torch.device("cpu"), batch_size=1, progress=False)
    assert torch.allclose(again.images, drawn.images[[7, 3]], atol=1e-5)
