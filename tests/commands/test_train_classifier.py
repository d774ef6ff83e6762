"""Classifier guidance (Dhariwal & Nichol 2021) and diffuse train-classifier: the mixture's exact classifier against a
brute-force computation, the guided eps against its formula, the exact-component property at scale 1, training,
resume, the CLI's refusals, and the classifier as FID's feature extractor."""

import json
import math

import numpy as np
import pytest
import torch

from diffuse.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from diffuse.data.gmm import GaussianMixture
from diffuse.diffusion.guidance import cfg_denoiser, classifier_guided, mean_shift_factors
from diffuse.diffusion.oracle import GMMClassifier, GMMDenoiser
from diffuse.diffusion.samplers import ddpm
from diffuse.diffusion.samplers.ddpm import ddpm_step
from diffuse.diffusion.schedule import make_schedule
from diffuse.errors import UserError
from diffuse.metrics.mixture import mixture_fit
from diffuse.nets import build_network
from diffuse.tasks import evaluate, sample, train_classifier
from tests.conftest import TINY_UNET, compose

pytestmark = pytest.mark.usefixtures("one_thread")


def small_mixture() -> GaussianMixture:
    """Three components over 1 x 4 x 4: the two closest overlap a little once noised, so guidance has work to do."""
    g = torch.Generator().manual_seed(3)
    means = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 1.6 - 0.8
    return GaussianMixture(
        means, torch.tensor([0.1, 0.15, 0.2], dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    )


def brute_force_log_probs(mixture, x_t, t, schedule):
    """log p(k | x_t): each component's density of x_t written out per pixel, then normalised."""
    rows = []
    for i in range(x_t.shape[0]):
        ab = float(schedule.alpha_bar[int(t[i])])
        a = math.sqrt(ab)
        logs = []
        for k in range(mixture.K):
            std = math.sqrt(a**2 * float(mixture.stds[k]) ** 2 + 1 - ab)
            normal = torch.distributions.Normal(a * mixture.means[k].flatten(), std)
            logs.append(math.log(float(mixture.weights[k])) + normal.log_prob(x_t[i].flatten()).sum())
        rows.append(torch.log_softmax(torch.stack(logs), 0))
    return torch.stack(rows)


def test_oracle_classifier_against_brute_force_and_autograd():
    mixture, schedule = small_mixture(), make_schedule("linear")
    clf = GMMClassifier(mixture, schedule)
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.7
    t, y = torch.tensor([0, 50, 300, 600, 999]), torch.tensor([0, 1, 2, 1, 0])
    assert torch.allclose(clf.log_probs(x, t), brute_force_log_probs(mixture, x, t, schedule), atol=1e-10)
    xr = x.clone().requires_grad_(True)
    picked = brute_force_log_probs(mixture, xr, t, schedule).gather(1, y.view(-1, 1)).sum()
    (auto,) = torch.autograd.grad(picked, xr)
    assert torch.allclose(clf.grad(x, t, y), auto, rtol=1e-9, atol=1e-9)


def test_scale_one_turns_the_unconditional_oracle_into_the_conditional_one(oracle_setup):
    """p(x_t) p(y | x_t) = p(x_t | y) p(y): at scale 1 the guided eps is eps_cond, at every t, fractional ones too."""
    mixture, schedule, den = oracle_setup
    clf = GMMClassifier(mixture, schedule)
    uncond = cfg_denoiser(den, 0.0, null_label=mixture.K)
    guided = classifier_guided(uncond, clf.grad, 1.0, schedule)
    x = torch.randn(6, *mixture.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 2, 1])
    for t in (
        torch.tensor([0, 5, 100, 400, 700, 999]),
        torch.tensor([0.5, 17.25, 250.5, 500.75, 998.5, 3.0], dtype=torch.float64),
    ):
        assert torch.allclose(guided(x, t, y), den(x, t, y), atol=1e-9)


def test_eps_shift_formula_interval_and_pass_through():
    schedule = make_schedule("linear")
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t, y = torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 0, 1])

    def eps_fn(x_t, t, y=None):
        return 0.3 * x_t + t.view(-1, 1, 1, 1) / 1000

    def grad(x_t, t, y):
        return torch.cos(x_t) + y.view(-1, 1, 1, 1)

    ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
    expected = eps_fn(x, t) - (1 - ab).sqrt() * 2.5 * grad(x, t, y)
    assert torch.allclose(classifier_guided(eps_fn, grad, 2.5, schedule)(x, t, y), expected, rtol=1e-12, atol=1e-12)
    inside = classifier_guided(eps_fn, grad, 2.5, schedule, interval=(150, 600))(x, t, y)
    assert torch.allclose(inside[[1, 2]], expected[[1, 2]]) and torch.equal(inside[[0, 3]], eps_fn(x, t)[[0, 3]])
    assert torch.equal(classifier_guided(eps_fn, grad, 2.5, schedule)(x, t, None), eps_fn(x, t))
    assert torch.equal(classifier_guided(eps_fn, grad, 0.0, schedule)(x, t, y), eps_fn(x, t))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_mean_mode_moves_the_ancestral_mean_by_s_sigma_grad(variance):
    """mode=mean: the DDPM step's mean is mu + s Sigma grad (Dhariwal & Nichol, Algorithm 1), on a subset of levels."""
    schedule = make_schedule("linear")
    timesteps = torch.tensor([700, 400, 100])
    factors = mean_shift_factors(timesteps, schedule, variance)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)

    def eps_fn(x_t, t, y=None):
        return 0.5 * x_t

    def grad(x_t, t, y):
        return torch.sin(3 * x_t)

    guided = classifier_guided(eps_fn, grad, 1.7, schedule, factors=factors)
    for t, s in ((700, 400), (400, 100)):
        ab_t, ab_s = float(schedule.alpha_bar[t]), float(schedule.alpha_bar[s])
        tt = torch.full((3,), t)
        beta = 1 - ab_t / ab_s
        sigma2 = beta if variance == "beta" else beta * (1 - ab_s) / (1 - ab_t)
        plain = ddpm_step(x, eps_fn(x, tt), ab_t, ab_s, last=True, variance=variance)  # last: the mean alone
        moved = ddpm_step(x, guided(x, tt, y), ab_t, ab_s, last=True, variance=variance)
        assert torch.allclose(moved, plain + 1.7 * sigma2 * grad(x, tt, y), rtol=1e-10, atol=1e-12)


def test_classifier_guidance_around_classifier_free_guidance(oracle_setup):
    mixture, schedule, den = oracle_setup
    clf = GMMClassifier(mixture, schedule)
    x = torch.randn(4, *mixture.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    t, y = torch.tensor([30, 300, 600, 900]), torch.tensor([3, 2, 1, 0])
    out = classifier_guided(cfg_denoiser(den, 2.0, null_label=mixture.K), clf.grad, 0.7, schedule)(x, t, y)
    e_c, e_u = den(x, t, y), den(x, t, None)
    ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.allclose(out, e_u + 2.0 * (e_c - e_u) - (1 - ab).sqrt() * 0.7 * clf.grad(x, t, y), atol=1e-10)


def guided_ddpm(mixture, schedule, scale, labels, seed):
    den = classifier_guided(
        cfg_denoiser(GMMDenoiser(mixture, schedule), 0.0, mixture.K),
        GMMClassifier(mixture, schedule).grad,
        scale,
        schedule,
    )
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(labels), *mixture.shape), generator=g, dtype=torch.float64)
    return ddpm(den, x_T, torch.arange(schedule.T - 1, -1, -1), schedule, variance="beta", generator=g, y=labels)


@pytest.mark.slow
def test_scale_one_draws_exactly_the_chosen_component():
    """The unconditional oracle with the exact classifier at scale 1, ancestral DDPM over all 1000 levels: each label's
    samples are its component, within sampling error. Exact draws of a component are classified to it with
    probability p_k (measured on 50,000 of them); the frequency must be within 4 standard errors of p_k, the mean
    within 4 standard errors (RMS over D pixels of N(0, s_k^2 / n): about 1/sqrt(n) in stds, chi-distributed) plus
    0.02, the spread within 4/sqrt(2 n D) plus 0.02 (DDPM's own discretisation). Scale 0.5 is not enough: its
    frequencies fall far outside the same bounds."""
    mixture, schedule = small_mixture(), make_schedule("linear")
    n, d = 1200, mixture.dim
    labels = torch.arange(mixture.K).repeat_interleave(n)
    g = torch.Generator().manual_seed(11)
    p, se = [], []
    for k in range(mixture.K):
        exact = mixture.means[k] + mixture.stds[k] * torch.randn(
            (50000, *mixture.shape), generator=g, dtype=torch.float64
        )
        p.append(float((mixture.classify(exact) == k).double().mean()))
        se.append(math.sqrt(max(p[k] * (1 - p[k]), 1 / n) / n))
    guided = {s: guided_ddpm(mixture, schedule, s, labels, seed=1) for s in (1.0, 0.5)}
    for k in range(mixture.K):
        fit = mixture_fit(mixture, guided[1.0][labels == k])[k]
        assert abs(fit["n"] / n - p[k]) <= 4 * se[k], (k, fit, p[k])
        assert fit["mean_err"] <= 4 * math.sqrt(1.7 / n) + 0.02, (k, fit)
        assert abs(fit["std_ratio"] - 1) <= 4 / math.sqrt(2 * n * d) + 0.02, (k, fit)
    half = [mixture_fit(mixture, guided[0.5][labels == k])[k]["n"] / n for k in range(mixture.K)]
    assert any(p[k] - half[k] > 10 * se[k] for k in range(mixture.K)), (half, p)


# ----------------------------------------------------------------------------------------------- train-classifier

TINY = [
    "dataset=gmm",
    "dataset.size=512",
    "classifier.ch=16",
    "trainer.batch_size=32",
    "trainer.warmup=5",
    "trainer.lr=2e-3",
    "accuracy_n=400",
    "accuracy_t=[0,500]",
]


def train(out, *extra):
    return train_classifier.run(compose("train_classifier", [*TINY, *extra]), out)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    # 60 steps: at 40 the held-out accuracy sits near the 0.6 the test asks, on one side or the other by machine.
    result = train(out, "trainer.steps=60", "trainer.log_every=10", "trainer.ckpt_every=20")
    return out, result


def test_train_classifier_learns_and_logs_accuracy(classifier):
    out, result = classifier
    report = json.loads((out / "accuracy.json").read_text())
    assert report["accuracy"] == result["accuracy"] and report["n"] == 400 and report["num_classes"] == 4
    assert report["accuracy"]["0"] > 0.6 > report["chance"], report  # chance: the most frequent class, ~0.3
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 50, 60] and all(
        0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in recs
    )
    assert recs[-1]["loss"] < recs[0]["loss"]
    ck = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert ck.config["model"]["arch"] == "classifier" and ck.config["model"]["num_classes"] == 4 and ck.step == 60
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.safetensors",
        "step_0000020.safetensors",
        "step_0000040.safetensors",
        "step_0000060.safetensors",
    ]


def test_train_classifier_resume_is_bit_identical_with_the_straight_records(tmp_path, monkeypatch):
    """10 steps with log_every=4, SIGTERM after step 6 (inside an interval), resume=true: the same weights, EMA,
    optimizer and random streams, and the same records (loss and accuracy) as 10 straight steps."""
    from diffuse.training import trainer as trainer_module
    from tests.helpers import raise_sigterm

    args = ["trainer.steps=10", "trainer.log_every=4", "trainer.ckpt_every=100"]
    train(tmp_path / "straight", *args)
    real = trainer_module.Trainer.train_step

    def train_step(self):
        loss = real(self)
        if self.step == 6:
            raise_sigterm()
        return loss

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    stopped = train(tmp_path / "run", *args)
    assert stopped["stopped"] and stopped["step"] == 6 and not (tmp_path / "run" / "accuracy.json").exists()
    monkeypatch.undo()
    train(tmp_path / "run", *args, "resume=true")

    def records(out):
        return [
            {k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()
        ]

    assert records(tmp_path / "run") == records(tmp_path / "straight")
    a, b = (load_checkpoint(p / "checkpoints" / "last.safetensors") for p in (tmp_path / "straight", tmp_path / "run"))
    for part in ("model", "ema", "rng"):
        assert all(torch.equal(v, getattr(b, part)[k]) for k, v in getattr(a, part).items()), part
    assert all(
        torch.equal(v, b.optim["state"][i][key]) for i in a.optim["state"] for key, v in a.optim["state"][i].items()
    )
    assert json.loads((tmp_path / "run" / "accuracy.json").read_text()) == json.loads(
        (tmp_path / "straight" / "accuracy.json").read_text()
    )


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["classifier.num_classes=3"], "classifier.num_classes=3 does not fit dataset=gmm"),
        (["dataset.resolution=6"], "dataset.resolution=6 is not allowed with classifier.ch_mult"),
        (["classifier.ch=2"], "classifier.ch=2 is not allowed"),
        (["accuracy_t=[0,1000]"], "accuracy_t=[0, 1000] is not allowed"),
        (["classifier.arch=unet"], "classifier.arch='unet' is not allowed"),
    ],
)
def test_train_classifier_refuses_bad_configs(extra, needle, tmp_path):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        train_classifier.check(compose("train_classifier", [*TINY, *extra]), tmp_path)


# ---------------------------------------------------------------------------------------- guidance from the CLI path


def unet_checkpoint(path, **model):
    torch.manual_seed(0)
    net_cfg = {**TINY_UNET, **model}
    net = build_network(net_cfg)
    config = {
        "model": net_cfg,
        "schedule": {"kind": "linear", "T": 1000},
        "objective": {"prediction": "eps"},
        "data": {"is_8bit": False},
    }
    save_checkpoint(path, Checkpoint(config=config, model=net.state_dict(), ema=net.state_dict()))
    return path


def draw(out, *overrides):
    return sample.run(compose("sample", ["n=6", "batch_size=3", "save_npz=true", "save_images=false", *overrides]), out)


def test_oracle_with_its_exact_classifier_through_sample_with_an_ode_solver(tmp_path):
    info = draw(
        tmp_path / "a",
        "model=oracle",
        "guidance=classifier",
        "guidance.classifier=oracle",
        "guidance.cfg_scale=0",
        "labels=[2,0]",
        "sampler=dpm_solver",
        "steps=15",
    )
    arr = np.load(tmp_path / "a" / "samples.npz")
    from diffuse.data.gmm import default_mixture

    x = torch.from_numpy(arr["arr_0"]).permute(0, 3, 1, 2).double() / 127.5 - 1
    assert default_mixture().classify(x).tolist() == [2, 0, 2, 0, 2, 0] == arr["arr_1"].tolist()
    assert info["guidance"] == "classifier" and info["classifier"] == "oracle" and info["classifier_scale"] == 1.0
    assert info["guidance_scale"] == 0.0 and info["nfe"] == 15


def test_a_trained_classifier_steers_an_unconditional_model_and_its_refusals(classifier, tmp_path):
    clf = classifier[0]
    uncond = unet_checkpoint(tmp_path / "uncond.safetensors")
    base = [f"ckpt={uncond}", "guidance=classifier", f"guidance.classifier={clf}", "steps=4"]
    info = draw(tmp_path / "a", *base, "guidance.scale=3", "label=1")
    assert (
        info["classifier"].endswith("last.safetensors")
        and info["classifier_step"] == 60
        and "guidance_scale" not in info
    )
    assert np.load(tmp_path / "a" / "samples.npz")["arr_1"].tolist() == [1] * 6
    plain = draw(tmp_path / "b", *base, "guidance.scale=0", "label=1")
    assert plain["nfe"] == info["nfe"] == 4
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("a", "b"))
    assert not np.array_equal(a, b)  # the classifier moved the samples
    draw(tmp_path / "c", *base, "sampler=ddpm", "guidance.mode=mean", "label=0")
    cond3 = unet_checkpoint(tmp_path / "cond3.safetensors", num_classes=3)
    res16 = unet_checkpoint(tmp_path / "res16.safetensors", resolution=16)
    for overrides, needle in [
        ([f"ckpt={uncond}", "guidance=classifier"], "guidance=classifier needs guidance.classifier="),
        (
            [f"ckpt={cond3}", "guidance=classifier", f"guidance.classifier={clf}"],
            "it has 4 classes, the class-conditional model 3",
        ),
        (
            [f"ckpt={res16}", "guidance=classifier", f"guidance.classifier={clf}"],
            "it classifies images of 3x8x8, the model makes 3x16x16",
        ),
        (
            [f"ckpt={uncond}", "guidance=classifier", f"guidance.classifier={uncond}"],
            "is not a classifier checkpoint (it holds a unet denoiser)",
        ),
        (
            [f"ckpt={uncond}", "guidance=classifier", "guidance.classifier=oracle"],
            "guidance.classifier=oracle is the exact classifier",
        ),
        ([*base, "guidance.cfg_scale=2"], "guidance.cfg_scale=2 needs a class-conditional model"),
        (
            [*base, "guidance.mode=mean"],
            "guidance.mode=mean moves the mean of the ancestral DDPM step: it needs sampler=ddpm",
        ),
        ([*base, "guidance.mode=both"], "guidance.mode='both' is not allowed"),
        ([*base, "label=4"], "label 4 is not allowed: classes are 0..3"),
        ([f"ckpt={clf}"], "is a classifier (diffuse train-classifier), not a diffusion model"),
    ]:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            draw(tmp_path / "bad", *overrides)


@pytest.mark.subprocess
def test_refusals_are_one_line_and_write_nothing(tmp_path):
    from tests.helpers import diffuse

    r = diffuse("sample", "model=oracle", "guidance=classifier", "guidance.classifier=/no/such/run", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: guidance.classifier='/no/such/run' does not exist"
    ], r.stderr
    r = diffuse("train-classifier", "dataset=gmm", "classifier.num_classes=7", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "classifier.num_classes=7" in r.stderr, (
        r.stderr
    )
    assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------------------------------------- FID features


def test_eval_with_the_classifier_as_feature_extractor(classifier, tmp_path, capsys):
    clf = classifier[0]
    fx = [
        "metrics.features=classifier",
        f"metrics.features_ckpt={clf}",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        "dataset=gmm",
        "dataset.size=48",
        "metrics.kid_subset_size=8",
        "metrics.kid_subsets=4",
        "model=oracle",
        "n=40",
        "steps=4",
        "metric=[fid,kid]",
    ]
    first = evaluate.run(compose("eval", fx), tmp_path / "a")
    assert first["features"] == "classifier" and len(first["weights_sha256"]) == 64 and first["metrics"]["fid"] >= 0
    cached = list((tmp_path / "cache").glob("classifier-*.safetensors"))
    assert len(cached) == 1
    capsys.readouterr()
    again = evaluate.run(compose("eval", fx), tmp_path / "b")
    assert "reference statistics from the cache" in capsys.readouterr().out and again["metrics"] == first["metrics"]
    with pytest.raises(UserError, match="is a classifier .* use metrics.features=classifier"):
        evaluate.run(compose("eval", [*fx, "metrics.features=checkpoint"]), tmp_path / "c")
    other = unet_checkpoint(tmp_path / "unet.safetensors")
    with pytest.raises(UserError, match="is not a classifier checkpoint"):
        evaluate.run(compose("eval", [*fx, f"metrics.features_ckpt={other}"]), tmp_path / "d")


def test_help_of_train_classifier_lists_its_keys_and_groups():
    from typer.testing import CliRunner

    from diffuse.cli import app

    r = CliRunner().invoke(app, ["train-classifier", "--help"])
    assert r.exit_code == 0, r.output
    for needle in (
        "accuracy_t=[0, 250, 500, 750]",
        "classifier  default*",
        "classifier.ch_mult=[1, 2, 2]",
        "trainer.steps=2000",
    ):
        assert needle in r.output, needle
    r = CliRunner().invoke(app, ["sample", "--help"])
    assert "guidance.* with guidance=classifier:" in r.output and "guidance.mode=eps" in r.output


def test_a_signal_during_the_held_out_measurement_keeps_the_trained_classifier(tmp_path, monkeypatch, capsys):
    """The measurement after training has no safe point: a signal stops it, the checkpoint stays, and the line says
    what was not measured (training.measure.train_then_measure, shared with train-ae)."""
    from tests.helpers import raise_sigterm

    def interrupted(*a, **k):
        raise_sigterm()
        raise AssertionError("the signal should have stopped the measurement")

    monkeypatch.setattr(train_classifier, "held_out_accuracy", interrupted)
    result = train(tmp_path / "run", "trainer.steps=4", "trainer.log_every=2")
    assert result["stopped"] and "accuracy" not in result
    out = capsys.readouterr().out
    assert "training is complete" in out and "the held-out accuracy was not measured" in out
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()
    assert not (tmp_path / "run" / "accuracy.json").exists()
