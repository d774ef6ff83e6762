"""The pieces the Trainer hands its objectives and the loop reads back: a Batch draws for the whole global batch and
keeps this rank's rows (so a run is the same whatever the world size), each objective says its own status, its own
networks go into the checkpoint and come back, a progressive round ends where the trainer restarts its optimizer,
and the metrics reader passes over half-written lines."""

import json
import re

import pytest
import torch

from diffuse.diffusion.schedule import make_schedule
from diffuse.distributed import Dist
from diffuse.errors import UserError
from diffuse.pipeline.config import to_dict
from diffuse.training.classifier import ClassifierObjective
from diffuse.training.config import learning_rate, network_config
from diffuse.training.curves import complete_lines, read_records
from diffuse.training.loop import trim_metrics
from diffuse.training.objectives import (
    Batch,
    ConsistencyObjective,
    ProgressiveObjective,
    Status,
    saved_net,
    saved_part,
)
from tests.conftest import compose

CPU = torch.device("cpu")


def _batch(rows: slice, seed: int = 3, size: int = 6) -> Batch:
    x0 = torch.zeros(rows.stop - rows.start, 2, 4, 4, dtype=torch.float64)
    return Batch(x0, None, size, rows, torch.Generator().manual_seed(seed), step=0)


@pytest.mark.parametrize(
    "draw",
    [
        lambda b: b.noise(),
        lambda b: b.normal(dtype=torch.float64),
        lambda b: b.uniform(),
        lambda b: b.integers(1000),
    ],
)
def test_a_batch_draws_for_the_global_batch_and_keeps_its_rows(draw):
    whole = draw(_batch(slice(0, 6)))
    halves = torch.cat([draw(_batch(slice(0, 3))), draw(_batch(slice(3, 6)))])
    thirds = torch.cat([draw(_batch(slice(i, i + 2))) for i in (0, 2, 4)])
    assert torch.equal(whole, halves) and torch.equal(whole, thirds)
    assert whole.shape[0] == 6


def _objective(overrides):
    return to_dict(compose("train", overrides).objective)


def test_each_objective_says_its_own_status():
    schedule = make_schedule("linear")
    d = {"start_steps": 8, "target_steps": 2, "spacing": "logsnr", "weighting": "truncated_snr"}
    prog = ProgressiveObjective(
        _objective([]), schedule, None, d, steps=8, device=CPU, ema=None, on_round=lambda *a: None
    )
    assert prog.status(0) == Status({"round": 1, "rounds": 2, "student_steps": 4}, "round 1/2, 4-step student")
    assert prog.status(8).text == "round 2/2, 2-step student"  # the last step stays in the last round
    o = {**_objective(["objective=consistency"]), "ect_delta": 0.5}
    ect = ConsistencyObjective(o, schedule, net=torch.nn.Linear(1, 1), steps=10, seed=0, device=CPU, method="ect")
    assert ect.status(0).text == "delta 0.5" and ect.status(5) == Status({"ect_delta": 0.5 / 32}, "delta 0.0156")
    cd = {**o, "curriculum": "cd", "levels_start": 18, "levels_end": 18}
    cm = ConsistencyObjective(cd, schedule, net=torch.nn.Linear(1, 1), steps=10, seed=0, device=CPU, method="cd")
    assert cm.status(3) == Status({"levels": 19}, "N 19")  # N(k) = 18 gaps between 19 levels
    clf = ClassifierObjective(schedule, dist=Dist(), device=CPU)
    clf.accuracies = [torch.tensor(0.25), torch.tensor(0.75)]
    assert clf.status(4) == Status({"accuracy": 0.5}, "accuracy 0.500")
    clf.accuracies.append(torch.tensor(0.0))
    assert clf.status(4).fields == {"accuracy": 0.5}  # read again before a step: the logged interval's status
    assert clf.tensors() == {}  # nothing open at a log step


def test_a_progressive_round_ends_with_its_student_and_a_new_stage():
    schedule = make_schedule("linear")
    d = {"start_steps": 8, "target_steps": 2, "spacing": "trailing", "weighting": "truncated_snr"}
    ema, saved = torch.nn.Linear(2, 2), []
    prog = ProgressiveObjective(
        _objective(["objective.prediction=v"]),
        schedule,
        None,
        d,
        steps=6,
        device=CPU,
        ema=ema,
        on_round=lambda steps, sampling: saved.append((steps, sampling["steps"])),
    )
    stages = [prog.after_step(step) for step in range(1, 7)]
    assert stages == [False, False, True, False, False, False]  # round 1 ends at step 3; step 6 ends the run
    assert saved == [(4, 4), (2, 2)] and prog.config(3)["sampling"]["steps"] == 2
    aux = prog.tensors()
    assert set(aux) == {"teacher.weight", "teacher.bias"}  # the first round's student teaches the second
    assert all(torch.equal(saved_part("teacher", aux)[k], v) for k, v in ema.state_dict().items())


def test_an_objectives_network_goes_into_the_checkpoint_and_comes_back():
    net = torch.nn.Linear(3, 2)
    aux = {**saved_net("target", net), **saved_net("other", None), "target_x.w": torch.zeros(1)}
    assert set(aux) == {"target.weight", "target.bias", "target_x.w"}
    back = saved_part("target", aux)
    assert set(back) == {"weight", "bias"} and torch.equal(back["weight"], net.weight)
    assert saved_part("teacher", aux) == {}


def test_the_learning_rate_warms_up_linearly():
    t = {"lr": 1e-3, "warmup": 4}
    assert [learning_rate(t, s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert learning_rate({"lr": 1e-3, "warmup": 0}, 0) == 1e-3


def test_the_network_is_sized_for_what_it_reads():
    o = _objective([])
    assert network_config({"arch": "unet"}, o, 3, 8, False) == {"arch": "unet", "resolution": 8, "in_channels": 3}
    masked = network_config({}, {**o, "mask_training": True}, 3, 8, False)
    assert (masked["in_channels"], masked["out_channels"]) == (7, 3)
    sr = network_config({}, o, 3, 8, True)
    assert (sr["in_channels"], sr["out_channels"], sr["aug_embedding"]) == (6, 3, True)
    assert network_config({}, {**o, "learn_sigma": True}, 1, 8, False)["out_channels"] == 2


def test_metrics_lines_half_written_or_not_records_are_passed_over(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": 2, "loss": 1.0}), "[1, 2]", "not json", json.dumps({"step": 4}), '{"step": 6']
    path.write_text("\n".join(lines))  # the last line was cut by a kill
    assert [rec for _, rec in complete_lines(path)] == [{"step": 2, "loss": 1.0}, {"step": 4}]
    assert [r["step"] for r in read_records(path)] == [2, 4]
    trim_metrics(path, 3)
    assert path.read_text() == lines[0] + "\n"


def test_a_resume_continues_only_its_own_run():
    """Plain training vs a distillation, another teacher or method, another dataset: refused in one line; keys
    added to a dataset's config since are no difference (issue 27, part 1)."""
    from diffuse.training.config import check_same_run

    data = {"name": "shapes", "resolution": 16, "size": 512}
    teacher = {"path": "/runs/a/checkpoints/last.safetensors", "sha256": "abc", "step": 100}
    distill = {"distill": {"teacher": teacher, "method": "progressive"}, "dataset": data}
    check_same_run(
        "ck", distill, {**distill, "distill": {**distill["distill"], "teacher": {**teacher, "path": "/moved"}}}
    )
    check_same_run("ck", {"dataset": data}, {"dataset": {**data, "flip": True}})  # a key added since
    for then, now, needle in (
        (distill, {"dataset": data}, "it is a distillation (diffuse distill), this run is plain training"),
        ({"dataset": data}, distill, "it is plain training (diffuse train), this run is a distillation"),
        (
            distill,
            {**distill, "distill": {"teacher": {**teacher, "sha256": "def"}, "method": "progressive"}},
            "distils teacher",
        ),
        (distill, {**distill, "distill": {"teacher": teacher, "method": "consistency"}}, "by progressive"),
        ({"dataset": data}, {"dataset": {**data, "name": "cifar10"}}, "dataset.name='shapes', this run has 'cifar10'"),
    ):
        with pytest.raises(UserError, match=re.escape(needle)):
            check_same_run("ck", then, now)
