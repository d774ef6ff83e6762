"""The adaptive-step DPM-Solver-12/23: its embedded pair's local orders, error and NFE against the tolerance, the
cost of an attempt, per-sample step control (image i independent of its batch), the budget, hooks and options."""

import math

import pytest
import torch

from diffuse.diffusion.samplers import SAMPLERS
from diffuse.diffusion.samplers.adaptive import _Levels, adaptive, step_pair
from diffuse.diffusion.samplers.common import Level, alpha_bar_of
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import sampler_timesteps
from diffuse.errors import UserError
from diffuse.pipeline.config import to_dict
from diffuse.pipeline.sampling import CountingDenoiser, generate, plan_sampler
from tests.conftest import GaussianFlow, observed_orders

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flow():
    schedule = make_schedule("linear")
    return schedule, GaussianFlow(schedule)


def ends(schedule):
    return sampler_timesteps(schedule, 2, "logsnr")  # T-1 and 0: only the ends count


def lam_of(schedule, t) -> float:
    ab = alpha_bar_of(schedule, t)
    return 0.5 * math.log(ab / (1 - ab))


def rms_error(out, ref) -> float:
    return float((out - ref).flatten(1).pow(2).mean(1).sqrt().max())


def test_registered_and_config_composes(compose_cfg, flow):
    schedule, _ = flow
    assert SAMPLERS["adaptive"] is adaptive
    cfg = to_dict(compose_cfg("sample", ["sampler=adaptive"]).sampler)
    plan = plan_sampler(cfg, None, schedule, clip_default=False)
    assert plan.steps == 2 and plan.options["order"] == 3 and plan.options["per_sample"] is True


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("lam0", [0.0, 2.0])
def test_embedded_pair_local_orders(flow, order, lam0):
    """One step of the pair against the exact flow: x_low's local error is O(h^order), x_high's O(h^(order+1)).
    Margin 0.2 on the two finest halvings (h = 0.1 -> 0.05): measured 1.87-2.03 / 2.86-2.99 (low), 2.92-3.02 /
    3.92-4.14 (high); the ratios approach the asymptotic value from below at lam0 = 2 (larger h^(p+1) terms).
    A wrong coefficient (c2, c3, r2, the D'' estimate) drops an order."""
    schedule, g = flow
    end = Level(0, schedule)
    x_T = g.x_T(4)
    cur = _Levels.at(torch.full((4,), lam0, dtype=torch.float64), end, schedule)
    t0 = float(cur.t[0])
    x = g.flow(x_T, 999, t0)

    def D(u, lv):
        eps = g.denoiser(u, lv.t)
        return (u - lv.sigma.view(-1, 1, 1, 1) * eps) / lv.alpha.view(-1, 1, 1, 1)

    low, high = [], []
    for h in (0.8, 0.4, 0.2, 0.1, 0.05):
        nxt = _Levels.at(cur.lam + h, end, schedule)
        x_low, x_high = step_pair(D, x, cur, nxt, schedule, end, order, torch.ones(4, dtype=torch.bool))
        exact = g.flow(x, t0, float(nxt.t[0]))
        low.append(float((x_low - exact).abs().max()))
        high.append(float((x_high - exact).abs().max()))
    assert min(observed_orders(low)[-2:]) > order - 0.2, observed_orders(low)
    assert min(observed_orders(high)[-2:]) > order + 1 - 0.2, observed_orders(high)


@pytest.mark.parametrize("order", [2, 3])
def test_error_and_nfe_follow_the_tolerance(flow, order):
    """Against the exact flow (GaussianFlow.reference over the same ends), with atol = 0.156 rtol (the defaults'
    ratio): the worst image's RMS error shrinks and NFE grows as the tolerance shrinks, and the error stays
    below rtol itself (the tolerance at |x| = 1): measured at most 0.32 rtol (order 2) and 0.13 rtol (order 3).
    Looser tolerances (rtol >= 0.05) are left out: there a rejection or two decide the count, not the tolerance."""
    schedule, g = flow
    x_T, ts = g.x_T(8), ends(schedule)
    ref = g.reference(x_T, ts)
    errs, nfes = [], []
    for rtol in (0.02, 0.005, 0.001):
        counter = CountingDenoiser(g.denoiser)
        out = adaptive(counter, x_T, ts, schedule, order=order, rtol=rtol, atol=0.156 * rtol)
        errs.append(rms_error(out, ref))
        nfes.append(counter.calls)
        assert errs[-1] <= rtol, (rtol, errs)
    assert errs[0] > errs[1] > errs[2], errs
    assert nfes[0] < nfes[1] < nfes[2], nfes


@pytest.mark.parametrize("order", [2, 3])
def test_every_attempt_costs_order_evaluations(flow, order):
    """NFE = order * attempts + 1: the calls come in groups of `order` at lambda_s + r h (r = 0, 1/2 or 0, 1/3,
    2/3), each group starts where the last one started (rejected) or ended (accepted), the last accepted attempt
    ends on timesteps[-1], and one more call there gives x0_hat. The default tolerances reject some attempts here."""
    schedule, g = flow
    ts = torch.tensor([999, 0])  # integer ends stay integer steps for the network
    calls = []

    def den(x, t, y=None):
        calls.append(t[0].item())
        return g.denoiser(x, t, y)

    adaptive(den, g.x_T(1), ts, schedule, order=order)
    assert (len(calls) - 1) % order == 0 and calls[-1] == 0 and isinstance(calls[-1], int) and calls[0] == 999
    lams = [lam_of(schedule, t) for t in calls[:-1]]
    groups = [lams[i : i + order] for i in range(0, len(lams), order)]
    rs = (0.5,) if order == 2 else (1 / 3, 2 / 3)
    pos, rejected = lam_of(schedule, 999), 0
    for grp in groups:
        assert grp[0] == pytest.approx(pos, abs=1e-9)
        h = (grp[1] - grp[0]) / rs[0]
        assert h > 0
        for lam, r in zip(grp[1:], rs):
            assert lam - grp[0] == pytest.approx(r * h, rel=1e-6)
        nxt = groups[groups.index(grp) + 1][0] if grp is not groups[-1] else lam_of(schedule, 0)
        if nxt == pytest.approx(pos, abs=1e-9):
            rejected += 1
        else:
            assert nxt == pytest.approx(pos + h, rel=1e-6)
            pos = nxt
    assert pos == pytest.approx(lam_of(schedule, 0), abs=1e-9)
    assert rejected >= 1


def test_per_sample_control_makes_each_image_independent_of_its_batch(oracle_setup):
    """per_sample=True: image i is the same in a batch of 8 and alone. per_sample=False: one step sequence for
    the batch, so some image changes (by about the tolerance) when drawn alone: the trade-off the option is for."""
    mixture, schedule, den = oracle_setup
    x_T = torch.randn((8, *mixture.shape), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = ends(schedule)
    for order in (2, 3):
        whole = adaptive(den, x_T, ts, schedule, order=order)
        alone = torch.cat([adaptive(den, x_T[i : i + 1], ts, schedule, order=order) for i in range(8)])
        assert torch.allclose(whole, alone, atol=1e-10, rtol=0)
        batched = adaptive(den, x_T, ts, schedule, order=order, per_sample=False)
        alone_b = torch.cat(
            [adaptive(den, x_T[i : i + 1], ts, schedule, order=order, per_sample=False) for i in range(8)]
        )
        assert torch.equal(alone, alone_b)  # a batch of one is the same either way
        assert (batched - alone_b).abs().max() > 1e-6


def test_pipeline_images_do_not_depend_on_the_batch_size(compose_cfg, oracle_setup):
    """Through plan_sampler and generate (float32 noise from (seed, i)): batches of 6 and of 4 + 2 agree."""
    mixture, schedule, den = oracle_setup
    plan = plan_sampler(
        to_dict(compose_cfg("sample", ["sampler=adaptive"]).sampler), None, schedule, clip_default=False
    )

    def draw(batch_size):
        return generate(
            den,
            plan,
            shape=mixture.shape,
            seed=0,
            device=torch.device("cpu"),
            batch_size=batch_size,
            indices=list(range(6)),
            progress=False,
        )

    a, b = draw(6), draw(4)
    assert a.images.dtype == torch.float32 and a.nfe > 0
    assert torch.allclose(a.images, b.images, atol=1e-6, rtol=0)


def test_budget_is_a_hard_cap(flow):
    schedule, g = flow
    x_T, ts = g.x_T(4), ends(schedule)
    counter = CountingDenoiser(g.denoiser)
    out = adaptive(counter, x_T, ts, schedule, order=3, rtol=0.01, atol=0.002)
    need = counter.calls
    assert torch.equal(adaptive(g.denoiser, x_T, ts, schedule, order=3, rtol=0.01, atol=0.002, max_nfe=need), out)
    counter = CountingDenoiser(g.denoiser)
    with pytest.raises(UserError, match=rf"sampler\.max_nfe={need - 1} was spent") as e:
        adaptive(counter, x_T, ts, schedule, order=3, rtol=0.01, atol=0.002, max_nfe=need - 1)
    assert "\n" not in str(e.value) and counter.calls <= need - 1


def test_hook_after_each_accepted_step(flow):
    """With batch control the hook sees one timestep per accepted step, decreasing to timesteps[-1], then -1;
    its output is what the solver goes on from (and returns at the end)."""
    schedule, g = flow
    ts = sampler_timesteps(schedule, 5, "karras")  # the middle ones are ignored
    seen = []

    def hook(x, t_next):
        seen.append(t_next)
        return torch.full_like(x, 7.0) if t_next == -1 else x

    out = adaptive(g.denoiser, g.x_T(4), ts, schedule, per_sample=False, hook=hook)
    assert torch.equal(out, torch.full_like(out, 7.0))
    assert seen[-1] == -1 and seen[-2] == float(ts[-1]) and len(seen) >= 4
    assert all(a > b for a, b in zip(seen, seen[1:]))
    with pytest.raises(UserError, match="sampler.per_sample=true cannot be used with a step hook"):
        adaptive(g.denoiser, g.x_T(4), ts, schedule, hook=hook)
    assert adaptive(g.denoiser, g.x_T(1), ts, schedule, hook=hook).eq(7).all()  # a batch of one is fine


def test_one_timestep_is_x0_hat_there(flow):
    schedule, g = flow
    x_T = g.x_T(3)
    counter = CountingDenoiser(g.denoiser)
    out = adaptive(counter, x_T, torch.tensor([999]), schedule)
    ab = float(schedule.alpha_bar[999])
    eps = g.denoiser(x_T, torch.full((3,), 999))
    assert counter.calls == 1 and torch.allclose(out, (x_T - (1 - ab) ** 0.5 * eps) / ab**0.5, atol=1e-12)


BAD = [
    ("order", 1, "order=1"),
    ("order", 4, "order=4"),
    ("order", True, "order=True"),
    ("rtol", -0.1, "rtol=-0.1"),
    ("rtol", float("nan"), "rtol=nan"),
    ("rtol", "0.05", "rtol='0.05'"),
    ("atol", 0, "atol=0"),
    ("atol", -1e-3, "atol=-0.001"),
    ("atol", float("inf"), "atol=inf"),
    ("h_init", 0.0, "h_init=0.0"),
    ("h_init", None, "h_init=None"),
    ("max_nfe", 3, "max_nfe=3"),
    ("max_nfe", 50.0, "max_nfe=50.0"),
    ("max_nfe", True, "max_nfe=True"),
    ("per_sample", "yes", "per_sample='yes'"),
    ("dynamic_percentile", 1.5, "dynamic_percentile=1.5"),
]


@pytest.mark.parametrize("key,value,needle", BAD)
def test_bad_options_refused_without_a_denoiser_call(flow, key, value, needle):
    schedule, _ = flow
    empty = torch.zeros(0, dtype=torch.long)
    x = torch.zeros(1)
    assert adaptive(None, x, empty, schedule) is x
    with pytest.raises(UserError, match="sampler." + needle.replace(".", r"\.")) as e:
        adaptive(None, x, empty, schedule, **{key: value})
    assert "\n" not in str(e.value)


def test_max_nfe_needs_one_attempt_and_the_last_step(flow):
    schedule, g = flow
    adaptive(None, torch.zeros(1), torch.zeros(0, dtype=torch.long), schedule, order=2, max_nfe=3)  # 2 + 1: allowed
    with pytest.raises(UserError, match=r"sampler\.max_nfe=2"):
        adaptive(None, torch.zeros(1), torch.zeros(0, dtype=torch.long), schedule, order=2, max_nfe=2)
