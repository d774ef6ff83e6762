"""diffuse distill and consistency training: a round lowers the student's loss, a linear student learns the closed
form of its Gaussian teacher, students record their steps, resume is bit-identical, and bad teachers are refused."""

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuse.checkpoint import load_checkpoint
from diffuse.diffusion import distillation as pd
from diffuse.diffusion.schedule import coefficients, make_schedule
from diffuse.errors import UserError
from diffuse.tasks import distill as distill_task
from diffuse.tasks import sample as sample_task
from diffuse.tasks import train as train_task
from diffuse.training import trainer as trainer_module
from tests.conftest import GaussianFlow, compose

pytestmark = pytest.mark.usefixtures("one_thread")
STUDENT = [
    "model=tiny",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[]",
    "dataset=gmm",
    "dataset.size=256",
    "dataset.resolution=4",
    "dataset.channels=1",
    "trainer.batch_size=16",
    "trainer.log_every=4",
    "trainer.sample_n=2",
    "trainer.warmup=0",
    "trainer.lr=2e-3",
]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_linear_student_learns_the_closed_form_of_its_gaussian_teacher():
    """Data N(mu, s^2 I) and one student level (N = 1, teacher 2 DDIM steps): the teacher's two-step map is affine
    in x_T, so an affine student (x0 = A x_t + b) fitted by the progressive loss reaches it; its ONE DDIM step then
    lands where the teacher's two do, to 1e-3."""
    s = make_schedule("linear")
    flow = GaussianFlow(s, s=0.5, shape=(1, 2, 2))
    grid = pd.teacher_grid(s, 2, "trailing")
    levels = pd.student_levels(grid, 1)
    A = torch.zeros(1, requires_grad=True, dtype=torch.float64)
    b = torch.zeros(flow.mu.shape, requires_grad=True, dtype=torch.float64)

    def student(x_t, t, y=None):  # predicts x0 directly
        return A * x_t + b

    opt = torch.optim.Adam([A, b], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        x0 = flow.mu + 0.5 * torch.randn((256, *flow.mu.shape), generator=g, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        loss = pd.progressive_loss(
            student,
            "x0",
            flow.denoiser,
            x0,
            s,
            grid,
            1,
            torch.zeros(256, dtype=torch.long),
            noise,
            weighting="truncated_snr",
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_T = flow.x_T(64)
    t = torch.full((64,), int(levels[0]))
    a, sg = coefficients(s, t, x_T)
    with torch.no_grad():
        one = student(x_T, t)  # one DDIM step to clean data is the x0 prediction itself
        teacher = pd.teacher_target(flow.denoiser, x_T, t, torch.full((64,), int(grid[1])), torch.full((64,), -1), s)
    assert (one - teacher).abs().max() < 1e-3
    # The closed form, derived apart from the code: a Gaussian's denoiser is x0 = mu + a s^2 (x - a mu) / (a^2 s^2 + sigma^2),
    # and a DDIM step keeps the implied eps: x' = a' x0 + sigma' (x - a x0) / sigma; two of them, the second to clean.
    mid = int(grid[1])

    def ddim_step(x, t_from, t_to):
        a0, a1 = (
            s.alpha_bar[t_from].sqrt(),
            (s.alpha_bar[t_to].sqrt() if t_to >= 0 else torch.tensor(1.0, dtype=torch.float64)),
        )
        s0, s1 = (1 - a0**2).sqrt(), (1 - a1**2).sqrt()
        x0 = flow.mu + a0 * 0.25 * (x - a0 * flow.mu) / (a0**2 * 0.25 + s0**2)
        return a1 * x0 + s1 * (x - a0 * x0) / s0

    closed = ddim_step(ddim_step(x_T, int(levels[0]), mid), mid, -1)
    assert (one - closed).abs().max() < 1e-3


def test_a_progressive_round_lowers_the_loss_and_students_record_their_steps(tmp_path):
    run = tmp_path / "p"
    distill_task.run(
        compose(
            "distill",
            [*STUDENT, "teacher=oracle", "distill.start_steps=8", "distill.target_steps=2", "trainer.steps=48"],
        ),
        run,
    )
    losses = [r["loss"] for r in _metrics(run)]
    assert losses[-1] < losses[0] / 2, losses  # within each round the student closes in on its teacher
    stages = [(r["round"], r["rounds"], r["student_steps"]) for r in _metrics(run)]
    assert stages[0] == (1, 2, 4) and stages[-1] == (2, 2, 2)  # metrics.jsonl (and the progress bar) say the round
    four = load_checkpoint(run / "checkpoints" / "student_4steps.safetensors")
    two = load_checkpoint(run / "checkpoints" / "student_2steps.safetensors")
    levels = pd.student_levels(pd.teacher_grid(make_schedule("linear"), 8, "logsnr"), 4)
    assert four.config["sampling"] == {"sampler": "ddim", "steps": 4, "timesteps": levels.tolist()}
    assert two.config["sampling"]["timesteps"] == levels[::2].tolist()  # every other level of the round before
    assert two.config["distill"]["teacher"] == "oracle" and two.config["distill"]["method"] == "progressive"
    assert any(k.startswith("teacher.") for k in two.aux)  # a later round's teacher: the earlier student
    info = sample_task.run(
        compose("sample", [f"ckpt={run / 'checkpoints' / 'student_4steps.safetensors'}", "n=3", "save_npz=true"]),
        tmp_path / "s",
    )
    assert info["steps"] == 4 and info["nfe"] == 4  # no steps= needed
    explicit = sample_task.run(
        compose(
            "sample",
            [
                f"ckpt={run / 'checkpoints' / 'student_4steps.safetensors'}",
                "n=3",
                "save_npz=true",
                f"sampler.timesteps=[{','.join(map(str, levels.tolist()))}]",
            ],
        ),
        tmp_path / "e",
    )
    assert explicit["nfe"] == 4
    assert np.array_equal(
        np.load(tmp_path / "s" / "samples.npz")["arr_0"], np.load(tmp_path / "e" / "samples.npz")["arr_0"]
    )
    info = sample_task.run(compose("sample", [f"ckpt={run}", "n=3", "steps=3"]), tmp_path / "s3")
    assert info["nfe"] == 3  # an explicit steps= still wins


def _stopping_after(monkeypatch, step):
    real = trainer_module.Trainer.train_step

    def train_step(self):
        loss = real(self)
        if self.step == step:
            signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    return real


@pytest.mark.parametrize(
    "method,extra",
    [
        ("progressive", ["distill.start_steps=4", "distill.target_steps=1", "trainer.steps=12"]),
        ("consistency", ["trainer.steps=12"]),
    ],
)
def test_resume_is_bit_identical(method, extra, tmp_path, monkeypatch, capsys):
    """A distillation stopped mid-round (signal: checkpoint at step 5) and resumed equals one run straight: model,
    EMA, optimizer, and the objective's own networks (a round's teacher, a target network)."""
    args = [*STUDENT, "teacher=oracle", f"method={method}", "trainer.ckpt_every=100", *extra]
    distill_task.run(compose("distill", args), tmp_path / "a")
    real = _stopping_after(monkeypatch, 5)
    capsys.readouterr()
    assert distill_task.run(compose("distill", args), tmp_path / "b")["stopped"]
    assert "diffuse distill resume=true" in capsys.readouterr().out.replace("\n", " ")  # the command that continues it
    monkeypatch.setattr(trainer_module.Trainer, "train_step", real)
    distill_task.run(compose("distill", [*args, "resume=true"]), tmp_path / "b")
    a, b = (load_checkpoint(p / "checkpoints" / "last.safetensors") for p in (tmp_path / "a", tmp_path / "b"))
    assert a.step == b.step == 12
    for part in ("model", "ema", "aux"):
        got, want = getattr(b, part), getattr(a, part)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), part
    assert [r["loss"] for r in _metrics(tmp_path / "a")] == [r["loss"] for r in _metrics(tmp_path / "b")]


def test_consistency_training_and_distillation_sample_in_one_step(tmp_path):
    """objective=consistency trains from scratch; method=consistency distils the oracle; both are consistency models
    whose checkpoints say so and sample with sampler=consistency at 1 or 2 steps."""
    train_task.run(compose("train", [*STUDENT, "objective=consistency", "trainer.steps=8"]), tmp_path / "ct")
    distill_task.run(
        compose("distill", [*STUDENT, "teacher=oracle", "method=consistency", "trainer.steps=8"]), tmp_path / "cd"
    )
    assert [r["levels"] for r in _metrics(tmp_path / "cd")][-1] >= 2  # N(k) of the curriculum, logged
    for run in ("ct", "cd"):
        ck = load_checkpoint(tmp_path / run / "checkpoints" / "last.safetensors")
        assert ck.config["objective"]["kind"] == "consistency" and ck.config["sampling"]["sampler"] == "consistency"
        for steps in (1, 2):
            info = sample_task.run(
                compose("sample", [f"ckpt={tmp_path / run}", "sampler=consistency", f"steps={steps}", "n=2"]),
                tmp_path / f"s_{run}{steps}",
            )
            assert info["nfe"] == steps
    ck = load_checkpoint(tmp_path / "cd" / "checkpoints" / "last.safetensors")
    assert any(k.startswith("target.") for k in ck.aux)  # CD's target network: an EMA, kept for resume


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train_task.run(compose("train", [*STUDENT, "objective.prediction=v", "trainer.steps=4"]), out)
    return out


def test_a_checkpoint_teacher_is_copied_into_its_student(teacher_run, tmp_path):
    run = tmp_path / "d"
    distill_task.run(
        compose(
            "distill",
            [
                f"teacher={teacher_run}",
                "distill.start_steps=4",
                "distill.target_steps=2",
                "trainer.steps=2",
                "trainer.lr=1e-12",
                "trainer.warmup=0",
                "trainer.sample_n=0",
            ],
        ),
        run,
    )
    teacher = load_checkpoint(teacher_run / "checkpoints" / "last.safetensors")
    student = load_checkpoint(run / "checkpoints" / "last.safetensors")
    for k, v in teacher.ema.items():  # started as the teacher; an lr of 1e-12 leaves it there
        assert torch.allclose(student.model[k], v, atol=1e-6), k
    assert student.config["distill"]["teacher"]["path"].endswith("last.safetensors")
    assert student.config["model"] == teacher.config["model"] and student.config["objective"]["prediction"] == "v"
    ect = tmp_path / "ect"
    distill_task.run(
        compose("distill", [f"teacher={teacher_run}", "method=ect", "trainer.steps=3", "trainer.sample_n=0"]), ect
    )
    assert load_checkpoint(ect / "checkpoints" / "last.safetensors").config["objective"]["kind"] == "consistency"


@pytest.mark.parametrize(
    "args,needle",
    [
        ([], "teacher= is required"),
        (["teacher=oracle", "dataset=gmm"], "teacher=oracle needs model=NAME"),
        (["teacher=oracle", "model=tiny", "dataset=shapes"], "teacher=oracle needs dataset=gmm"),
        (
            ["teacher=oracle", "model=tiny", "distill.start_steps=64", "distill.target_steps=3"],
            "distill.target_steps=3 is not allowed",
        ),
        (["teacher=oracle", "model=tiny", "distill.weighting=snr"], "distill.weighting='snr' is not allowed"),
        (["teacher=oracle", "model=tiny", "trainer.steps=3"], "fewer than the 4 rounds"),
        (["teacher=/no/such/run"], "does not exist"),
    ],
)
def test_refusals(args, needle, tmp_path):
    with pytest.raises(UserError, match=needle):
        distill_task.check(compose("distill", args), tmp_path / "r")


def test_checkpoint_teacher_refusals(teacher_run, tmp_path):
    for args, needle in [
        (["model=small"], "model= cannot be given with a checkpoint teacher"),
        (["dataset=gmm", "dataset.resolution=8", "dataset.channels=1"], "makes 1x4x4 images, dataset=gmm is 1x8x8"),
        (["schedule=cosine"], "schedule= cannot be given with a checkpoint teacher"),
    ]:
        with pytest.raises(UserError, match=needle):
            distill_task.check(compose("distill", [f"teacher={teacher_run}", *args]), tmp_path / "r")
    ct = tmp_path / "ct"
    train_task.run(compose("train", [*STUDENT, "objective=consistency", "trainer.steps=2", "trainer.sample_n=0"]), ct)
    with pytest.raises(UserError, match="is a consistency model: distil a diffusion model"):
        distill_task.check(compose("distill", [f"teacher={ct}"]), tmp_path / "r")
    assert not Path(tmp_path / "r").exists()


def test_a_class_conditional_student_samples_inpaints_and_is_evaluated(tmp_path):
    """A class-conditional teacher distils, guidance folded in, into a class-conditional student that the other
    commands take as they are: sample with a label at its own steps, inpaint by replacement, eval."""
    from PIL import Image

    from diffuse.tasks import evaluate as eval_task
    from diffuse.tasks import inpaint as inpaint_task

    net = [
        "model=tiny",
        "model.ch=16",
        "model.ch_mult=[1,2]",
        "model.attn_resolutions=[]",
        "model.num_classes=4",
        "dataset=shapes",
        "dataset.size=64",
        "dataset.resolution=8",
        "trainer.batch_size=8",
        "trainer.sample_n=0",
        "trainer.warmup=0",
    ]
    train_task.run(compose("train", [*net, "trainer.steps=2"]), tmp_path / "t")
    run = tmp_path / "d"
    distill_task.run(
        compose(
            "distill",
            [
                f"teacher={tmp_path / 't'}",
                "distill.start_steps=4",
                "distill.target_steps=2",
                "distill.guidance_scale=2",
                "trainer.steps=2",
                "trainer.sample_n=2",
            ],
        ),
        run,
    )
    ck = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert ck.config["model"]["num_classes"] == 4 and ck.config["distill"]["guidance_scale"] == 2.0
    info = sample_task.run(compose("sample", [f"ckpt={run}", "n=2", "label=1"]), tmp_path / "s")
    assert info["nfe"] == 2 and info["steps"] == 2
    Image.fromarray((np.random.RandomState(0).rand(8, 8, 3) * 255).astype("uint8")).save(tmp_path / "img.png")
    mask = np.zeros((8, 8), "uint8")
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    info = inpaint_task.run(
        compose(
            "inpaint",
            [
                f"ckpt={run}",
                f"image={tmp_path / 'img.png'}",
                f"mask={tmp_path / 'mask.png'}",
                "inpaint=replace",
                "sampler=ddim",
                "n=2",
                "label=1",
            ],
        ),
        tmp_path / "i",
    )
    assert (
        info["steps"] == 2 and info["nfe"] == 2 and info["labels"] == [1, 1]
    )  # the student's steps; the class asked for
    out = np.asarray(Image.open(tmp_path / "i" / "img_00.png"))
    assert np.array_equal(out[:, :4], np.asarray(Image.open(tmp_path / "img.png"))[:, :4])  # known pixels kept
    metrics = eval_task.run(
        compose(
            "eval",
            [
                f"ckpt={run}",
                "metric=[fid]",
                "n=16",
                "batch_size=8",
                "ref=shapes",
                "dataset=shapes",
                "dataset.resolution=8",
                "dataset.size=64",
                "metrics.features=checkpoint",
                f"metrics.features_ckpt={tmp_path / 't'}",
                f"metrics.cache_dir={tmp_path / 'cache'}",
            ],
        ),
        tmp_path / "e",
    )
    assert math.isfinite(metrics["metrics"]["fid"]) and metrics["steps"] == 2 and metrics["nfe"] == 2
