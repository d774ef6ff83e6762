"""Learned reverse variances (Nichol & Dhariwal 2021): the interpolated variance at its ends against the fixed ones,
the hybrid loss's bound term against the bound's existing terms and weights, the stop-gradient on the mean, ancestral
sampling on respaced steps, and objective.learn_sigma through the CLI (train, sample, eval bpd, resume, distill)."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from diffuse.cli import app
from diffuse.diffusion.bound import step_log_variance, vlb_term
from diffuse.diffusion.noise import PerSample
from diffuse.diffusion.objectives import diffusion_loss, loss_weight
from diffuse.diffusion.prediction import NetworkDenoiser
from diffuse.diffusion.samplers import ddpm
from diffuse.diffusion.schedule import make_schedule, q_sample
from diffuse.images import from_uint8
from diffuse.metrics.likelihood import vlb
from diffuse.nets import build_network, drop_variance_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

C = 2


def learned_net(v_const=None, seed=0, arch="unet"):
    """A small network with 2C outputs; v_const fixes its variance channels (zero weights, constant bias)."""
    torch.manual_seed(seed)
    if arch == "unet":
        cfg = {
            "arch": "unet",
            "resolution": 8,
            "in_channels": C,
            "out_channels": 2 * C,
            "ch": 8,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "groups": 4,
        }
    else:
        cfg = {
            "arch": "dit",
            "resolution": 8,
            "in_channels": C,
            "out_channels": 2 * C,
            "patch_size": 2,
            "hidden_size": 16,
            "depth": 1,
            "heads": 2,
        }
    net = build_network(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():  # DiT's final layer starts at zero: give every output a value
            p.add_(0.05 * torch.randn_like(p))
        if v_const is not None:
            net.conv_out.weight[C:] = 0
            net.conv_out.bias[C:] = v_const
    return cfg, net


def as64(net):
    """The float32 network on float64 inputs (the samplers and the bound work in float64 here)."""
    return lambda x, t, y=None: net(x.float(), t, y).double()


def grid_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return from_uint8(torch.randint(0, 256, (n, C, 8, 8), generator=g, dtype=torch.uint8)).double()


def test_variance_ends_are_beta_and_beta_tilde_on_respaced_steps():
    sched = make_schedule("cosine", T=1000)
    ab_t, ab_s = float(sched.alpha_bar[800]), float(sched.alpha_bar[600])
    beta = 1 - ab_t / ab_s
    ends = step_log_variance(torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64), ab_t, ab_s).exp()
    tilde = beta * (1 - ab_s) / (1 - ab_t)
    torch.testing.assert_close(
        ends, torch.tensor([tilde, beta, math.sqrt(tilde * beta)], dtype=torch.float64), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_bound_term_at_beta_tilde_is_the_vlb_weighting(prediction):
    """At v_raw = -1 the learned variance is beta-tilde, whose KL is the existing objective.weighting=vlb weight
    (nats/dim, times T) on the eps error: the same number from two derivations."""
    sched = make_schedule("linear", T=200)
    x0, n = grid_data(6), 6
    t = torch.tensor([1, 5, 40, 100, 150, 199])
    noise = torch.randn(x0.shape, dtype=torch.float64)
    x_t = q_sample(sched, x0, t, noise)
    eps_hat = noise + 0.3 * torch.randn_like(noise)
    kl = vlb_term(x0, x_t, t, eps_hat, torch.full_like(x0, -1.0), sched, discretized=True)
    mse = (eps_hat - noise).pow(2).flatten(1).mean(1)
    from diffuse.diffusion.objectives import eps_space_factor

    snr = sched.alpha_bar[t] / (1 - sched.alpha_bar[t])
    w = loss_weight(sched, t, prediction, "vlb") * eps_space_factor(prediction, snr)  # back to the eps error's weight
    torch.testing.assert_close(kl * sched.T, w * mse, rtol=1e-9, atol=0)
    assert n == kl.shape[0]


def test_bound_term_equals_the_likelihood_modules_terms_at_learned_variances():
    """The training term (bound.vlb_term, table lookups on the device) against metrics.likelihood's KL and decoder
    (its posterior and reverse variance) for the same network call: every t, the decoder at t = 0 included."""
    sched = make_schedule("cosine", T=50)
    _, net = learned_net()
    den = NetworkDenoiser(as64(net), "eps", sched, learn_sigma=True)
    x0 = grid_data(5, seed=1)
    for ts in ([0, 0, 0, 0, 0], [1, 2, 10, 30, 49]):
        t = torch.tensor(ts)
        x_t = q_sample(sched, x0, t, torch.randn(x0.shape, dtype=torch.float64))
        eps = den(x_t, t)
        v_raw = den.variance_output(x_t, t)
        ours = vlb_term(x0, x_t, t, eps, v_raw, sched, discretized=True) * x0[0].numel()
        if ts[0] == 0:
            ref = vlb.decoder_nll(x0, x_t, eps, sched, True, v_raw)
        else:
            ref = vlb.kl_terms(x0, x_t, eps, t, sched, "learned", v_raw)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    # the variance channels really vary: the learned bound is not a fixed one in disguise
    assert v_raw.std() > 0.01


def test_learned_bound_at_beta_tilde_ends_equals_the_fixed_bound():
    sched = make_schedule("linear", T=40)
    _, net = learned_net(v_const=-1.0)
    den = NetworkDenoiser(as64(net), "eps", sched, learn_sigma=True)
    x = grid_data(3, seed=2)
    fixed = vlb.vlb_bpd(den, x, sched, generator=PerSample(0, [0, 1, 2]), variance="beta_tilde", batch_t=8)
    learned = vlb.vlb_bpd(
        den,
        x,
        sched,
        generator=PerSample(0, [0, 1, 2]),
        variance="learned",
        batch_t=8,
        learned_variance=den.variance_output,
    )
    torch.testing.assert_close(learned, fixed, rtol=1e-10, atol=0)
    with pytest.raises(Exception, match="learned variances"):
        vlb.vlb_bpd(den, x, sched, variance="learned")


def test_hybrid_loss_stops_the_mean_gradient_in_its_bound_term():
    sched = make_schedule("linear", T=100)
    x0 = grid_data(4, seed=3).float()
    out = torch.randn(4, 2 * C, 8, 8, requires_grad=True)

    def net(x, t, y):
        return out

    t, noise = torch.tensor([0, 3, 50, 99]), torch.randn(x0.shape)
    hybrid = diffusion_loss(net, x0, sched, t=t, noise=noise, learn_sigma=True, vlb_weight=0.001).sum()
    (g_hybrid,) = torch.autograd.grad(hybrid, out)
    out_mean = out[:, :C].detach().clone().requires_grad_(True)
    simple = diffusion_loss(lambda x, t, y: out_mean, x0, sched, t=t, noise=noise).sum()
    (g_simple,) = torch.autograd.grad(simple, out_mean)
    torch.testing.assert_close(g_hybrid[:, :C], g_simple, rtol=0, atol=0)
    assert g_hybrid[:, C:].abs().sum() > 0
    # the bound term is lambda T L_t in bits/dim
    vlb = (hybrid - simple).detach() / (0.001 * sched.T) * math.log(2)
    eps = out[:, :C].detach().double()
    x_t = q_sample(sched, x0, t, noise).double()
    ref = vlb_term(x0.double(), x_t, t, eps, out[:, C:].detach().double(), sched, discretized=True).sum()
    torch.testing.assert_close(vlb.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("end,fixed", [(-1.0, "beta_tilde"), (1.0, "beta")])
def test_ancestral_sampling_with_variance_ends_is_the_fixed_sampler(end, fixed):
    sched = make_schedule("cosine", T=1000)
    _, net = learned_net(v_const=end)
    den = NetworkDenoiser(as64(net), "eps", sched, learn_sigma=True)
    ts = torch.tensor([999, 700, 400, 120, 30, 0])  # respaced: the step's beta is 1 - alpha_bar_t / alpha_bar_s
    x_T = torch.randn(3, C, 8, 8, dtype=torch.float64)
    a = ddpm(
        den, x_T, ts, sched, variance="learned", learned_variance=den.variance_output, generator=PerSample(1, [0, 1, 2])
    )
    b = ddpm(den, x_T, ts, sched, variance=fixed, generator=PerSample(1, [0, 1, 2]))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # null: the model's own variances
    c = ddpm(
        den, x_T, ts, sched, variance=None, learned_variance=den.variance_output, generator=PerSample(1, [0, 1, 2])
    )
    torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_variance_output_reuses_the_leading_rows_of_the_last_call():
    sched = make_schedule("linear", T=100)
    _, net = learned_net()
    calls = []
    den = NetworkDenoiser(
        lambda x, t, y: calls.append(x.shape[0]) or as64(net)(x, t, y), "eps", sched, learn_sigma=True
    )
    x, t = torch.randn(2, C, 8, 8, dtype=torch.float64), torch.tensor([10, 10])
    den(torch.cat([x, x]), torch.cat([t, t]))  # classifier-free guidance's one batched call
    v = den.variance_output(x, t)
    assert calls == [4]
    den(x + 1, t)
    torch.testing.assert_close(den.variance_output(x, t), v, rtol=0, atol=1e-6)  # other inputs: a fresh forward
    assert calls == [4, 2, 2]


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_dropping_variance_outputs_keeps_the_mean(arch):
    cfg, net = learned_net(arch=arch)
    small_cfg = {**cfg, "out_channels": None}
    small = build_network(small_cfg)
    small.load_state_dict(drop_variance_outputs(cfg, net.state_dict(), C))
    x, t = torch.randn(2, C, 8, 8), torch.tensor([3, 70])
    torch.testing.assert_close(small(x, t), net(x, t)[:, :C], rtol=0, atol=1e-6)


# -- through the CLI ----------------------------------------------------------------------------------------------

SMALL = [
    "dataset.size=64",
    "dataset.resolution=8",
    "trainer.batch_size=8",
    "trainer.log_every=2",
    "trainer.sample_n=2",
    "trainer.sample_every=4",
    "trainer.sample_steps=3",
    "sampler=ddpm",
    "trainer.warmup=2",
    "trainer.ckpt_every=100",
    "model=tiny",
    "model.ch=8",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[]",
    "schedule.T=100",
    "objective.learn_sigma=true",
]


def _cli(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.mark.slow
def test_train_sample_eval_resume_distill(tmp_path, monkeypatch):
    from diffuse.checkpoint import load_checkpoint

    straight, halves = tmp_path / "straight", tmp_path / "halves"
    for args in (
        [f"hydra.run.dir={straight}", "trainer.steps=4"],
        [f"hydra.run.dir={halves}", "trainer.steps=2"],
        [f"hydra.run.dir={halves}", "trainer.steps=4", "resume=true"],
    ):
        r = _cli(["train", *SMALL, *args], tmp_path, monkeypatch)
        assert r.exit_code == 0, r.stdout + r.stderr
    a, b = (load_checkpoint(d / "checkpoints" / "last.safetensors") for d in (straight, halves))
    assert a.config["model"]["out_channels"] == 6 and a.config["objective"]["learn_sigma"] is True
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    # ancestral sampling with the learned variances differs from the fixed ones; DDIM uses the mean only
    outs = {}
    for name, extra in (("learned", []), ("beta", ["sampler.variance=beta"]), ("ddim", ["sampler=ddim"])):
        out = tmp_path / name
        args = [
            "sample",
            f"ckpt={straight}",
            "n=2",
            "steps=5",
            "sampler=ddpm",
            "save_npz=true",
            *extra,
            f"hydra.run.dir={out}",
        ]
        r = _cli(args, tmp_path, monkeypatch)
        assert r.exit_code == 0, r.stdout + r.stderr
        import numpy as np

        outs[name] = np.load(out / "samples.npz")["arr_0"]
    assert (outs["learned"] != outs["beta"]).any()
    r = _cli(
        [
            "eval",
            "--metric",
            "bpd",
            f"ckpt={straight}",
            "dataset=shapes",
            "dataset.resolution=8",
            "likelihood.n=2",
            "likelihood.methods=[vlb]",
            f"hydra.run.dir={tmp_path / 'bpd'}",
        ],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0, r.stdout + r.stderr
    info = json.loads((tmp_path / "bpd" / "metrics.json").read_text())
    assert info["likelihood"]["variance"] == "learned" and 0 < info["metrics"]["bpd_vlb"] < 30
    # a progressive student of a learned-variance teacher learns the mean only
    r = _cli(
        [
            "distill",
            f"teacher={straight}",
            "method=progressive",
            "distill.start_steps=4",
            "distill.target_steps=2",
            "trainer.steps=2",
            "trainer.batch_size=8",
            "trainer.sample_n=0",
            f"hydra.run.dir={tmp_path / 'student'}",
        ],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0, r.stdout + r.stderr
    s = load_checkpoint(tmp_path / "student" / "checkpoints" / "last.safetensors")
    assert s.config["model"]["out_channels"] is None and s.config["objective"]["learn_sigma"] is False


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["train", "objective=edm", "objective.learn_sigma=true"],
            "learn_sigma=true is not allowed with objective.kind=edm",
        ),
        (["train", "objective.learn_sigma=maybe"], "objective.learn_sigma='maybe'"),
        (["train", "objective.learn_sigma=true", "objective.vlb_weight=-1"], "objective.vlb_weight"),
        (
            ["sample", "model=oracle", "dataset=gmm", "sampler=ddpm", "sampler.variance=learned", "n=1", "steps=2"],
            "sampler.variance=learned needs a model trained with objective.learn_sigma=true",
        ),
    ],
)
def test_bad_values_are_one_line(args, needle, tmp_path, monkeypatch):
    r = _cli([*args, f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, monkeypatch)
    assert r.exit_code == 2, r.stdout + r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
