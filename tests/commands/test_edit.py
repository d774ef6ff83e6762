"""diffuse edit: SDEdit and DDIM-inversion editing, held against the closed-form posterior of a Gaussian mixture,
then through the real CLI with the oracle, tiny U-Net, DiT and mask-conditioned checkpoints, and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffuse.cli import app
from diffuse.data.gmm import GaussianMixture, default_mixture
from diffuse.diffusion.edit import perturb, sdedit, start_timestep, truncate
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import ddim, ddpm
from diffuse.diffusion.samplers.ddim import ddim_invert
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import make_timesteps, sampler_timesteps
from diffuse.metrics.mixture import noisy_posterior, posterior_fit, sample_posterior
from diffuse.pipeline.sampling import CountingDenoiser
from diffuse.tasks import edit as edit_task
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ the math, against closed forms


def problem():
    """Three components over 1 x 2 x 2, close enough that a noised image keeps several of them in play; the image
    is the midpoint of components 0 and 1 and its noise is fixed (seed 2): at strength 0.1 the exact posterior
    weights are about 0.35 / 0.62 / 0.02, at 0.3 about 0.27 / 0.31 / 0.43 (the prior: 0.3 / 0.3 / 0.4)."""
    means = torch.tensor([[-0.6, -0.6, 0.2, 0.4], [0.5, 0.3, -0.4, 0.6], [0.0, 0.7, 0.6, -0.5]], dtype=torch.float64)
    mixture = GaussianMixture(
        means.reshape(3, 1, 2, 2),
        torch.tensor([0.1, 0.15, 0.2], dtype=torch.float64),
        torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
    )
    image = 0.5 * (mixture.means[0] + mixture.means[1])
    eps = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return mixture, image, eps


STRENGTHS = (0.1, 0.3)


def sdedit_exact(mixture, schedule, image, eps, strength, n, seed=5):
    """n SDEdits of `image` from the one x_t0 its noise `eps` gives, by ancestral DDPM over every level below t0
    (the exact reverse process up to its small-step discretisation) driven by the exact denoiser."""
    den = GMMDenoiser(mixture, schedule)
    return sdedit(
        ddpm,
        den,
        image[None],
        make_timesteps(schedule.T, schedule.T),
        schedule,
        strength=strength,
        noise=eps.expand(n, -1, -1, -1).clone(),
        generator=torch.Generator().manual_seed(seed),
        variance="beta",
    )


def assert_fits(rows, d, slack=0.0):
    """Each component within sampling error (4 standard errors) of the exact posterior, plus `slack` for the
    sampler's discretisation: weight, mean (in posterior stds) and spread."""
    for r in rows:
        assert abs(r["weight"] - r["exact_weight"]) < 4 * r["weight_se"] + slack, r
        if r["exact_weight"] < 0.05:  # too few samples to say much about its shape
            continue
        assert r["mean_err"] < 4 / math.sqrt(r["n_eff"]) + slack, r
        assert abs(r["std_ratio"] - 1) < 4 / math.sqrt(2 * r["n_eff"] * d) + slack, r


@pytest.mark.parametrize("strength", STRENGTHS)
def test_sdedit_with_the_exact_denoiser_draws_the_closed_form_posterior(strength):
    """q(x_0 | x_t0) of a mixture is a mixture with reweighted, shifted and narrowed components (noisy_posterior);
    the edits of one fixed noised image match its weights, means and spreads, and not the prior's."""
    mixture, image, eps = problem()
    schedule = make_schedule("linear")
    t0 = start_timestep(strength, schedule.T)
    x_t0 = perturb(schedule, image[None], t0, eps)
    w, m, v = noisy_posterior(mixture, x_t0, float(schedule.alpha_bar[t0]))
    n, d = 20000, mixture.dim
    edits = sdedit_exact(mixture, schedule, image, eps, strength, n)
    rows = posterior_fit(w, m, v, edits)
    print(
        f"\nstrength {strength}: "
        + "; ".join(
            f"k={r['component']} w {r['exact_weight']:.3f} est {r['weight']:.3f} "
            f"mean err {r['mean_err']:.3f} std ratio {r['std_ratio']:.3f}"
            for r in rows
        )
    )
    assert_fits(rows, d, slack=0.02)
    assert_fits(
        posterior_fit(w, m, v, sample_posterior(w, m, v, n, torch.Generator().manual_seed(1))), d
    )  # the estimator
    # Power: edits that ignored the image (the prior's weights) would be far outside these tolerances.
    assert max(abs(float(w[k] - mixture.weights[k])) - 4 * rows[k]["weight_se"] for k in range(3)) > 0.02


def test_posterior_moments_are_tweedies():
    """The closed form against an independent route: Tweedie's formulas give E[x_0 | x_t] and tr Cov[x_0 | x_t]
    from the gradient and Hessian of log p_t, the mixture's noisy density, by autograd."""
    mixture, image, _ = problem()
    schedule = make_schedule("linear")
    g = torch.Generator().manual_seed(0)
    for t in (20, 150, 400):
        ab = float(schedule.alpha_bar[t])
        a, s2 = math.sqrt(ab), 1 - ab
        x_t = (a * image + math.sqrt(s2) * torch.randn(image.shape, generator=g, dtype=torch.float64)).flatten()
        w, m, v = noisy_posterior(mixture, x_t, ab)
        logp = lambda x: mixture.log_prob(x.reshape(1, *mixture.shape), s2, a)[0]  # noqa: E731
        grad = torch.autograd.functional.jacobian(logp, x_t)
        hess = torch.autograd.functional.hessian(logp, x_t)
        mean = (w[:, None] * m).sum(0)
        torch.testing.assert_close(mean, (x_t + s2 * grad) / a, rtol=0, atol=1e-10)
        trace = float((w * (mixture.dim * v + (m**2).sum(1))).sum() - (mean**2).sum())
        assert trace == pytest.approx(s2 / ab * (mixture.dim + s2 * float(torch.trace(hess))), rel=1e-8)


def test_strength_0_returns_the_image_and_strength_1_ignores_it():
    mixture, schedule = default_mixture(), make_schedule("linear")
    den = CountingDenoiser(GMMDenoiser(mixture, schedule))
    ts = make_timesteps(1000, 20)
    x, _ = mixture.sample(2, torch.Generator().manual_seed(0))
    noise = torch.randn((4, *mixture.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    same = sdedit(ddim, den, x[:1], ts, schedule, strength=0.0, noise=noise, generator=None)
    assert torch.equal(same, x[:1].expand(4, -1, -1, -1)) and den.calls == 0
    outs = [
        sdedit(
            ddpm, den, img[None], ts, schedule, strength=1.0, noise=noise, generator=torch.Generator().manual_seed(3)
        )
        for img in x
    ]
    plain = ddpm(den, noise, ts, schedule, generator=torch.Generator().manual_seed(3))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], plain)  # exactly sampling from that noise


def test_start_level_and_truncation():
    schedule = make_schedule("linear")
    assert [start_timestep(s, 1000) for s in (0.0, 0.0004, 0.5, 1.0)] == [-1, -1, 499, 999]
    ts = truncate(make_timesteps(1000, 50), 499)
    assert ts.dtype == torch.long and ts[:3].tolist() == [499, 479, 459] and ts[-1] == 19 and len(ts) == 25
    fractional = sampler_timesteps(schedule, 10, "karras")
    cut = truncate(fractional, 300)
    assert (
        cut.dtype == torch.float64
        and cut[0] == 300
        and (cut[1:] < 300).all()
        and (cut[1:] == fractional[fractional < 300]).all()
    )


def test_inversion_round_trip_is_close_on_the_oracle_and_closer_with_fixed_point_iterations():
    mixture, schedule = default_mixture(), make_schedule("linear")
    den = GMMDenoiser(mixture, schedule)
    x, _ = mixture.sample(8, torch.Generator().manual_seed(0))
    ts = make_timesteps(1000, 50)
    errors = []
    for iters in (0, 4):
        latent = ddim_invert(den, x, ts, schedule, fixed_point_iters=iters)
        errors.append(float((ddim(den, latent, ts, schedule) - x).pow(2).mean().sqrt()))
    assert errors[0] < 0.04 and errors[1] < 0.005 and errors[1] < errors[0] / 5, errors


# ------------------------------------------------------------------------------------ the command, with the oracle

ORACLE = ["model=oracle", "dataset=gmm"]


def _invoke(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _save(path, arr):
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def files(tmp_path):
    """A mixture sample as an 8-bit image (on the data, so that its inversion is well posed), another random
    one, and a mask that edits the right half."""
    x, _ = default_mixture().sample(1, torch.Generator().manual_seed(4))
    on = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    (tmp_path / "imgs").mkdir()
    _save(tmp_path / "imgs" / "a.png", on)
    _save(tmp_path / "imgs" / "b.png", (np.random.RandomState(0).rand(8, 8, 3) * 255).astype("uint8"))
    m = np.zeros((8, 8), "uint8")
    m[:, 4:] = 255
    _save(tmp_path / "mask.png", m)
    return tmp_path


def test_sdedit_of_a_folder_with_a_mask_through_the_cli(files, monkeypatch):
    r = _invoke(
        ["edit", "--image", "imgs", "--mask", "mask.png", *ORACLE, "n=3", "save_npz=true", "hydra.run.dir=r"],
        files,
        monkeypatch,
    )
    assert r.exit_code == 0, r.stderr
    out = files / "r"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "a_00.png",
        "a_01.png",
        "a_02.png",
        "b_00.png",
        "b_01.png",
        "b_02.png",
        "grid.png",
    ]
    info = json.loads((out / "edit.json").read_text())
    # ddim's 50 trailing levels (999, 979, ..., 19) below t0 = 499 are 24, after t0 itself: 25 NFE per image
    assert (info["method"], info["t0"], info["levels"], info["nfe"], info["mask"]) == ("sdedit", 499, 25, 25, True)
    for name in ("a", "b"):
        src = np.asarray(Image.open(files / "imgs" / f"{name}.png"))
        res = [np.asarray(Image.open(out / f"{name}_{j:02d}.png")) for j in range(3)]
        assert all((x[:, :4] == src[:, :4]).all() and not (x[:, 4:] == src[:, 4:]).all() for x in res)
        assert len({x.tobytes() for x in res}) == 3
    # One row per image: input | masked input | 3 edits; 8 px tiles, 1 px gaps, shown 8x enlarged.
    assert Image.open(out / "grid.png").size == ((5 * 9 + 1) * 8, (2 * 9 + 1) * 8)
    assert np.load(out / "samples.npz")["arr_0"].shape == (6, 8, 8, 3)
    assert r.stdout.strip().splitlines()[-1] == f"run dir: {out.resolve()}"


def test_strength_0_through_the_cli_writes_the_input_and_strength_1_is_diffuse_sample(files, monkeypatch):
    r = _invoke(["edit", "--image", "imgs/a.png", *ORACLE, "edit.strength=0", "hydra.run.dir=zero"], files, monkeypatch)
    assert r.exit_code == 0, r.stderr
    src = np.asarray(Image.open(files / "imgs" / "a.png"))
    assert all(np.array_equal(np.asarray(Image.open(files / "zero" / f"a_{j:02d}.png")), src) for j in range(4))
    assert json.loads((files / "zero" / "edit.json").read_text())["nfe"] == 0
    for name in ("a", "b"):  # same seed, sampler and streams: the very images diffuse sample draws, whatever the input
        r = _invoke(
            [
                "edit",
                "--image",
                f"imgs/{name}.png",
                *ORACLE,
                "edit.strength=1",
                "sampler=ddpm",
                "steps=20",
                "save_npz=true",
                f"hydra.run.dir=one_{name}",
            ],
            files,
            monkeypatch,
        )
        assert r.exit_code == 0, r.stderr
    r = _invoke(
        ["sample", *ORACLE, "n=4", "sampler=ddpm", "steps=20", "save_npz=true", "hydra.run.dir=s"], files, monkeypatch
    )
    assert r.exit_code == 0, r.stderr
    sampled = np.load(files / "s" / "samples.npz")["arr_0"]
    for name in ("a", "b"):
        assert np.array_equal(np.load(files / f"one_{name}" / "samples.npz")["arr_0"], sampled)


def test_inversion_editing_reports_the_round_trip_and_changes_the_class(files, monkeypatch):
    r = _invoke(
        [
            "edit",
            "--image",
            "imgs/a.png",
            *ORACLE,
            "edit=invert",
            "edit.fixed_point_iters=2",
            "labels=[0,1,2,3]",
            "save_npz=true",
            "hydra.run.dir=inv",
        ],
        files,
        monkeypatch,
    )
    assert r.exit_code == 0, r.stderr
    info = json.loads((files / "inv" / "edit.json").read_text())
    assert info["method"] == "invert" and info["labels"] == [0, 1, 2, 3] and info["source_label"] == 4
    assert (info["nfe_inversion"], info["nfe_round_trip"], info["nfe"]) == (150, 50, 250)
    assert list(info["reconstruction_rmse"]) == ["imgs/a.png"]
    rmse = info["reconstruction_rmse"]["imgs/a.png"]
    assert rmse < 0.02, rmse  # 8-bit quantization of the input is ~0.0045 RMS; the inversion adds little
    edits = torch.from_numpy(np.load(files / "inv" / "samples.npz")["arr_0"]).permute(0, 3, 1, 2)
    assert default_mixture().classify(edits.double() / 127.5 - 1).tolist() == [0, 1, 2, 3]  # each label's component
    assert "round trip RMS error" in r.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_real_process_edits_and_refuses_as_users_see_it(files):
    from tests.helpers import diffuse

    r = diffuse("edit", "--image", "imgs/a.png", *ORACLE, "n=1", "edit.strength=0.2", "hydra.run.dir=p", cwd=files)
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.strip().splitlines()[-1] == f"run dir: {(files / 'p').resolve()}"
        and (files / "p" / "a_00.png").is_file()
    )
    r = diffuse("edit", "--image", "imgs/a.png", *ORACLE, "edit=invert", "sampler=ddpm", "hydra.run.dir=q", cwd=files)
    assert (
        r.returncode == 2
        and r.stderr.startswith("error: edit.method=invert needs a deterministic sampler")
        and len(r.stderr.splitlines()) == 1
    )
    assert not (files / "q").exists()


def test_a_stop_request_finishes_the_current_image_and_lists_the_rest(files, monkeypatch, capsys):
    import os
    import signal

    real = edit_task.edit_image

    def first_then_stop(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(edit_task, "edit_image", first_then_stop)
    cfg = compose("edit", [f"image={files / 'imgs'}", *ORACLE, "n=2", "sampler.default_steps=4"])
    info = edit_task.run(cfg, files / "out")
    assert (
        info["stopped"]
        and info["images"] == [str(files / "imgs" / "a.png")]
        and info["not_done"] == [str(files / "imgs" / "b.png")]
    )
    assert sorted(p.name for p in (files / "out").glob("*.png")) == ["a_00.png", "a_01.png", "grid.png"]
    assert "stopped by signal (SIGTERM): 1 of 2 image(s) edited" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ checkpoints: U-Net, DiT, masks

TINY = [
    "dataset.size=32",
    "dataset.resolution=8",
    "trainer.batch_size=4",
    "trainer.sample_n=0",
    "trainer.steps=2",
    "trainer.log_every=1",
]
NETS = {
    "unet": ["model.ch=16", "model.ch_mult=[1,2]", "model.attn_resolutions=[4]"],
    # adaLN-Zero starts at eps = 0, which every inversion undoes exactly: a few steps at a high rate move it off.
    "dit": [
        "model=dit_s",
        "model.hidden_size=32",
        "model.depth=1",
        "model.heads=2",
        "model.num_classes=4",
        "trainer.steps=8",
        "trainer.lr=3e-3",
        "trainer.warmup=1",
    ],
    "masked": ["model.ch=16", "model.ch_mult=[1,2]", "model.attn_resolutions=[]", "objective.mask_training=true"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, one_thread):
    from diffuse.tasks import train as train_task

    d = tmp_path_factory.mktemp("nets")
    for name, over in NETS.items():
        train_task.run(compose("train", [*TINY, *over]), d / name)
    rgb = (np.random.RandomState(1).rand(8, 8, 3) * 255).astype("uint8")
    _save(d / "img.png", rgb)
    _save(d / "big.png", (np.random.RandomState(2).rand(12, 10, 3) * 255).astype("uint8"))
    _save(d / "grey.png", rgb[..., 0])
    m = np.zeros((8, 8), "uint8")
    m[2:6, 2:6] = 255
    _save(d / "mask.png", m)
    _save(d / "small_mask.png", m[:6, :6])
    return d


@pytest.mark.parametrize(
    "net,args,expect",
    [
        ("unet", ["edit.strength=0.3", "steps=10"], {"nfe": 3, "conditioned": False}),
        (
            "unet",
            ["edit=invert", "edit.strength=0.5", "steps=10", "sampler=dpm_solver"],
            {"nfe": 7 * 3, "levels": 7},
        ),  # logsnr: 6 of 10 below t0
        (
            "dit",
            ["edit=invert", "steps=4", "label=2", "guidance.scale=2", "edit.source_label=0"],
            {"nfe": 12, "labels": [2, 2], "guidance_scale": 2.0, "source_label": 0},
        ),
        ("dit", ["edit.strength=0.6", "steps=5", "sampler=ddpm"], {"nfe": 3, "labels": [0, 1]}),
        (
            "masked",
            ["--mask", "{d}/mask.png", "edit.strength=0.5", "steps=6"],
            {"nfe": 3, "conditioned": True, "mask": True},
        ),
        (
            "masked",
            ["--mask", "{d}/mask.png", "edit=invert", "steps=4", "edit.conditioned=false"],
            {"nfe": 12, "conditioned": False},
        ),
    ],
)
def test_every_kind_of_checkpoint_edits_through_the_cli(net, args, expect, checkpoints, tmp_path, monkeypatch):
    d = checkpoints
    args = [a.format(d=d) for a in args]
    r = _invoke(
        ["edit", "--image", d / "img.png", f"ckpt={d / net}", "n=2", *args, "hydra.run.dir=r"], tmp_path, monkeypatch
    )
    assert r.exit_code == 0, r.stderr
    info = json.loads((tmp_path / "r" / "edit.json").read_text())
    assert {k: info[k] for k in expect} == expect
    src = np.asarray(Image.open(d / "img.png"))
    res = [np.asarray(Image.open(tmp_path / "r" / f"img_{j:02d}.png")) for j in range(2)]
    assert all(x.shape == src.shape and not np.array_equal(x, src) for x in res)
    if "--mask" in args:  # outside the mask: the input, exactly
        keep = np.asarray(Image.open(d / "mask.png")) == 0
        assert all((x[keep] == src[keep]).all() for x in res)


def test_an_image_of_another_size_is_resized_and_back(checkpoints, tmp_path, monkeypatch):
    d = checkpoints
    r = _invoke(
        ["edit", "--image", d / "big.png", f"ckpt={d / 'unet'}", "n=1", "steps=4", "hydra.run.dir=r"],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0, r.stderr
    assert np.asarray(Image.open(tmp_path / "r" / "big_00.png")).shape == (12, 10, 3)


# ------------------------------------------------------------------------------------ bad input: one line, exit 2

BAD = [
    (["edit.strength=1.5"], "edit.strength=1.5 is not allowed: it must be a number in [0, 1]"),
    (["edit.strength=-0.1"], "edit.strength=-0.1 is not allowed"),
    (["edit.strength=nan"], "edit.strength=nan is not allowed"),
    (["edit.strength=abc"], "edit.strength='abc' is not allowed"),
    (
        ["--image", "{d}/big.png", "edit.resize=false"],
        "big.png is 10x12 but the model makes 8x8 (edit.resize=true resizes it)",
    ),
    (
        ["--image", "{d}/grey.png", "edit.resize=false"],
        "grey.png has 1 channel but the model makes 3 (edit.resize=true converts it)",
    ),
    (["edit=invert", "sampler=ddpm"], "edit.method=invert needs a deterministic sampler: sampler=ddpm is stochastic"),
    (["edit=invert", "sampler.eta=0.5"], "sampler=ddim with eta > 0 is stochastic"),
    (["edit=invert", "sampler=euler_ancestral"], "sampler=euler_ancestral is stochastic"),
    (["edit=invert", "sampler=adaptive"], "sampler=adaptive chooses its own steps"),
    (["edit.method=invert"], "choose the method with edit=invert"),
    (["edit.method=magic"], "edit.method='magic' is not allowed"),
    (["sampler=dpm_solver", "sampler.afs=true"], "sampler.afs=true takes eps = x_T at the first level"),
    (
        ["edit.conditioned=true", "--mask", "{d}/mask.png"],
        "edit.conditioned=true needs a model trained with objective.mask_training=true",
    ),
    (["edit=invert", "edit.source_label=1"], "edit.source_label=1 needs a class-conditional model"),
    (["edit=invert", "edit.fixed_point_iters=-1"], "edit.fixed_point_iters=-1 is not allowed"),
    (["label=1"], "label=1 needs a class-conditional model"),
    (["--mask", "{d}/small_mask.png"], "small_mask.png is 6x6 but image"),
    (["--image", "{d}/nosuch.png"], "nosuch.png: no such file"),
    (["n=0"], "n=0"),
    (["steps=0"], "steps=0"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(extra, needle, checkpoints, tmp_path, monkeypatch):
    d = checkpoints
    extra = [a.format(d=d) for a in extra]
    image = [] if "--image" in extra else ["--image", d / "img.png"]
    run = tmp_path / "run"
    r = _invoke(["edit", *image, f"ckpt={d / 'unet'}", *extra, f"hydra.run.dir={run}"], tmp_path, monkeypatch)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not run.exists() or not any(run.rglob("*")), sorted(run.rglob("*"))


def test_two_images_that_would_write_one_file_are_refused(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    for name in ("x.png", "x.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), "uint8")).save(tmp_path / "imgs" / name)
    r = _invoke(["edit", "--image", "imgs", *ORACLE, "hydra.run.dir=run"], tmp_path, monkeypatch)
    assert (
        r.exit_code == 2 and "x.jpg and x.png would both write x_00.png" in r.stderr and not (tmp_path / "run").exists()
    )


def test_a_sweep_is_checked_job_by_job_before_the_first(files, monkeypatch):
    r = _invoke(
        ["edit", "-m", "--image", "imgs/a.png", *ORACLE, "edit.strength=0.2,2", "hydra.sweep.dir=sw"],
        files,
        monkeypatch,
    )
    assert r.exit_code == 2 and "-m job #1 (edit.strength=2): edit.strength=2 is not allowed" in r.stderr
    assert not (files / "sw").exists()
