"""diffuse export --to diffusers: the pipeline folder diffusers loads is our network and schedule, and a DDIM run
through diffusers' own scheduler lands where ours does."""

import json

import pytest
import torch

from diffuse.checkpoint import Checkpoint, save_checkpoint
from diffuse.diffusion.prediction import NetworkDenoiser
from diffuse.diffusion.samplers.ddim import ddim
from diffuse.errors import UserError
from diffuse.interop.export import export_diffusers
from diffuse.nets import build_network
from diffuse.pipeline.model import schedule_from_config

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

# Two levels of 8x8, attention at 4x4 and in the middle with two heads of 16 channels, 8 groups, class-conditional.
MODEL = {
    "arch": "unet",
    "ch": 16,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "dropout": 0.0,
    "heads": 2,
    "groups": 8,
    "num_classes": 3,
    "resolution": 8,
    "in_channels": 3,
}


def make_ckpt(path, model=MODEL, schedule=None, prediction="v", objective=None, seed=0):
    torch.manual_seed(seed)
    net = build_network(model)
    # Random non-zero weights everywhere (a fresh U-Net zeroes some output layers): the mapping is then tested.
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    config = {
        "model": model,
        "schedule": schedule or {"kind": "cosine", "T": 1000, "cosine_s": 0.008},
        "objective": {"kind": "diffusion", "prediction": prediction, **(objective or {})},
        "data": {"is_8bit": True, "num_classes": model.get("num_classes")},
    }
    save_checkpoint(path, Checkpoint(config=config, step=5, model=net.state_dict(), ema=net.state_dict()))
    return net.eval(), schedule_from_config(config["schedule"])


@pytest.mark.parametrize(
    "schedule,prediction,name",
    [
        ({"kind": "cosine", "T": 1000, "cosine_s": 0.008}, "v", "squaredcos_cap_v2"),
        ({"kind": "linear", "T": 500, "beta_start": 1e-4, "beta_end": 0.02, "scale_with_T": False}, "eps", "linear"),
        ({"kind": "sigmoid", "T": 300, "sigmoid_start": -3.0, "sigmoid_end": 3.0, "sigmoid_tau": 1.0}, "x0", None),
    ],
)
def test_pipeline_is_our_network_and_schedule(tmp_path, schedule, prediction, name):
    from diffusers import DDIMScheduler, DDPMPipeline

    ours, sched = make_ckpt(tmp_path / "c.safetensors", schedule=schedule, prediction=prediction)
    out = export_diffusers(tmp_path / "c.safetensors", tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(str(out))
    unet, ddpm = pipe.unet.eval(), pipe.scheduler
    cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["beta_schedule"] == (name or "linear") and (cfg["trained_betas"] is None) == (name is not None)
    assert ddpm.config.prediction_type == {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]
    assert ddpm.config.num_train_timesteps == sched.T
    # diffusers keeps its tables in float32: our float64 alpha_bar to float32 precision.
    assert torch.allclose(ddpm.alphas_cumprod.double(), sched.alpha_bar, rtol=2e-6, atol=1e-7)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 17, sched.T // 2, sched.T - 1])
    y = torch.tensor([0, 2, 1, 3])  # 3: the null label of guidance
    with torch.no_grad():
        a, b = ours(x, t, y), unet(x, t, class_labels=y).sample
    assert b.abs().max() > 0.1
    assert (a - b).abs().max() < 1e-5, (a - b).abs().max()

    # A 6-step DDIM through diffusers' scheduler read from the same folder, and ours on its timesteps.
    ddim_s = DDIMScheduler.from_pretrained(str(out), subfolder="scheduler")
    ddim_s.set_timesteps(6)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    labels = torch.tensor([1, 3])
    xs = x_T.clone()
    with torch.no_grad():
        for step in ddim_s.timesteps:
            model_out = unet(xs, step.expand(2), class_labels=labels).sample
            xs = ddim_s.step(model_out, step, xs, eta=0.0, use_clipped_model_output=True).prev_sample
    mine = ddim(NetworkDenoiser(ours, prediction, sched), x_T, ddim_s.timesteps.long(), sched, y=labels, clip_x0=True)
    assert (mine - xs).abs().max() < 1e-5, (mine - xs).abs().max()
    assert xs.abs().max() > 0.1


def test_learned_variances_are_diffusers_learned_range(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    from diffuse.diffusion.bound import step_log_variance

    ours, sched = make_ckpt(
        tmp_path / "c.safetensors",
        model={**MODEL, "out_channels": 6},
        prediction="eps",
        objective={"learn_sigma": True},
    )
    out = export_diffusers(tmp_path / "c.safetensors", tmp_path / "pipe")
    unet = UNet2DModel.from_pretrained(str(out), subfolder="unet").eval()
    ddpm = DDPMScheduler.from_pretrained(str(out), subfolder="scheduler")
    assert ddpm.config.variance_type == "learned_range" and unet.config.out_channels == 6
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        a, b = ours(x, t, y), unet(x, t, class_labels=y).sample
    assert (a - b).abs().max() < 1e-5
    # The variance of an ancestral step on a respaced (10-step) process, from the network's v_raw channels.
    ddpm.set_timesteps(10)
    v_raw = b[:, 3:].clamp(-1, 1)
    for step in ddpm.timesteps[:-1]:
        s_prev = ddpm.previous_timestep(step)
        want = step_log_variance(v_raw.double(), float(sched.alpha_bar[step]), float(sched.alpha_bar[s_prev]))
        got = ddpm._get_variance(int(step), predicted_variance=v_raw)
        # diffusers computes 1 - alpha_bar_prev in float32: near t = 0 (alpha_bar ~ 1 - 4e-5) that is good to
        # about 1e-3 relative, which is what beta-tilde's log inherits there.
        assert torch.allclose(got.double(), want, atol=2e-3), (int(step), (got - want).abs().max())


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    cases = {
        "dit": (
            {
                "arch": "dit",
                "patch_size": 2,
                "hidden_size": 32,
                "depth": 1,
                "heads": 2,
                "resolution": 8,
                "in_channels": 3,
            },
            {},
            "model.arch='dit'",
        ),
        "edm": (MODEL, {"kind": "edm", "sigma_data": 0.5}, "objective.kind=edm"),
        "learned": ({**MODEL, "out_channels": 6}, {}, "outputs 6 channels"),
        "heads": ({**MODEL, "ch_mult": [1, 2], "attn_resolutions": [8]}, {}, "model.heads=2"),
    }
    for name, (model, objective, needle) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        make_ckpt(path, model=model, objective=objective)
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("[", r"\[")) as e:
            export_diffusers(path, tmp_path / f"out_{name}")
        assert "\n" not in str(e.value) and "diffusers" in str(e.value)
        assert not (tmp_path / f"out_{name}").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_cli_exports_and_refuses_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from diffuse.cli import app

    make_ckpt(tmp_path / "c.safetensors")
    args = ["export", "--to", "diffusers", "--ckpt", str(tmp_path / "c.safetensors")]
    ok = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "pipe")])
    assert ok.exit_code == 0 and ok.output.strip() == f"wrote {tmp_path / 'pipe'}", ok.output
    assert {p.name for p in (tmp_path / "pipe").iterdir()} == {"model_index.json", "unet", "scheduler"}
    for extra, needle in (
        (["--out", str(tmp_path / "pipe")], "it exists and is not an empty folder"),
        (["--to", "onnx", "--out", str(tmp_path / "x")], "--to 'onnx' is not allowed: choose diffusers"),
        (["--out", str(tmp_path / "x"), "--steps", "3"], "No such option: --steps"),
        (
            ["--out", str(tmp_path / "x"), "steps=3"],
            "unexpected extra argument(s) (steps=3) (its options are --NAME VALUE, not NAME=VALUE",
        ),
        ([], "Missing option '--out'"),
    ):
        r = CliRunner().invoke(app, [*args, *extra])
        assert r.exit_code == 2 and needle in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "x").exists()


def test_a_full_disk_while_the_weights_are_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error, "(os error 28)" in its text (issue 27, part 4)."""
    import safetensors.torch

    make_ckpt(tmp_path / "c.safetensors")

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match=r"--out=.*pipe' cannot be written: No space left on device$"):
        export_diffusers(tmp_path / "c.safetensors", tmp_path / "out" / "pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
