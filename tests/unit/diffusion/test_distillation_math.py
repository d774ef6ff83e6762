"""The math of few-step training: progressive distillation's target, the consistency parametrisation and its
boundary condition, the discretisations and curricula, and the consistency sampler."""

import math

import pytest
import torch

from diffuse.diffusion import consistency as cm
from diffuse.diffusion import distillation as pd
from diffuse.diffusion.samplers import SAMPLERS
from diffuse.diffusion.schedule import coefficients, make_schedule
from diffuse.errors import UserError
from tests.conftest import GaussianFlow

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_ddim_step_with_the_target_reaches_the_teachers_two_steps():
    """x~ is defined by it: DDIM from (x_t, t) with x0 := x~ lands on the teacher's two-step result, at every
    student level, the last (to clean data) included."""
    s = make_schedule("linear")
    flow = GaussianFlow(s)
    fine = pd.teacher_grid(s, 8, "trailing")
    levels = pd.student_levels(fine, 4)
    x = flow.x_T(6).double()
    for i in range(4):
        t = torch.full((6,), int(levels[i]))
        t_mid = torch.full((6,), int(fine[2 * i + 1]))
        t_next = torch.full((6,), int(levels[i + 1]) if i + 1 < 4 else -1)
        a, sg = coefficients(s, t, x)
        x_t = a * x + sg * torch.randn_like(x)
        target = pd.teacher_target(flow.denoiser, x_t, t, t_mid, t_next, s)
        an, sn = coefficients(s, t_next, x_t)
        am, sm = coefficients(s, t_mid, x_t)
        eps = flow.denoiser(x_t, t)
        x_mid = pd.ddim_step(x_t, (x_t - sg * eps) / a, a, sg, am, sm)
        eps_mid = flow.denoiser(x_mid, t_mid)
        two = pd.ddim_step(x_mid, (x_mid - sm * eps_mid) / am, am, sm, an, sn)
        one = pd.ddim_step(x_t, target, a, sg, an, sn)
        assert torch.allclose(one, two, atol=1e-9), i


def test_progressive_loss_is_zero_for_the_exact_student_and_weighted_by_snr():
    """A student whose x0 prediction is the target has zero loss; the weights are max(SNR, 1) and SNR + 1."""
    s = make_schedule("linear")
    flow = GaussianFlow(s)
    fine = pd.teacher_grid(s, 4, "trailing")
    levels = pd.student_levels(fine, 2)
    x0 = flow.mu.expand(5, *flow.mu.shape).clone() + 0.5 * torch.randn(5, *flow.mu.shape, dtype=torch.float64)
    index = torch.tensor([0, 1, 0, 1, 1])
    noise = torch.randn_like(x0)

    def exact_student(x_t, t, y=None):  # returns eps of the target x0
        i = (levels == t[:1]).nonzero()[0, 0]
        t_next = torch.full_like(t, int(levels[i + 1]) if i + 1 < 2 else -1)
        tgt = pd.teacher_target(flow.denoiser, x_t, t, torch.full_like(t, int(fine[2 * i + 1])), t_next, s)
        a, sg = coefficients(s, t, x_t)
        return (x_t - a * tgt) / sg

    for i in (0, 1):  # one level per call so that the exact student knows its level
        sel = index == i
        loss = pd.progressive_loss(
            exact_student, "eps", flow.denoiser, x0[sel], s, fine, 2, index[sel], noise[sel], weighting="truncated_snr"
        )
        assert loss.abs().max() < 1e-8  # weights up to SNR(t_1) ~ 1e3 on float64 rounding
    t = torch.tensor([10, 999])
    snr = s.alpha_bar[t] / (1 - s.alpha_bar[t])
    assert (
        torch.allclose(pd.weight(s, t, "truncated_snr"), snr.clamp(min=1)) and pd.weight(s, t, "truncated_snr")[1] == 1
    )
    assert torch.allclose(pd.weight(s, t, "snr_plus_one"), snr + 1)
    with pytest.raises(UserError, match="distill.weighting='x'"):
        pd.weight(s, t, "x")


def test_rounds_halve_down_to_the_target():
    assert pd.rounds(64, 4) == [32, 16, 8, 4] and pd.rounds(2, 1) == [1]
    for start, target in ((64, 3), (64, 64), (48, 4), (64, 0)):
        with pytest.raises(UserError, match="distill.target_steps="):
            pd.rounds(start, target)
    s = make_schedule("linear")
    for spacing in pd.SPACINGS:
        grid = pd.teacher_grid(s, 128, spacing)
        assert torch.equal(grid, pd.student_levels(grid, 128)) and grid[0] == s.T - 1
        for n in (1, 2, 4, 8, 64):  # every other teacher level is a student level
            assert torch.equal(pd.student_levels(grid, 2 * n)[::2], pd.student_levels(grid, n))
    # log-SNR spacing: the levels' log-SNR evenly spaced between the schedule's ends
    ab = s.alpha_bar_at(pd.teacher_grid(s, 16, "logsnr"))
    lam = (ab / (1 - ab)).log()
    assert torch.allclose(lam.diff(), lam.diff()[:1].expand(15), rtol=1e-6)
    for start, key in ((2000, "distill.start_steps=2000"),):
        with pytest.raises(UserError, match=key):
            pd.teacher_grid(s, start, "trailing")
    with pytest.raises(UserError, match="distill.spacing='karras'"):
        pd.teacher_grid(s, 16, "karras")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_consistency_boundary_condition_holds_exactly_at_sigma_min(prediction):
    """f(x, sigma_min) = x~ whatever the network: c_skip = 1 and c_out = 0 there."""
    s = make_schedule("linear")
    torch.manual_seed(0)
    w = torch.randn(3, 1, 1)

    def net(x, t, y=None):
        return x * w + 3.0

    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    t0 = torch.zeros(4, dtype=torch.long)
    a, _ = coefficients(s, t0, x)
    f = cm.consistency_fn(net, prediction, s, x, t0)
    assert torch.equal(f, x / a)
    c_skip, c_out = cm.skip_out(torch.tensor([float(s.sigmas[0])], dtype=torch.float64), float(s.sigmas[0]), 0.5)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    big = cm.consistency_fn(net, prediction, s, x, torch.full((4,), 999))
    assert not torch.allclose(big, x / coefficients(s, torch.full((4,), 999), x)[0])


def test_consistency_of_an_exact_flow_map_samples_the_gaussian_in_one_step():
    """Given the closed-form flow end as f, the 1-step consistency sampler returns it exactly (f(x_T)), and with
    more steps each re-noised guess lands again on the data: the samples keep the Gaussian's mean and spread."""
    s = make_schedule("linear")
    flow = GaussianFlow(s, s=0.3)

    def flow_denoiser(x_t, t, y=None):  # eps whose x0 is the flow's clean end from (x_t, t)
        tt = t[0].item()
        x0 = flow.flow(x_t, int(tt), -1)
        a, sg = coefficients(s, t, x_t)
        return (x_t - a * x0) / sg

    x_T = flow.x_T(4000)
    ts = torch.tensor([999])
    one = SAMPLERS["consistency"](flow_denoiser, x_T, ts, s)
    assert torch.allclose(one, flow.flow(x_T, 999, -1), atol=1e-10)
    g = torch.Generator().manual_seed(0)
    two = SAMPLERS["consistency"](flow_denoiser, x_T, torch.tensor([999, 499]), s, generator=g)
    assert (two.mean(0) - flow.mu).abs().max() < 4 * 0.3 / math.sqrt(4000)
    assert abs(two.std(0).mean().item() / 0.3 - 1) < 0.03


def test_curricula_and_discretisation():
    s = make_schedule("linear")
    lv = cm.karras_levels(s, 18)
    assert (
        lv[0] == pytest.approx(float(s.sigmas[0]))
        and lv[-1] == pytest.approx(float(s.sigmas[-1]))
        and (lv[1:] > lv[:-1]).all()
    )
    assert cm.ict_levels(0, 1000) == 11 and cm.ict_levels(999, 1000) == 1281
    assert [cm.ict_levels(k, 800) for k in (0, 99, 100, 700)] == [11, 11, 21, 1281]
    assert cm.cd_levels(0, 100) == 2 and cm.cd_levels(100, 100) == 151
    g = torch.Generator().manual_seed(0)
    idx = cm.lognormal_indices(lv, 20000, g)
    assert idx.min() >= 0 and idx.max() <= len(lv) - 2
    # Log-normal around exp(-1.1) = 0.33: the pairs near it are drawn more than the extreme ones.
    near = int(((lv[idx] < 1) & (lv[idx + 1] > 0.1)).sum())
    assert near > (idx == len(lv) - 2).sum()
    a, b = torch.zeros(3, 4), torch.ones(3, 4)
    assert torch.allclose(cm.pair_distance(a, b, "l2"), torch.ones(3))
    c = 0.00054 * 2
    assert torch.allclose(cm.pair_distance(a, b, "pseudo_huber"), torch.full((3,), (math.sqrt(4 + c * c) - c) / 2))
