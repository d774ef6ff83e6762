"""diffuse tune-schedule: levels tuned to a model and a solver beat the stock ones on held-out x_T, the search
resumes exactly, and a tuned schedule round-trips through the checkpoint into diffuse sample."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffuse.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from diffuse.diffusion.samplers.common import sigma_of, time_list
from diffuse.diffusion.schedule import make_schedule
from diffuse.errors import UserError
from diffuse.nets import build_network
from diffuse.pipeline.config import to_dict
from diffuse.pipeline.sampling import plan_sampler
from diffuse.pipeline.tuning import SearchState, params_of, pattern_search, sigmas_of
from diffuse.tasks import sample as sample_task
from diffuse.tasks import tune_schedule as tune_task
from tests.conftest import TINY_UNET, compose

pytestmark = pytest.mark.usefixtures("one_thread")
ORACLE = ["model=oracle", "steps=6", "n=256", "n_eval=512", "tune.reference_steps=200"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-4, 4), min_size=1, max_size=12))
def test_any_parameters_give_ordered_levels_inside_the_schedule_and_invert(params):
    s = make_schedule("linear")
    sig = sigmas_of(params, s)
    assert len(sig) == len(params) + 1 and sig[0] == pytest.approx(float(s.sigmas[-1]), rel=1e-12)
    assert (sig[1:] < sig[:-1]).all() and sig[-1] > float(s.sigmas[0]) * (1 - 1e-12)
    assert torch.allclose(sigmas_of(params_of(sig, s), s), sig, rtol=1e-9)


def test_pattern_search_finds_a_quadratic_minimum_and_resumes_exactly():
    target = [0.3, -1.2, 2.0]

    def f(p):
        return sum((a - b) ** 2 for a, b in zip(p, target))

    full = pattern_search(f, SearchState([0.0, 0.0, 0.0], f([0.0, 0.0, 0.0]), 1.0), iterations=60, min_delta=1e-4)
    assert all(abs(a - b) < 1e-3 for a, b in zip(full.params, target)) and full.loss < 1e-6
    half = pattern_search(f, SearchState([0.0, 0.0, 0.0], f([0.0, 0.0, 0.0]), 1.0), iterations=20, min_delta=1e-4)
    again = pattern_search(
        f, SearchState.from_json(json.loads(json.dumps(half.to_json()))), iterations=60, min_delta=1e-4
    )
    assert again.params == full.params and again.evals == full.evals


@pytest.mark.slow
def test_tuned_levels_beat_the_stock_ones_on_held_out_x_T_and_resume_exactly(tmp_path):
    straight = tune_task.run(compose("tune_schedule", [*ORACLE, "tune.iterations=8"]), tmp_path / "a")
    h = straight["heldout"]
    assert h["tuned"]["geomean"] < 0.7 * h["stock"]["geomean"], h  # the figure tune.loss=logrms lowers
    assert straight["tune"]["tuned"]["geomean"] < straight["tune"]["stock"]["geomean"]
    assert (tmp_path / "a" / "levels.png").is_file() and json.loads((tmp_path / "a" / "schedule.json").read_text())[
        "steps"
    ] == 6
    tune_task.run(compose("tune_schedule", [*ORACLE, "tune.iterations=3"]), tmp_path / "b")
    resumed = tune_task.run(compose("tune_schedule", [*ORACLE, "tune.iterations=8", "resume=true"]), tmp_path / "b")
    assert resumed["sigmas"] == straight["sigmas"] and resumed["evals"] == straight["evals"]
    with pytest.raises(UserError, match="made for another model, solver, steps"):
        tune_task.run(compose("tune_schedule", [*ORACLE, "seed=1", "resume=true"]), tmp_path / "b")
    # The file is a schedule diffuse sample takes; another step count is refused.
    cfg = to_dict(
        compose(
            "sample", ["model=oracle", "sampler=dpm_solver", f"sampler.schedule={tmp_path / 'a' / 'schedule.json'}"]
        ).sampler
    )
    plan = plan_sampler(cfg, 6, make_schedule("linear"), False)
    visited = [sigma_of(plan.schedule, t) for t in time_list(plan.timesteps)]
    assert visited == pytest.approx(straight["sigmas"], rel=1e-6)
    with pytest.raises(UserError, match="tuned for dpm_solver at 6 steps, this run is dpm_solver at 7 steps"):
        plan_sampler(cfg, 7, make_schedule("linear"), False)


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = dict(TINY_UNET)
    net = build_network(model)
    path = tmp_path / "tiny.safetensors"
    config = {
        "model": model,
        "schedule": to_dict(compose("train", []).schedule),
        "objective": {"prediction": "eps"},
        "data": {"is_8bit": True, "num_classes": None},
    }
    save_checkpoint(path, Checkpoint(config=config, model=net.state_dict(), ema=net.state_dict()))
    return path


def test_a_tuned_schedule_round_trips_through_the_checkpoint(tiny_ckpt, tmp_path):
    args = [
        f"ckpt={tiny_ckpt}",
        "sampler=ddim",
        "steps=4",
        "n=8",
        "n_eval=8",
        "tune.reference_steps=40",
        "tune.iterations=2",
    ]
    result = tune_task.run(compose("tune_schedule", args), tmp_path / "t")
    ck = load_checkpoint(tiny_ckpt)  # still verifies
    assert ck.tuned["ddim/4"]["sigmas"] == result["sigmas"]
    tuned = sample_task.run(
        compose(
            "sample", [f"ckpt={tiny_ckpt}", "sampler=ddim", "steps=4", "n=3", "save_npz=true", "sampler.schedule=tuned"]
        ),
        tmp_path / "s1",
    )
    listed = "[" + ",".join(repr(s) for s in result["sigmas"]) + "]"
    explicit = sample_task.run(
        compose("sample", [f"ckpt={tiny_ckpt}", "sampler=ddim", "n=3", "save_npz=true", f"sampler.sigmas={listed}"]),
        tmp_path / "s2",
    )
    assert tuned["nfe"] == explicit["nfe"] == 4
    assert np.array_equal(
        np.load(tmp_path / "s1" / "samples.npz")["arr_0"], np.load(tmp_path / "s2" / "samples.npz")["arr_0"]
    )
    with pytest.raises(UserError, match="no tuned schedule for ddim at 5 steps \\(it has: ddim/4\\)"):
        sample_task.run(
            compose("sample", [f"ckpt={tiny_ckpt}", "sampler=ddim", "steps=5", "sampler.schedule=tuned"]),
            tmp_path / "s3",
        )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["sampler=ddpm"], "sampler=ddpm is stochastic"),
        (["sampler=ddim", "sampler.eta=1.0"], "sampler=ddim is stochastic"),
        (["steps=1"], "steps=1 is not allowed"),
        (["tune.reference_steps=3"], "tune.reference_steps=3 is not allowed: it must be >= 6"),
    ],
)
def test_refusals_come_before_any_work(args, needle, tmp_path):
    with pytest.raises(UserError, match=needle):
        tune_task.run(compose("tune_schedule", [*ORACLE, *args]), tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "entry,needle",
    [
        ([1, 2], "not a schedule written by diffuse tune-schedule"),
        ({"sampler": "dpm_solver", "steps": 3, "sigmas": [2.0, 1.0]}, "its steps and sigmas disagree"),
        ({"sampler": "dpm_solver", "steps": 3, "sigmas": [2.0, 1.0, 1.0]}, "must decrease strictly"),
        ({"sampler": "dpm_solver", "steps": 3, "sigmas": [0.5, 1.0, 2.0]}, "must decrease strictly"),
        ({"sampler": "dpm_solver", "steps": 3, "sigmas": [2.0, float("nan"), 0.5]}, "finite numbers > 0"),
        ({"sampler": "dpm_solver", "steps": 3, "sigmas": [2.0, 1.0, -0.5]}, "finite numbers > 0"),
        ({"sampler": "dpm_solver", "steps": 2, "sigmas": ["2", "1"]}, "finite numbers > 0"),
    ],
)
def test_a_hand_edited_schedule_file_or_tuned_entry_is_refused_in_one_line(entry, needle, tmp_path, tiny_ckpt):
    """schedule.json and a checkpoint's tuned entries are files a user may edit (issue 27, part 6)."""
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(entry))  # NaN as JSON's NaN, as Python's json writes it
    with pytest.raises(UserError, match=needle) as e:
        sample_task.run(
            compose("sample", ["model=oracle", "sampler=dpm_solver", "steps=3", f"sampler.schedule={path}"]),
            tmp_path / "s",
        )
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    ck = load_checkpoint(tiny_ckpt)
    ck.tuned = {"dpm_solver/3": entry}
    save_checkpoint(tmp_path / "edited.safetensors", ck)
    with pytest.raises(UserError, match=needle) as e:
        sample_task.run(
            compose(
                "sample",
                [f"ckpt={tmp_path / 'edited.safetensors'}", "sampler=dpm_solver", "steps=3", "sampler.schedule=tuned"],
            ),
            tmp_path / "s2",
        )
    assert "the checkpoint's tuned entry dpm_solver/3" in str(e.value)


def test_a_hand_edited_search_state_is_refused_on_resume_in_one_line(tmp_path):
    """tune_state.json cut short, a list, or its state's fields of the wrong kind (issue 27, part 6)."""
    run = tmp_path / "t"
    tune_task.run(compose("tune_schedule", [*ORACLE, "tune.iterations=1"]), run)
    state = run / "tune_state.json"
    good = json.loads(state.read_text())
    for text in (
        state.read_text()[:40],
        "[1, 2]",
        json.dumps({**good, "state": "x"}),
        json.dumps({**good, "state": {**good["state"], "params": ["a"]}}),
        json.dumps({**good, "state": {**good["state"], "delta": -1.0}}),
        json.dumps({**good, "state": {**good["state"], "iteration": -3}}),
        json.dumps({**good, "state": {**good["state"], "surprise": 1}}),
    ):
        state.write_text(text)
        with pytest.raises(UserError, match="is not a search tune-schedule wrote") as e:
            tune_task.run(compose("tune_schedule", [*ORACLE, "tune.iterations=2", "resume=true"]), run)
        assert "\n" not in str(e.value)
