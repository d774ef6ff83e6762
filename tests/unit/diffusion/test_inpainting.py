"""Inpainting against the exact conditional of a Gaussian mixture (the oracle denoiser is the ground truth)."""

import pytest
import torch

from diffuse.data.gmm import GaussianMixture
from diffuse.diffusion.inpainting import jump_schedule, repaint, repaint_nfe, replace_hook
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import ddim, ddpm
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import make_timesteps
from diffuse.metrics.mixture import format_inpaint_fit, inpaint_fit, inpaint_posterior

N = 1000


def problem():
    """Three 1x4x4 components; the left half is known. Its value lies between components 0 and 1 (nearer 1),
    which differ on the right half: the known pixels turn the prior 0.6 : 0.2 into about 0.38 : 0.62."""
    means = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    means[0, :, :, :2] = 0.4
    means[0, :, :, 2:] = 0.3
    means[1, :, :, :2] = 0.2
    means[1, :, :, 2:] = -0.1
    means[2, :, :, :2] = -0.6
    means[2, :, :, 2:] = 0.0
    mix = GaussianMixture(
        means, torch.tensor([0.1, 0.1, 0.15], dtype=torch.float64), torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)
    )
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    x_known = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x_known[..., :2] = 0.29
    return mix, keep, x_known


def test_posterior_weights_match_bayes_by_brute_force():
    """Component weights given the known pixels, against sampling the mixture and weighting by the known
    pixels' likelihood under a narrow kernel is too slow; instead check Bayes' rule term by term."""
    mix, keep, x_known = problem()
    w = inpaint_posterior(mix, x_known, keep)
    xk = x_known[0, 0, :, :2].flatten()
    lik = torch.stack(
        [torch.distributions.Normal(mix.means[k, 0, :, :2].flatten(), mix.stds[k]).log_prob(xk).sum() for k in range(3)]
    )
    expected = torch.softmax(torch.log(mix.weights) + lik, 0)
    assert torch.allclose(w, expected, atol=1e-12)
    assert 0.3 < w[0] < 0.45 and 0.55 < w[1] < 0.7 and w[2] < 1e-6  # genuinely ambiguous, re-weighted
    # nothing known: the prior
    assert torch.allclose(inpaint_posterior(mix, x_known, torch.zeros_like(keep)), mix.weights)


def test_jump_schedule_counts():
    levels = jump_schedule(50, 10, 3)
    assert levels[0] == 50 and levels[-1] == 0
    assert all(a - b == 1 or b - a == 10 for a, b in zip(levels, levels[1:]))
    # Lugmayr et al.'s code: jump points at timestep indices range(0, T - jump_length, jump_length), 4 of them
    # here and 24 for their 250 steps, each walked (resamples - 1) more times over jump_length steps.
    assert repaint_nfe(50, 10, 3) == 50 + 4 * 2 * 10 == 130
    assert repaint_nfe(250, 10, 10) == 250 + 24 * 9 * 10 == 2410
    assert repaint_nfe(50, 10, 1) == 50 and jump_schedule(7, 10, 4) == list(range(7, -1, -1))


def ups(levels):
    return sorted({a for a, b in zip(levels, levels[1:]) if b > a})


@pytest.mark.parametrize(
    "steps,jump_length,resamples,jump_last",
    [
        (50, 10, 3, 1.0),
        (250, 10, 10, 1.0),
        (50, 5, 10, 0.1),
        (50, 5, 10, 0.2),
        (11, 10, 2, 1.0),
        (10, 10, 3, 1.0),
        (7, 3, 3, 0.0),
    ],
)
def test_jump_schedule_never_leaves_the_clean_output(steps, jump_length, resamples, jump_last):
    """Level 0 is the final output: the walk reaches it once, as its last entry, and never jumps from it
    (Algorithm 1 resamples only at t > 1)."""
    levels = jump_schedule(steps, jump_length, resamples, jump_last)
    assert levels[0] == steps and levels[-1] == 0 and levels.count(0) == 1
    assert 0 not in ups(levels) and all(b == a - 1 for a, b in zip(levels, levels[1:]) if a == 0 or b == 0)
    assert all(1 <= r and r + jump_length <= steps for r in ups(levels))
    assert repaint_nfe(steps, jump_length, resamples, jump_last) == steps + (resamples - 1) * jump_length * len(
        ups(levels)
    )


def test_jump_schedule_small_case_by_hand():
    """7 steps, jump_length 3, 3 walks: the paper's points j in range(0, 7 - 3, 3) = {0, 3} are levels 1 and 4."""
    assert jump_schedule(7, 3, 3) == [7, 6, 5, 4, 7, 6, 5, 4, 7, 6, 5, 4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1, 0]
    assert repaint_nfe(7, 3, 3) == 7 + 2 * 2 * 3
    # jump_last: only points r <= jump_last * steps, from the clean end; 0 leaves none (replace's walk).
    assert jump_schedule(7, 3, 3, 3 / 7) == [7, 6, 5, 4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1, 0]
    assert ups(jump_schedule(7, 3, 3, 4 / 7)) == [1, 4]
    assert jump_schedule(7, 3, 3, 0.0) == [7, 6, 5, 4, 3, 2, 1, 0]


@pytest.fixture(scope="module")
def runs():
    mix, keep, x_known = problem()
    sched = make_schedule("linear")
    den = GMMDenoiser(mix, sched)
    x_T = torch.randn((N, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    known = x_known.expand(N, -1, -1, -1)
    ts = make_timesteps(1000, 50)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    rep = ddpm(den, x_T, ts, sched, variance="beta_tilde", generator=g(1), hook=replace_hook(known, keep, sched, g(2)))
    rp = repaint(den, x_T, ts, sched, known, keep, jump_length=10, resamples=3, variance="beta_tilde", generator=g(3))
    return (
        mix,
        keep,
        x_known,
        {"replace": inpaint_fit(mix, rep, x_known, keep), "repaint": inpaint_fit(mix, rp, x_known, keep)},
    )


def test_replace_and_repaint_against_the_exact_conditional(runs):
    mix, keep, x_known, fits = runs
    for name, fit in fits.items():
        print(f"\n{name}, 50 base steps, n={N}\n" + format_inpaint_fit(fit))
    for name, fit in fits.items():
        assert fit["known_exact"], name
        # Each component's filled pixels are centred on its mean (RMS error < 0.15 s_k) ...
        for r in fit["rows"][:2]:
            assert r["mean_err"] < 0.15, (name, r)
        # ... and the conditional's impossible component is (almost) never drawn.
        assert fit["rows"][2]["freq"] < 0.03, name
        # Tolerance in total variation between component frequencies and posterior weights. Both methods
        # keep much of the prior's bias toward component 0 at 50 steps (see the note): a stated, loose bound.
        assert fit["tv"] < 0.40, (name, fit["tv"])
    # Neither corrects it: the known pixels' evidence (1.6 nats) is only clear near t = 0, after the missing
    # pixels have chosen; RePaint's resampling does not change that (bench/inpaint_table.py), so the two are
    # within sampling noise of each other on frequencies.
    assert abs(fits["repaint"]["tv"] - fits["replace"]["tv"]) < 0.05


def rare_component():
    """Two 1x4x4 components, std 0.1; the three left columns are known. Component 1 has prior weight 0.2 but the
    known pixels sit exactly on its mean, 0.4 (four stds) from component 0's on each of 12 pixels: the exact
    conditional is component 1 with probability 1 - 1e-40. The missing column differs by 1.0 between them."""
    means = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    means[0, ..., :3] = 0.2
    means[0, ..., 3:] = 0.5
    means[1, ..., :3] = -0.2
    means[1, ..., 3:] = -0.5
    mix = GaussianMixture(
        means, torch.tensor([0.1, 0.1], dtype=torch.float64), torch.tensor([0.8, 0.2], dtype=torch.float64)
    )
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :3] = 1
    x_known = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x_known[..., :3] = -0.2
    return mix, keep, x_known


def run_rare(n: int, seed: int = 0, steps: int = 50, repaint_options=None):
    """Replace and RePaint (unless given: ddpm with variance beta, 50 base steps, jump_length 5, resamples 10,
    jump_last 0.2, i.e. jump points at levels 1 and 6, NFE 140) on rare_component(), against its exact conditional."""
    mix, keep, x_known = rare_component()
    sched = make_schedule("linear")
    den = GMMDenoiser(mix, sched)
    x_T = torch.randn((n, 1, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    known = x_known.expand(n, -1, -1, -1)
    g = lambda s: torch.Generator().manual_seed(1000 * seed + s)  # noqa: E731
    ts = make_timesteps(1000, steps)
    rep = ddpm(den, x_T, ts, sched, variance="beta", generator=g(1), hook=replace_hook(known, keep, sched, g(2)))
    opts = repaint_options or {"jump_length": 5, "resamples": 10, "jump_last": 0.2}
    rp = repaint(den, x_T, ts, sched, known, keep, variance="beta", generator=g(3), **opts)
    return mix, {"replace": inpaint_fit(mix, rep, x_known, keep), "repaint": inpaint_fit(mix, rp, x_known, keep)}


def test_repaint_corrects_replace_where_the_known_pixels_overrule_the_prior():
    """Replace decides the component while the known pixels are still hazy, so it keeps much of the prior's 0.8
    for component 0; RePaint's resampling near the clean end lets the clear known pixels overrule it. Stated
    tolerances for RePaint (run_rare's options, NFE 140): component frequencies within 0.1 in total variation of the
    exact conditional, and the drawn component's filled pixels centred on its mean (RMS error < 0.2 s_k) with
    its spread (std ratio within 15%)."""
    _, fits = run_rare(2000)
    for name, fit in fits.items():
        print(f"\n{name}, rare component, n=2000\n" + format_inpaint_fit(fit))
    rep, rp = fits["replace"], fits["repaint"]
    assert rep["known_exact"] and rp["known_exact"]
    assert rep["tv"] > 0.3  # the problem does discriminate: replace is measurably wrong here
    assert rp["tv"] <= rep["tv"] and rp["tv"] < 0.1, (rp["tv"], rep["tv"])
    drawn = rp["rows"][1]
    assert drawn["mean_err"] < 0.2 and 0.85 < drawn["std_ratio"] < 1.15, drawn
    assert drawn["mean_err"] <= max(0.05, rep["rows"][1]["mean_err"])


def test_repaint_jump_schedule_window():
    """jump_last puts the jump points at the clean end: levels 1 and 6 of 50 at jump_last 0.2, level 1 alone at
    0.1; 1 is the paper's schedule."""
    assert ups(jump_schedule(50, 5, 10, 0.2)) == [1, 6] and repaint_nfe(50, 5, 10, 0.2) == 50 + 2 * 9 * 5 == 140
    assert ups(jump_schedule(50, 5, 10, 0.1)) == [1] and repaint_nfe(50, 5, 10, 0.1) == 50 + 9 * 5
    assert ups(jump_schedule(50, 10, 3, 1.0)) == [1, 11, 21, 31]
    assert repaint_nfe(50, 10, 3, 1.0) == repaint_nfe(50, 10, 3) == 130
    assert repaint_nfe(50, 10, 4, 0.0) == 50  # no jump points: replace's walk


def test_component_one_is_reweighted(runs):
    _, _, _, fits = runs
    # Without re-weighting by the known pixels the frequencies would be the prior's (TV 0.22 from the
    # posterior); both methods move component 1 above its prior weight 0.2 relative to component 2.
    for fit in fits.values():
        assert fit["rows"][1]["freq"] > 0.2


def test_replace_hook_works_with_ddim_and_pastes_known_pixels():
    mix, keep, x_known = problem()
    sched = make_schedule("linear")
    den = GMMDenoiser(mix, sched)
    x_T = torch.randn((64, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # a known half that only component 2 explains: every completion must come from it
    x_known = x_known.clone()
    x_known[..., :2] = -0.6
    known = x_known.expand(64, -1, -1, -1)
    x = ddim(
        den,
        x_T,
        make_timesteps(1000, 20),
        sched,
        hook=replace_hook(known, keep, sched, torch.Generator().manual_seed(1)),
    )
    fit = inpaint_fit(mix, x, x_known, keep)
    assert fit["known_exact"] and fit["rows"][2]["freq"] > 0.85
    # and the unconstrained sampler from the same noise does not
    free = inpaint_fit(mix, ddim(den, x_T, make_timesteps(1000, 20), sched), x_known, keep)
    assert not free["known_exact"] and free["rows"][2]["freq"] < 0.6
