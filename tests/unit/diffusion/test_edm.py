"""EDM preconditioning (Karras et al. 2022): its scalings, loss weight and noise levels against their closed forms,
the preconditioned model through the one denoiser interface, and objective=edm through the CLI (train, sample with
several solvers, resume, bad values)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffuse.checkpoint import checkpoint_hash, load_checkpoint
from diffuse.cli import app
from diffuse.diffusion.consistency import t_of_sigma
from diffuse.diffusion.objectives import edm_loss, edm_sigmas, edm_weight
from diffuse.diffusion.prediction import EDMDenoiser, edm_denoise, edm_scalings
from diffuse.diffusion.schedule import coefficients, make_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

SD = 0.5


def shaped(v, like):
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def test_scalings_at_given_sigmas():
    sigma = torch.tensor([0.0, 0.5, 2.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm_scalings(sigma, SD)
    # sigma = 0: D is the input itself; sigma = sigma_data: half skip, c_out = sd / sqrt 2; large sigma: D ~ sd F.
    expected_skip = [1.0, 0.5, 0.25 / 4.25, 0.25 / 6400.25]
    expected_out = [0.0, 0.5 / math.sqrt(2), 1.0 / math.sqrt(4.25), 40.0 / math.sqrt(6400.25)]
    expected_in = [2.0, 1 / math.sqrt(0.5), 1 / math.sqrt(4.25), 1 / math.sqrt(6400.25)]
    torch.testing.assert_close(c_skip, torch.tensor(expected_skip, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(c_out, torch.tensor(expected_out, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(c_in, torch.tensor(expected_in, dtype=torch.float64), rtol=1e-12, atol=0)
    # c_out^2 = sd^2 (1 - c_skip) = sd^2 sigma^2 / (sigma^2 + sd^2): for Gaussian data the variance of x0 given x~,
    # what c_skip x~ (its posterior mean) leaves for F to scale.
    torch.testing.assert_close(c_out**2, SD**2 * (1 - c_skip), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_exact_target_gives_x0_and_the_true_eps(kind):
    """F equal to its training target (x0 - c_skip x~) / c_out makes D = x0 exactly, and the denoiser interface then
    returns the eps that made x_t: the round trip D <-> eps, with t <-> sigma as the sampler and the trainer use it."""
    schedule = make_schedule(kind, T=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((6, 1, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 17.5, 400, 812.25, 999], dtype=torch.float64)

    def oracle_F(u, t_in, y=None):  # knows x0; reads sigma from its time input, as a network would
        ab = schedule.alpha_bar_at(t_in)
        sigma = shaped(((1 - ab) / ab).sqrt(), u)
        c_skip, c_out, c_in = edm_scalings(sigma, SD)
        x_tilde = u / c_in
        return (x0 - c_skip * x_tilde) / c_out

    a, s = coefficients(schedule, t, x0)
    x_t = a * x0 + s * eps
    d = edm_denoise(oracle_F, x_t / a, s / a, t, sigma_data=SD)
    torch.testing.assert_close(d, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(EDMDenoiser(oracle_F, schedule, SD)(x_t, t), eps, rtol=0, atol=1e-6)


def test_a_zero_network_is_the_exact_denoiser_of_gaussian_data_of_std_sigma_data():
    """For data N(0, sd^2 I) the optimal D is c_skip x~ exactly, so F = 0 (what a zero-initialised output layer
    starts as) is already the exact denoiser: the EDM denoiser of the zero network equals the closed-form oracle."""
    from diffuse.data.gmm import GaussianMixture
    from diffuse.diffusion.oracle import GMMDenoiser

    schedule = make_schedule("linear")
    shape = (1, 4, 4)
    mixture = GaussianMixture(
        torch.zeros(1, *shape, dtype=torch.float64),
        torch.tensor([SD], dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    x_t = torch.randn((5, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 10, 250.5, 600, 999], dtype=torch.float64)
    ours = EDMDenoiser(lambda u, t_in, y=None: torch.zeros_like(u), schedule, SD)(x_t, t)
    torch.testing.assert_close(ours, GMMDenoiser(mixture, schedule)(x_t, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sd", [0.5, 0.2])
def test_input_and_target_have_unit_variance_for_data_of_std_sigma_data(sd):
    """Karras et al.'s design (their appendix B.6): for data of std sd, c_in x~ and F's target (x0 - c_skip x~) / c_out
    have unit variance at every sigma, so a freshly initialised F (output ~ 0) starts at loss 1 everywhere. Gaussian
    data, 2^18 values per level: the sample variance's standard error is sqrt(2 / n) = 0.3%, the tolerance 1.5%."""
    g = torch.Generator().manual_seed(2)
    n = 2**18
    for sigma in (0.002, 0.05, 0.3, sd, 1.0, 5.0, 80.0):
        x0 = sd * torch.randn(n, generator=g, dtype=torch.float64)
        x_tilde = x0 + sigma * torch.randn(n, generator=g, dtype=torch.float64)
        c_skip, c_out, c_in = edm_scalings(torch.tensor(sigma, dtype=torch.float64), sd)
        assert abs(float((c_in * x_tilde).var()) - 1) < 0.015, sigma
        assert abs(float(((x0 - c_skip * x_tilde) / c_out).var()) - 1) < 0.015, sigma
    # The same through the loss: F = 0 on such data costs lambda |c_skip x~ - x0|^2 = |F's target|^2, mean 1.
    schedule = make_schedule("linear")
    sig = torch.tensor([0.02, 0.3, 1.0, 20.0], dtype=torch.float64)
    x0 = sd * torch.randn((4, 1, 128, 128), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    loss = edm_loss(lambda u, t, y=None: torch.zeros_like(u), x0, schedule, sig, noise, sigma_data=sd)
    torch.testing.assert_close(loss, torch.ones(4), rtol=0, atol=0.03)


def test_the_loss_weight_puts_weight_one_on_the_network_error():
    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    _, c_out, _ = edm_scalings(sigma, SD)
    torch.testing.assert_close(edm_weight(sigma, SD) * c_out**2, torch.ones_like(sigma), rtol=1e-12, atol=0)
    # lambda |D - x0|^2 is the plain squared error of F against its target, whatever F outputs.
    schedule = make_schedule("cosine")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand((4, 2, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sig = torch.tensor([0.01, 0.4, 3.0, 50.0], dtype=torch.float64)
    w = torch.randn(x0.shape[1:], generator=g, dtype=torch.float64)

    def F(u, t, y=None):  # some function of the input and the time
        return torch.tanh(u * w) + shaped(t.to(torch.float64) / 1000, u)

    s = shaped(sig, x0)
    x_tilde = x0 + s * noise
    c_skip, c_out, c_in = edm_scalings(s, SD)
    err_F = (F(c_in * x_tilde, t_of_sigma(schedule, sig)) - (x0 - c_skip * x_tilde) / c_out).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(edm_loss(F, x0, schedule, sig, noise, sigma_data=SD).double(), err_F, rtol=1e-5, atol=0)


def test_lognormal_noise_levels():
    g = torch.Generator().manual_seed(4)
    n = 200_000
    log_s = edm_sigmas(n, g, p_mean=-1.2, p_std=1.2, sigma_min=1e-30, sigma_max=1e30).log()
    se = 1.2 / math.sqrt(n)
    assert abs(float(log_s.mean()) + 1.2) < 4 * se
    assert abs(float(log_s.std()) - 1.2) < 4 * 1.2 / math.sqrt(2 * n)
    skew = float(((log_s - log_s.mean()) ** 3).mean() / log_s.std() ** 3)
    assert abs(skew) < 4 * math.sqrt(6 / n)
    # Clamped to a schedule's levels: the mass beyond each end sits on it, as much as the normal puts there.
    schedule = make_schedule("linear", T=1000)
    s_min, s_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    sig = edm_sigmas(n, g, p_mean=-1.2, p_std=2.0, sigma_min=s_min, sigma_max=s_max)
    assert float(sig.min()) == s_min and float(sig.max()) == s_max
    for frac, cdf in (
        (float((sig == s_min).double().mean()), 0.5 * math.erfc(-(math.log(s_min) + 1.2) / (2.0 * math.sqrt(2)))),
        (float((sig == s_max).double().mean()), 0.5 * math.erfc((math.log(s_max) + 1.2) / (2.0 * math.sqrt(2)))),
    ):
        assert abs(frac - cdf) < 4 * math.sqrt(cdf * (1 - cdf) / n) + 1e-4, (frac, cdf)
    # Each level's timestep has that noise level back: the trainer's and the samplers' (t, sigma) agree.
    t = t_of_sigma(schedule, sig[:1000])
    ab = schedule.alpha_bar_at(t)
    torch.testing.assert_close(((1 - ab) / ab).sqrt(), sig[:1000], rtol=1e-9, atol=0)


def test_an_edm_denoiser_stays_one_under_the_inpainting_conditioning():
    from diffuse.diffusion.inpainting import MaskConditioned, condition_on
    from diffuse.nets import build_network

    net = build_network(
        {
            "arch": "unet",
            "resolution": 8,
            "in_channels": 3,
            "out_channels": 1,
            "ch": 16,
            "ch_mult": [1, 2],
            "attn_resolutions": [],
            "num_res_blocks": 1,
            "heads": 1,
            "dropout": 0.0,
            "num_classes": None,
        }
    )
    schedule = make_schedule("linear")
    den = EDMDenoiser(MaskConditioned(net), schedule, 0.3)
    told = condition_on(den, torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8))
    assert type(told) is EDMDenoiser and told.sigma_data == 0.3 and told.net is not den.net
    x = torch.randn(2, 1, 8, 8)
    assert told(x, torch.tensor([5, 900])).shape == x.shape


# -- through the CLI ----------------------------------------------------------------------------------------------

SMALL = [
    "dataset.size=128",
    "dataset.resolution=8",
    "trainer.batch_size=16",
    "trainer.log_every=5",
    "trainer.sample_n=0",
    "trainer.warmup=5",
    "trainer.lr=2e-3",
    "trainer.ckpt_every=100",
    "objective=edm",
]
UNET = ["model.ch=16", "model.ch_mult=[1,2]", "model.attn_resolutions=[4]"]
DIT = ["model=dit_s", "model.hidden_size=32", "model.depth=1", "model.heads=2"]


def _cli(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runner, out = CliRunner(), {}
    root = tmp_path_factory.mktemp("edm")
    for name, arch in (("unet", UNET), ("dit", DIT)):
        run = root / name
        r = runner.invoke(
            app, ["train", *SMALL, *arch, "trainer.steps=30", f"hydra.run.dir={run}"], catch_exceptions=False
        )
        assert r.exit_code == 0, r.stdout + r.stderr
        out[name] = run
    return out


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_train_then_sample_with_three_solvers_needs_no_flag(arch, trained, tmp_path, monkeypatch, compose_cfg):
    from omegaconf import OmegaConf

    from diffuse.pipeline.model import load_model
    from diffuse.pipeline.runtime import resolve_runtime

    run = trained[arch]
    ck = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert ck.config["objective"]["kind"] == "edm" and ck.config["objective"]["sigma_data"] == 0.5
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    m = load_model(
        ckpt=str(run),
        model=None,
        dataset=None,
        schedule=None,
        use_ema=True,
        runtime=resolve_runtime(OmegaConf.to_container(compose_cfg("sample").runtime)),
    )
    assert isinstance(m.denoiser, EDMDenoiser)
    for sampler in ("heun", "ddim", "dpm_solver"):
        out = tmp_path / sampler
        r = _cli(
            ["sample", f"ckpt={run}", f"sampler={sampler}", "n=3", "steps=4", "save_npz=true", f"hydra.run.dir={out}"],
            tmp_path,
            monkeypatch,
        )
        assert r.exit_code == 0, r.stdout + r.stderr
        meta = json.loads((out / "sample.json").read_text())
        assert meta["nfe"] == (7 if sampler == "heun" else 4), meta
        arr = np.load(out / "samples.npz")["arr_0"]
        assert arr.shape == (3, 8, 8, 3) and arr.std() > 0


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    base = ["train", *SMALL, *UNET, "objective.sigma_data=0.4"]
    for args in (
        [f"hydra.run.dir={straight}", "trainer.steps=8"],
        [f"hydra.run.dir={halves}", "trainer.steps=4"],
        [f"hydra.run.dir={halves}", "trainer.steps=8", "resume=true"],
    ):
        assert _cli([*base, *args], tmp_path, monkeypatch).exit_code == 0
    a = load_checkpoint(straight / "checkpoints" / "last.safetensors")
    b = load_checkpoint(halves / "checkpoints" / "last.safetensors")
    assert a.step == b.step == 8
    for part in ("model", "ema"):
        for k in getattr(a, part):
            assert torch.equal(getattr(a, part)[k], getattr(b, part)[k]), (part, k)


BAD = [
    (["objective.sigma_data=0"], "objective.sigma_data=0 is not allowed"),
    (["objective.sigma_data=-0.5"], "objective.sigma_data=-0.5 is not allowed"),
    (["objective.p_std=0"], "objective.p_std=0 is not allowed"),
    (["objective.p_std=-1.2"], "objective.p_std=-1.2 is not allowed"),
    (["objective.p_mean=nan"], "objective.p_mean=nan is not allowed"),
    (["objective.prediction=eps"], "objective.prediction='eps' is not allowed with objective.kind=edm"),
    (["objective.weighting=min_snr"], "objective.weighting='min_snr' is not allowed with objective.kind=edm"),
    (["objective=simple", "objective.weighting=edm"], "objective.weighting='edm' is not allowed"),
    (["objective.kind=karras"], "objective.kind='karras' is not allowed"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_are_one_line(extra, needle, tmp_path, monkeypatch):
    run = tmp_path / "run"
    r = _cli(["train", *SMALL, *UNET, "trainer.steps=1", *extra, f"hydra.run.dir={run}"], tmp_path, monkeypatch)
    assert r.exit_code == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not run.exists() or not any(run.rglob("*"))


@pytest.mark.parametrize(
    "change,needle",
    [({"sigma_data": -1.0}, "objective.sigma_data=-1.0"), ({"kind": "karras"}, "objective.kind='karras'")],
)
def test_a_crafted_checkpoint_objective_is_refused(change, needle, trained, tmp_path, monkeypatch):
    src = trained["unet"] / "checkpoints" / "last.safetensors"
    with safe_open(str(src), "pt") as f:
        m, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(m["diffuse.config"])
    cfg["objective"].update(change)
    m["diffuse.config"] = json.dumps(cfg)
    m["diffuse.sha256"] = checkpoint_hash(tensors, m)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=m)
    r = _cli(
        ["sample", f"ckpt={tmp_path / 'bad.safetensors'}", "n=1", "steps=2", f"hydra.run.dir={tmp_path / 's'}"],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_edm_network_as_feature_extractor_reads_c_in_x(trained):
    """metrics.features=checkpoint on an EDM-trained network: at t = 0 it is given c_in(sigma_0) x, the input it
    was trained on, not x."""
    from diffuse.metrics.features import build_extractor

    run = trained["unet"]
    m = {"features": "checkpoint", "features_ckpt": str(run)}
    ex = build_extractor(m, torch.device("cpu"))
    sched = make_schedule("linear", T=1000)
    c_in = 1 / math.sqrt(float(sched.sigmas[0]) ** 2 + SD**2)
    assert ex.input_scale == pytest.approx(c_in, rel=1e-12) and c_in > 1.9
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    got = ex(images)["pool"]
    ex.input_scale = 1.0
    assert not torch.allclose(ex(images)["pool"], got)
    ex.input_scale = c_in
    torch.testing.assert_close(ex(images)["pool"], got, rtol=0, atol=0)
