"""diffuse convert --from diffusers: a diffusers UNet2DModel and our U-Net after conversion are the same function."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffuse.checkpoint import load_checkpoint
from diffuse.diffusion.schedule import make_schedule
from diffuse.errors import UserError
from diffuse.interop.convert import convert_diffusers
from diffuse.interop.diffusers_unet import DEFAULT_SCHEDULE, schedule_config
from diffuse.pipeline.config import to_dict
from diffuse.pipeline.model import network_from_checkpoint

# google/ddpm-cifar10-32's unet/config.json, as published (keys absent there take UNet2DModel's defaults).
REFERENCE = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# A small relative of it: attention at the last level with four heads, symmetric downsampling, 8 groups.
SMALL = {
    **REFERENCE,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "sample_size": 8,
    "downsample_padding": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def diffusers_model(config, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()


def write_model(d, config, seed=0, old_names=False):
    """config.json + diffusion_pytorch_model.safetensors as diffusers lays them out; returns the model."""
    model = diffusers_model(config, seed)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if old_names:  # checkpoints saved before diffusers 0.15 name the attention layers query/key/value/proj_attn
        ren = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
        for new, old in ren.items():
            sd = {k.replace(new, old): v for k, v in sd.items()}
    save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    return model


def outputs(ours, theirs, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, size, size, generator=g)
    t = torch.tensor([0, 437, 999])
    with torch.no_grad():
        return ours(x, t), theirs(x, t).sample


def test_reference_network_matches_diffusers(tmp_path, compose_cfg):
    theirs = write_model(tmp_path / "unet", REFERENCE)
    assert sum(p.numel() for p in theirs.parameters()) == 35_746_307
    out = convert_diffusers(tmp_path / "unet", tmp_path / "ddpm.safetensors")
    ckpt = load_checkpoint(out)
    tn = network_from_checkpoint(ckpt)
    net, schedule, prediction = tn.net, tn.schedule, tn.prediction
    a, b = outputs(net.eval(), theirs, 32)
    assert (a - b).abs().max() < 1e-5, (a - b).abs().max()
    assert b.abs().max() > 0.1  # not a trivially zero network
    # The converted network is model=ddpm_cifar10 at 32x32 (dropout is a training setting: diffusers' is 0.0).
    ours = {
        **to_dict(compose_cfg("train", ["model=ddpm_cifar10"]).model),
        "resolution": 32,
        "in_channels": 3,
        "dropout": 0.0,
    }
    assert ckpt.config["model"] == ours
    # schedule=linear, in diffusers' exact-linspace form (the same betas at T = 1000).
    assert ckpt.config["schedule"] == {
        **to_dict(compose_cfg("train", ["schedule=linear"]).schedule),
        "scale_with_T": False,
    }
    assert prediction == "eps" and schedule.T == 1000
    simple = to_dict(compose_cfg("train", ["objective=simple"]).objective)
    assert ckpt.config["objective"] == {k: simple[k] for k in ("prediction", "weighting", "min_snr_gamma", "p_uncond")}
    assert abs(float(schedule.betas[0]) - 1e-4) < 1e-12 and abs(float(schedule.betas[-1]) - 0.02) < 1e-12


@pytest.mark.parametrize("old_names", [False, True])
def test_small_relative_and_old_attention_names(tmp_path, old_names):
    theirs = write_model(tmp_path / "m", SMALL, seed=3, old_names=old_names)
    net = network_from_checkpoint(load_checkpoint(convert_diffusers(tmp_path / "m", tmp_path / "o.safetensors"))).net
    assert net.mid[1].heads == 4
    a, b = outputs(net.eval(), theirs, 8)
    assert (a - b).abs().max() < 1e-5


def test_a_named_weights_file_converts(tmp_path):
    theirs = write_model(tmp_path / "m", SMALL)
    f = (
        tmp_path / "m" / "diffusion_pytorch_model.fp32.safetensors"
    )  # a variant's name: the folder alone does not find it
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").rename(f)
    with pytest.raises(UserError, match="no diffusion_pytorch_model.safetensors"):
        convert_diffusers(tmp_path / "m", tmp_path / "o.safetensors")
    net = network_from_checkpoint(load_checkpoint(convert_diffusers(f, tmp_path / "o.safetensors"))).net
    a, b = outputs(net.eval(), theirs, 8)
    assert (a - b).abs().max() < 1e-5


def test_pipeline_folder_and_its_scheduler(tmp_path):
    write_model(tmp_path / "pipe" / "unet", SMALL)
    (tmp_path / "pipe" / "scheduler").mkdir()
    sched = {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "linear",
        "beta_start": 2e-4,
        "beta_end": 0.03,
        "num_train_timesteps": 500,
    }
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    ckpt = load_checkpoint(convert_diffusers(tmp_path / "pipe", tmp_path / "o.safetensors"))
    assert ckpt.config["schedule"] == {
        "kind": "linear",
        "T": 500,
        "beta_start": 2e-4,
        "beta_end": 0.03,
        "scale_with_T": False,
    }
    sched["beta_schedule"] = "squaredcos_cap_v2"
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    with pytest.raises(UserError, match="beta_schedule='squaredcos_cap_v2'"):
        convert_diffusers(tmp_path / "pipe", tmp_path / "p.safetensors")


def diffusers_betas(T, beta_start, beta_end):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end, beta_schedule="linear")
    return sched.betas.to(torch.float64)


@pytest.mark.parametrize("T", [500, 1000])
def test_linear_betas_are_diffusers_linear_betas(T):
    """Diffusers' linear betas are linspace(beta_start, beta_end, T) for every T: scale_with_T=false. The
    1000/T-scaled form (our training default) is a different schedule at T != 1000."""
    theirs = diffusers_betas(T, 1e-4, 0.02)
    ours = make_schedule("linear", T=T, beta_start=1e-4, beta_end=0.02, scale_with_T=False).betas
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)  # diffusers holds them in float32
    scaled = make_schedule("linear", T=T, beta_start=1e-4, beta_end=0.02).betas
    assert torch.allclose(scaled, theirs, rtol=1e-6, atol=0) == (T == 1000)


def test_scheduler_config_at_500_steps_gives_diffusers_betas(tmp_path):
    sched = {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "linear",
        "beta_start": 2e-4,
        "beta_end": 0.03,
        "num_train_timesteps": 500,
    }
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(sched))
    cfg = schedule_config(path)
    assert cfg["scale_with_T"] is False and DEFAULT_SCHEDULE["scale_with_T"] is False
    ours = make_schedule(**cfg)
    assert ours.T == 500
    assert torch.allclose(ours.betas, diffusers_betas(500, 2e-4, 0.03), rtol=1e-6, atol=0)
    # what a checkpoint's schedule goes through (schedule: group of the CLI) accepts the recorded flag
    from diffuse.pipeline.model import schedule_from_config

    assert torch.equal(schedule_from_config(cfg).betas, ours.betas)
    with pytest.raises(UserError, match="schedule.scale_with_T=1 is not allowed"):
        schedule_from_config({**cfg, "scale_with_T": 1})


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"flip_sin_to_cos": True}, "flip_sin_to_cos=True"),
        ({"freq_shift": 0}, "freq_shift=0"),
        ({"norm_eps": 1e-5}, "norm_eps=1e-05"),
        ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "up_block_types"),
        ({"num_class_embeds": 10}, "num_class_embeds=10"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
        ({"attention_head_dim": 5}, "attention_head_dim=5"),
        ({"downsample_padding": 2}, "downsample_padding=2"),
        ({"cross_attention_dim": 768}, "'cross_attention_dim'"),
        ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel"),
    ],
)
def test_other_configurations_are_refused_naming_the_key(tmp_path, change, needle):
    write_model(tmp_path / "m", SMALL)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**SMALL, **change}))
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        convert_diffusers(tmp_path / "m", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    write_model(tmp_path / "m", SMALL)
    f = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    save_file({k: v for k, v in sd.items() if "conv_shortcut" not in k}, str(f))
    with pytest.raises(UserError, match="conv_shortcut"):
        convert_diffusers(tmp_path / "m", tmp_path / "o.safetensors")
    save_file({**sd, "extra.weight": torch.zeros(1)}, str(f))
    with pytest.raises(UserError, match="extra.weight"):
        convert_diffusers(tmp_path / "m", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_pickled_weights_are_refused_unopened(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMALL))
    (d / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.bin\).*refused"):
        convert_diffusers(d, tmp_path / "o.safetensors")
    with pytest.raises(UserError, match="pickled weights are refused"):
        convert_diffusers(d / "diffusion_pytorch_model.bin", tmp_path / "o.safetensors")


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffuse", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_converts_then_samples_and_refuses_in_one_line(tmp_path, compose_cfg):
    import numpy as np

    from diffuse.tasks import sample as sample_task

    write_model(tmp_path / "m", SMALL)
    r = _cli(
        "convert", "--from", "diffusers", str(tmp_path / "m"), "--out", str(tmp_path / "c.safetensors"), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"wrote {tmp_path / 'c.safetensors'}"
    sample_task.run(
        compose_cfg("sample", [f"ckpt={tmp_path / 'c.safetensors'}", "n=2", "steps=2", "save_npz=true"]), tmp_path / "s"
    )
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)
    from diffuse.tasks import train as train_task

    with pytest.raises(UserError, match="holds weights only .* cannot be continued exactly"):  # not a KeyError
        train_task.run(
            compose_cfg("train", [f"resume={tmp_path / 'c.safetensors'}", "dataset.size=8", "trainer.steps=1"]),
            tmp_path / "t",
        )

    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "m" / "diffusion_pytorch_model.bin")
    r = _cli(
        "convert", "--from", "diffusers", str(tmp_path / "m"), "--out", str(tmp_path / "d.safetensors"), cwd=tmp_path
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0], r.stderr
    assert not (tmp_path / "d.safetensors").exists()


def _no_tensor_read(monkeypatch):
    """Make reading the weights' data (or building a real network) fail the test: what is refused must be refused
    from the config and the safetensors header alone."""
    import safetensors.torch

    from diffuse import nets

    def forbidden(*a, **k):
        raise AssertionError("the weights were read or the network built before the config was refused")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    real = nets._construct
    monkeypatch.setattr(
        nets, "_construct", lambda *a: real(*a) if torch.empty(()).device.type == "meta" else forbidden()
    )


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"sample_size": 10**6}, "sample_size=1000000"),
        ({"sample_size": 9}, "sample_size=9"),
        ({"block_out_channels": [16, 10**6]}, "block_out_channels=[16, 1000000]"),
        ({"layers_per_block": 10**4}, "layers_per_block=10000"),
        ({"in_channels": 10**4, "out_channels": 10**4}, "in_channels=10000"),
        # within every bound, but not what the weights hold: refused from the header's shapes
        (
            {"block_out_channels": [32, 64], "attention_head_dim": 16},
            "temb.0.weight has shape (64, 16), the config asks for (128, 32)",
        ),
        (
            {
                "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D"],
                "attention_head_dim": None,
            },
            "weights lack down_blocks.0.attentions.0",
        ),
        (
            {"down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]},
            "that their config.json does not describe",
        ),
        # within the per-key bounds, but a network far beyond the parameter bound
        ({"block_out_channels": [16384, 16384], "norm_num_groups": 32, "attention_head_dim": None}, "parameters"),
    ],
)
def test_a_lying_config_is_refused_from_the_header(tmp_path, monkeypatch, change, needle):
    write_model(tmp_path / "m", SMALL)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**SMALL, **change}))
    _no_tensor_read(monkeypatch)
    with pytest.raises(UserError) as e:
        convert_diffusers(tmp_path / "m", tmp_path / "o.safetensors")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("T", [10**9, 1, 0])
def test_num_train_timesteps_out_of_bounds_are_refused(tmp_path, monkeypatch, T):
    write_model(tmp_path / "pipe" / "unet", SMALL)
    (tmp_path / "pipe" / "scheduler").mkdir()
    sched = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "num_train_timesteps": T}
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    _no_tensor_read(monkeypatch)
    with pytest.raises(UserError, match=f"num_train_timesteps={T} cannot be converted"):
        convert_diffusers(tmp_path / "pipe", tmp_path / "o.safetensors")


def test_out_that_cannot_be_written_is_refused_before_the_work(tmp_path, monkeypatch):
    import diffuse.interop.convert as convert

    write_model(tmp_path / "m", SMALL)
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "file").write_text("x")

    def forbidden(*a, **k):
        raise AssertionError("the model was read before out= was checked")

    monkeypatch.setattr(convert, "find_files", forbidden)
    with pytest.raises(UserError, match="dir.safetensors' is a directory"):
        convert_diffusers(tmp_path / "m", tmp_path / "dir.safetensors")
    with pytest.raises(UserError, match="is a file, not a directory"):
        convert_diffusers(tmp_path / "m", tmp_path / "file" / "o.safetensors")
    # through the CLI: one line, exit 2
    from typer.testing import CliRunner

    from diffuse.cli import app

    r = CliRunner().invoke(
        app, ["convert", "--from", "diffusers", str(tmp_path / "m"), "--out", str(tmp_path / "dir.safetensors")]
    )
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "is a directory" in lines[0], r.stderr


@pytest.mark.parametrize(
    "opts",
    [["--resolution", "8"], ["--schedule", "cosine"], ["--no-rescale-timesteps"], ["--prediction", "x0"]],
)
def test_the_adm_options_are_refused_with_a_diffusers_folder(tmp_path, opts):
    from typer.testing import CliRunner

    from diffuse.cli import app

    write_model(tmp_path / "m", SMALL)
    args = ["convert", "--from", "diffusers", str(tmp_path / "m"), "--out", str(tmp_path / "o.safetensors"), *opts]
    r = CliRunner().invoke(app, args)
    lines = r.stderr.strip().splitlines()
    flag = opts[0].replace("--no-", "--")
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert lines[0] == (
        f"error: {flag} is an option of --from improved-diffusion and guided-diffusion: "
        "a diffusers folder's config.json says what it sets"
    )
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "damage,needle",
    [(lambda t: torch.full_like(t, float("nan")), "NaN"), (lambda t: t.to(torch.int64), "is int64")],
)
def test_damaged_source_weights_are_refused_naming_the_tensor(tmp_path, damage, needle):
    from safetensors.torch import load_file, save_file

    write_model(tmp_path / "m", SMALL)
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    name = sorted(sd)[0]
    save_file({**sd, name: damage(sd[name])}, str(weights))
    with pytest.raises(UserError, match=rf"tensor {re.escape(name)} .*{needle}"):
        convert_diffusers(tmp_path / "m", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_out_never_destroys_a_file(tmp_path):
    """An existing --out only with --force; never the source itself, nor a checkpoint of a run a live process
    holds, --force or not (issue 27, part 5)."""
    from diffuse.rundir import lock

    write_model(tmp_path / "m", SMALL)
    out = tmp_path / "c.safetensors"
    out.write_bytes(b"a user's file")
    with pytest.raises(UserError, match=r"c.safetensors' exists: give --force to replace it"):
        convert_diffusers(tmp_path / "m", out)
    assert out.read_bytes() == b"a user's file"
    convert_diffusers(tmp_path / "m", out, force=True)
    assert load_checkpoint(out).config["model"]["arch"] == "unet"
    source = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    before = source.read_bytes()
    for target in (source, tmp_path / "m"):  # the weights file, or the folder named as the source
        with pytest.raises(UserError, match="is the file being converted"):
            convert_diffusers(target if target.is_dir() else tmp_path / "m", source, force=True)
    assert source.read_bytes() == before
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    held = lock.acquire(run, "diffuse train")
    try:
        with pytest.raises(UserError, match="is in use by diffuse train"):
            convert_diffusers(tmp_path / "m", run / "checkpoints" / "last.safetensors", force=True)
    finally:
        held.release()
    assert not (run / "checkpoints" / "last.safetensors").exists()
