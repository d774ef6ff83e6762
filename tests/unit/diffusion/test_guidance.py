"""Classifier-free guidance against the exact mixture denoiser (the oracle knows eps_cond and eps_null)."""

import numpy as np
import pytest
import torch

from diffuse.data.gmm import default_mixture
from diffuse.diffusion.guidance import cfg_denoiser
from diffuse.diffusion.samplers import dpm_solver
from diffuse.diffusion.schedule import coefficients
from diffuse.diffusion.timesteps import karras_timesteps
from diffuse.errors import UserError
from diffuse.metrics.mixture import mixture_fit
from diffuse.pipeline.conditioning import guide, parse_guidance, resolve_labels
from diffuse.pipeline.config import to_dict
from diffuse.pipeline.model import Model
from diffuse.tasks import sample as sample_task
from tests.conftest import gaussian_x_T as _x_T


def _sample(den, mixture, schedule, n, label, seed=0):
    y = torch.full((n,), label)
    return dpm_solver(den, _x_T(n, mixture.shape, seed), karras_timesteps(schedule, 20), schedule, y=y)


class Recorder:
    def __init__(self, den):
        self.den, self.batches = den, []

    def __call__(self, x, t, y=None):
        self.batches.append((x.shape[0], None if y is None else y.tolist()))
        return self.den(x, t, y)


def test_formula_in_one_batched_forward(oracle_setup):
    mixture, schedule, den = oracle_setup
    x, t, y = _x_T(6, mixture.shape), torch.full((6,), 400), torch.tensor([0, 1, 2, 3, 0, 1])
    rec = Recorder(den)
    out = cfg_denoiser(rec, 2.5, null_label=mixture.K)(x, t, y)
    assert rec.batches == [(12, [0, 1, 2, 3, 0, 1] + [4] * 6)]  # one call: cond batch then null batch
    e_c, e_u = den(x, t, y), den(x, t, None)
    assert torch.allclose(out, e_u + 2.5 * (e_c - e_u), atol=1e-12)
    assert torch.allclose(cfg_denoiser(den, 1.0, mixture.K)(x, t, y), e_c)
    assert torch.allclose(cfg_denoiser(den, 0.0, mixture.K)(x, t, y), e_u)


def test_scale_one_samples_only_that_component(oracle_setup):
    mixture, schedule, den = oracle_setup
    x = _sample(cfg_denoiser(den, 1.0, mixture.K), mixture, schedule, 600, label=2)
    assert bool((mixture.classify(x) == 2).all())
    r = mixture_fit(mixture, x)[2]
    assert r["n"] == 600 and r["mean_err"] < 0.15 and abs(r["std_ratio"] - 1) < 0.08, r


def test_scale_zero_reproduces_the_mixture(oracle_setup):
    mixture, schedule, den = oracle_setup
    x = _sample(cfg_denoiser(den, 0.0, mixture.K), mixture, schedule, 1200, label=2)
    for r in mixture_fit(mixture, x):
        assert abs(r["freq_z"]) < 3 and r["mean_err"] < 0.15 and abs(r["std_ratio"] - 1) < 0.08, r


def test_larger_scale_moves_away_from_the_unconditional(oracle_setup):
    """s > 1 extrapolates x0_cond away from x0_null: the samples of class k move off mu_k in the direction
    mu_k - E[x0] (away from the other components), further for larger s."""
    mixture, schedule, den = oracle_setup
    k = 0
    direction = (mixture.means[k] - (mixture.weights.view(-1, 1, 1, 1) * mixture.means).sum(0)).flatten()
    direction = direction / direction.norm()
    shift = {}
    for s in (1.0, 3.0, 6.0):
        x = _sample(cfg_denoiser(den, s, mixture.K), mixture, schedule, 300, label=k)
        shift[s] = float((x.flatten(1).mean(0) - mixture.means[k].flatten()) @ direction)
    print(shift)
    assert abs(shift[1.0]) < 0.02 and 0 < shift[3.0] < shift[6.0], shift


def test_interval_and_rescale(oracle_setup):
    mixture, schedule, den = oracle_setup
    x, y = _x_T(4, mixture.shape), torch.tensor([0, 1, 2, 3])
    t = torch.tensor([100, 300, 500, 700])
    g = cfg_denoiser(den, 3.0, mixture.K, interval=(250, 550))(x, t, y)
    plain = cfg_denoiser(den, 3.0, mixture.K)(x, t, y)
    cond = den(x, t, y)
    assert torch.allclose(g[[1, 2]], plain[[1, 2]]) and torch.allclose(g[[0, 3]], cond[[0, 3]])
    # rescale=1: the guided x0 has the conditional x0's per-sample std
    r = cfg_denoiser(den, 3.0, mixture.K, rescale=1.0, schedule=schedule)(x, t, y)
    a, s = coefficients(schedule, t, x)
    std = lambda e: ((x - s * e) / a).flatten(1).std(1)  # noqa: E731
    assert torch.allclose(std(r), std(cond), rtol=1e-9)
    assert not torch.allclose(std(plain), std(cond), rtol=1e-3)
    for bad, kw in [
        ("scale=-1", {"scale": -1}),
        ("interval", {"scale": 2, "interval": (5, 1)}),
        ("rescale=2", {"scale": 2, "rescale": 2}),
    ]:
        with pytest.raises(UserError, match=bad):
            cfg_denoiser(den, null_label=4, **{"scale": 1, **kw})


NULL = 4


def toy(x, t, y):
    """A denoiser whose conditional and null outputs are known in closed form: eps_cond(x, t, y) and
    eps_null(x, t) below, different per sample, timestep and label, and with different spreads in x0."""
    tt = t.to(torch.float64).view(-1, 1, 1, 1)
    cond = y != NULL
    return torch.where(cond.view(-1, 1, 1, 1), eps_cond(x, tt, y.view(-1, 1, 1, 1)), eps_null(x, tt))


def eps_cond(x, tt, y):
    return 0.6 * x + 0.2 * y - tt / 1000


def eps_null(x, tt):
    return -0.3 * x + torch.cos(x) * tt / 500


def toy_setup():
    from diffuse.diffusion.schedule import make_schedule

    schedule = make_schedule("linear")
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    t, y = torch.tensor([100, 300, 500, 700]), torch.tensor([0, 1, 2, 3])
    tt, yy = t.to(torch.float64).view(-1, 1, 1, 1), y.view(-1, 1, 1, 1)
    ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
    return schedule, x, t, y, eps_cond(x, tt, yy), eps_null(x, tt), ab.sqrt(), (1 - ab).sqrt()


def rescaled(x, e_c, e_g, a, sg, phi):
    """Lin et al. 2024 eq. 15-16 in x0: x0_g * std(x0_c) / std(x0_g) per sample, mixed with x0_g by phi."""
    x0_c, x0_g = (x - sg * e_c) / a, (x - sg * e_g) / a
    std = lambda v: v.flatten(1).std(1).view(-1, 1, 1, 1)  # noqa: E731
    x0 = phi * x0_g * std(x0_c) / std(x0_g) + (1 - phi) * x0_g
    return (x - a * x0) / sg


def test_interval_at_another_scale_against_its_formula():
    _, x, t, y, e_c, e_u, _, _ = toy_setup()
    out = cfg_denoiser(toy, 2.5, NULL, interval=(250, 550))(x, t, y)
    guided = e_u + 2.5 * (e_c - e_u)
    assert torch.allclose(out[[1, 2]], guided[[1, 2]], rtol=1e-12, atol=1e-12)  # t = 300, 500: inside
    assert torch.allclose(out[[0, 3]], e_c[[0, 3]], rtol=1e-12, atol=1e-12)  # t = 100, 700: outside
    # the ends of the interval are inside
    edge = cfg_denoiser(toy, 2.5, NULL, interval=(300, 500))(x, t, y)
    assert torch.allclose(edge[[1, 2]], guided[[1, 2]], rtol=1e-12, atol=1e-12)


def test_rescale_below_one_against_its_formula():
    schedule, x, t, y, e_c, e_u, a, sg = toy_setup()
    out = cfg_denoiser(toy, 2.5, NULL, rescale=0.7, schedule=schedule)(x, t, y)
    expected = rescaled(x, e_c, e_u + 2.5 * (e_c - e_u), a, sg, 0.7)
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)
    # and it is not the unrescaled guidance (the toy's x0 spreads differ)
    assert (out - (e_u + 2.5 * (e_c - e_u))).abs().max() > 1e-3


def test_scale_zero_keeps_interval_and_rescale():
    """scale 0 is eps_null only where guidance applies: outside the interval it is eps_cond, and the rescale
    still takes its std from x0_cond. Plain scale 0 stays one pass of the null batch."""
    schedule, x, t, y, e_c, e_u, a, sg = toy_setup()
    out = cfg_denoiser(toy, 0.0, NULL, interval=(250, 550))(x, t, y)
    assert torch.allclose(out[[1, 2]], e_u[[1, 2]], rtol=1e-12, atol=1e-12)
    assert torch.allclose(out[[0, 3]], e_c[[0, 3]], rtol=1e-12, atol=1e-12)
    out = cfg_denoiser(toy, 0.0, NULL, rescale=0.7, schedule=schedule)(x, t, y)
    assert torch.allclose(out, rescaled(x, e_c, e_u, a, sg, 0.7), rtol=1e-10, atol=1e-12)
    assert (out - e_u).abs().max() > 1e-3
    both = cfg_denoiser(toy, 0.0, NULL, interval=(250, 550), rescale=1.0, schedule=schedule)(x, t, y)
    full = rescaled(x, e_c, e_u, a, sg, 1.0)
    assert torch.allclose(both[[1, 2]], full[[1, 2]], rtol=1e-10, atol=1e-12)
    assert torch.allclose(both[[0, 3]], e_c[[0, 3]], rtol=1e-12, atol=1e-12)
    rec = Recorder(toy)
    assert torch.allclose(cfg_denoiser(rec, 0.0, NULL)(x, t, y), e_u, rtol=1e-12, atol=1e-12)
    assert rec.batches == [(4, [NULL] * 4)]


def test_sample_labels_and_npz(oracle_setup, tmp_path, compose_cfg):
    base = ["model=oracle", "dataset=gmm", "n=5", "steps=5", "sampler=dpm_solver", "save_npz=true", "save_images=false"]
    sample_task.run(compose_cfg("sample", base + ["label=3"]), tmp_path / "a")
    arr = np.load(tmp_path / "a" / "samples.npz")
    assert arr["arr_1"].tolist() == [3] * 5 and arr["arr_1"].dtype == np.int64
    mixture = default_mixture()
    x = torch.from_numpy(arr["arr_0"]).permute(0, 3, 1, 2).double() / 127.5 - 1
    assert mixture.classify(x).tolist() == [3] * 5
    sample_task.run(compose_cfg("sample", base + ["labels=[0,2]", "guidance.scale=2"]), tmp_path / "b")
    assert np.load(tmp_path / "b" / "samples.npz")["arr_1"].tolist() == [0, 2, 0, 2, 0]
    info = sample_task.run(compose_cfg("sample", base + ["guidance.scale=2"]), tmp_path / "c")
    assert np.load(tmp_path / "c" / "samples.npz")["arr_1"].tolist() == [0, 1, 2, 3, 0]
    assert info["nfe"] == 5  # guided: one batched call per step
    for extra, needle in [
        (["label=7"], "label 7"),
        (["guidance.scale=-2"], "guidance.scale=-2"),
        (["label=1", "labels=[0]"], "both"),
    ]:
        with pytest.raises(UserError, match=needle):
            sample_task.run(compose_cfg("sample", base + extra), tmp_path / "bad")


def test_unconditional_model_refuses_labels_and_scale(oracle_setup, compose_cfg):
    _, schedule, den = oracle_setup
    model = Model(den, schedule, (3, 8, 8), None, False, {"ckpt": "unconditional.safetensors"})

    def guidance(*overrides):
        return parse_guidance(to_dict(compose_cfg("sample", list(overrides)).guidance))

    with pytest.raises(UserError, match="unconditional"):
        guide(model, guidance("guidance.scale=3"))
    assert guide(model, guidance()) is den and guide(model, guidance("guidance=none", "guidance.scale=3")) is den
    with pytest.raises(UserError, match="unconditional"):
        resolve_labels(1, None, 4, None)
