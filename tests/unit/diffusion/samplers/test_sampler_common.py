"""The common call and loops of samplers/common.py: the signature `sampler` gives every registered sampler (the
pipeline reads it to refuse config keys), the sigma walk, and the one-evaluation multistep loop."""

import inspect

import pytest
import torch

from diffuse.diffusion.samplers import SAMPLERS
from diffuse.diffusion.samplers.common import Run, levels, multistep, sampler, sigma_of, sigma_steps
from diffuse.diffusion.schedule import make_schedule
from diffuse.errors import UserError
from diffuse.pipeline.sampling import CALL_ARGS

COMMON = {"generator": None, "y": None, "clip_x0": False, "hook": None}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_has_the_common_signature(name):
    fn = SAMPLERS[name]
    params = inspect.signature(fn).parameters
    head = list(params)[:4]
    assert head == ["denoiser", "x_T", "timesteps", "schedule"]
    assert all(params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in head)
    rest = [p for p in params.values() if p.name not in head]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)
    assert {k: params[k].default for k in COMMON} == COMMON
    # Its own options have defaults and none of them is an argument the caller gives.
    own = [p for p in rest if p.name not in COMMON]
    assert all(p.default is not inspect.Parameter.empty for p in own)
    assert not {p.name for p in own} & (CALL_ARGS - {"learned_variance"})
    assert fn.__name__ == fn.__qualname__ == name


def test_sampler_passes_the_call_and_its_options_and_runs_without_grad():
    seen = {}

    def core(run: Run, *, scale: float = 2.0):
        seen.update(run=run, scale=scale, grad=torch.is_grad_enabled())
        return run.hooked(run.x_T * scale, -1)

    fn = sampler(core, name="scaled")
    assert fn.__name__ == "scaled"
    assert list(inspect.signature(fn).parameters) == [
        "denoiser", "x_T", "timesteps", "schedule", "scale", "generator", "y", "clip_x0", "hook"
    ]  # fmt: skip
    x = torch.ones(2, requires_grad=True)
    out = fn("D", x, "ts", "S", scale=3.0, y=5, clip_x0=True, hook=lambda v, t: v + t)
    assert torch.equal(out, torch.full((2,), 2.0)) and not out.requires_grad
    assert seen["scale"] == 3.0 and seen["grad"] is False
    assert seen["run"] == Run("D", x, "ts", "S", None, 5, True, seen["run"].hook)
    with pytest.raises(TypeError):
        fn("D", x, "ts", "S", shift=1.0)


def test_sigma_steps_end_at_clean_data():
    schedule = make_schedule("linear", T=100)
    steps = sigma_steps(torch.tensor([90, 40, 5]), schedule)
    assert [(t, nxt) for t, nxt, _, _ in steps] == [(90, 40), (40, 5), (5, -1)]
    assert [s for _, _, s, _ in steps] == [sigma_of(schedule, t) for t in (90, 40, 5)]
    assert [s for _, _, _, s in steps] == [sigma_of(schedule, 40), sigma_of(schedule, 5), 0.0]
    assert sigma_steps(torch.zeros(0, dtype=torch.long), schedule) == []


def test_multistep_loop_steps_between_levels_and_ends_at_x0():
    schedule = make_schedule("linear", T=100)
    timesteps = torch.tensor([90, 40, 5])
    calls, hooked, evaluated = [], [], []

    def denoiser(x, t, y=None):
        evaluated.append(int(t[0]))
        return torch.zeros_like(x)

    def step(i, x, x0, eps, cur, nxt):
        calls.append((i, cur.t, nxt.t))
        return x + 1

    def hook(x, t):
        hooked.append(t)
        return x

    x_T = torch.ones(1, 2)
    run = Run(denoiser, x_T, timesteps, schedule, None, None, False, hook)
    out = multistep(run, step, afs=True)
    # AFS stands in for the network at the first level; the step to clean data is x0_hat, not a call of `step`.
    assert evaluated == [40, 5]
    assert calls == [(0, 90, 40), (1, 40, 5)]
    assert hooked == [40, 5, -1]
    last = levels(timesteps, schedule)[2]
    assert torch.allclose(out, (x_T + 2) / last.alpha)
    assert multistep(run._replace(timesteps=timesteps[:0]), step, afs=False) is x_T


def test_flag_check_keeps_its_message():
    with pytest.raises(UserError, match=r"^sampler\.afs=1 is not allowed: true or false$"):
        SAMPLERS["deis"](None, torch.zeros(1), torch.zeros(0, dtype=torch.long), make_schedule(), afs=1)
