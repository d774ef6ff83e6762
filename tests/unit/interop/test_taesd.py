"""diffuse convert --from diffusers on an AutoencoderTiny (TAESD) folder: diffusers' network and our `taesd` are the
same function (a random model of madebyollin/taesd's config, and small variants in float64); the codec's round trip
is diffusers' decode(encode(x)) under the latent shift/scale; what we cannot express is refused naming the key; and
a latent model trains on its latents and samples through the command line."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffuse.checkpoint import load_checkpoint
from diffuse.cli import app
from diffuse.errors import UserError
from diffuse.interop.convert import convert_diffusers
from diffuse.pipeline.latent import load_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")

# madebyollin/taesd's config.json: AutoencoderTiny's defaults, as save_pretrained writes them.
TAESD = {
    "_class_name": "AutoencoderTiny",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "relu",
    "block_out_channels": [64] * 4,
    "decoder_block_out_channels": [64] * 4,
    "encoder_block_out_channels": [64] * 4,
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}
# Two stages (factor 2) at width 8, and every setting away from its default: another activation, bilinear
# upsampling, a non-trivial latent shift and scale (taef1's), more latent channels, one block fewer or more.
SMALL = {
    **TAESD,
    "block_out_channels": [8, 8],
    "decoder_block_out_channels": [8, 8],
    "encoder_block_out_channels": [8, 8],
    "num_encoder_blocks": [1, 2],
    "num_decoder_blocks": [2, 0],
    "act_fn": "gelu",
    "upsample_fn": "bilinear",
    "latent_channels": 6,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}


def write_taesd(d, config, seed=0):
    """A random AutoencoderTiny of `config` saved as a diffusers folder. Its default initialisation leaves the
    latents near zero; the weights are redrawn larger so that every layer moves the output."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(**{k: v for k, v in config.items() if not k.startswith("_") and k != "block_out_channels"})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(d)  # safetensors
    (d / "config.json").write_text(json.dumps(config))  # the published file's keys, not this diffusers version's
    return model.eval()


def test_reference_taesd_matches_diffusers(tmp_path):
    theirs = write_taesd(tmp_path / "pipe" / "vae", TAESD)
    assert sum(p.numel() for p in theirs.parameters()) == 2_445_063
    out = convert_diffusers(tmp_path / "pipe", tmp_path / "taesd.safetensors")  # a pipeline folder holding vae/ only
    ckpt = load_checkpoint(out)
    assert ckpt.config["model"]["arch"] == "taesd" and ckpt.config["source"]["class"] == "AutoencoderTiny"
    codec = load_autoencoder(out)
    assert (codec.factor, codec.net.latent_channels) == (8, 4)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = 2 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))  # beyond 3: the tanh clamp matters
    with torch.no_grad():
        za, zb = codec.encode_unscaled(x), theirs.encode(x).latents
        a, b = codec.net.decode(z), theirs.decode(z).sample
    assert zb.abs().max() > 0.1 and b.abs().max() > 0.1
    assert (za - zb).abs().max() < 1e-5 and (a - b).abs().max() < 1e-5


def test_small_variant_is_exact_in_float64_and_round_trips(tmp_path):
    theirs = write_taesd(tmp_path / "vae", SMALL)
    codec = load_autoencoder(convert_diffusers(tmp_path / "vae", tmp_path / "t.safetensors"))
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        raw = theirs.encode(x).latents  # diffusers' pipelines give their denoiser (raw - shift) * scale
        # The codec's latents are that convention times the measured factor, and its decode inverts all of it:
        # decode(encode(x)) is diffusers' decode(encode(x)) (clamped to the image range), not its 8-bit forward.
        codec.scale_factor = 2.5
        z = codec.encode(x)
        assert (z - (raw - 0.1159) * 0.3611 * 2.5).abs().max() < 1e-5
        want = theirs.decode(raw).sample
        assert (codec.decode(z) - want.clamp(-1, 1)).abs().max() < 1e-5
        assert (want - theirs(x).sample).abs().max() > 1e-4  # forward's uint8 latents are another (lossy) path
        ours, theirs64 = codec.net.double(), theirs.double()
        z64 = torch.randn(2, 6, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
        assert (ours.encode(x.double()) - (theirs64.encode(x.double()).latents - 0.1159) * 0.3611).abs().max() < 1e-12
        a, b = ours.decode((z64 - 0.1159) * 0.3611), theirs64.decode(z64).sample
    assert b.abs().max() > 0.1 and (a - b).abs().max() < 1e-12


@pytest.mark.parametrize(
    "change, message",
    [
        ({"upsample_fn": "area"}, "upsample_fn='area' cannot be converted"),
        ({"act_fn": "tanh"}, "act_fn='tanh' cannot be converted"),
        (
            {"encoder_block_out_channels": [8, 16]},
            "encoder_block_out_channels=.8, 16. cannot be converted: .* equal widths",
        ),
        (
            {"upsampling_scaling_factor": 3},
            "upsampling_scaling_factor=3 is not allowed: the decoder's 2 stages must upsample by",
        ),
        (
            {"num_decoder_blocks": [1, 1, 1], "decoder_block_out_channels": [8] * 3},
            "upsampling_scaling_factor=2 is not allowed",
        ),
        ({"norm_num_groups": 4}, "key 'norm_num_groups' is not an AutoencoderTiny setting"),
    ],
)
def test_refusals_name_the_key(tmp_path, change, message):
    d = tmp_path / "vae"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**SMALL, **change}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match=message):
        convert_diffusers(d, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


def test_cli_convert_train_on_taesd_latents_and_sample(tmp_path, monkeypatch):
    # Three stages (factor 4): 16-pixel shapes diffuse as 4x4 latents, the size of the tiny U-Net's smallest input.
    cfg = {
        **SMALL,
        "latent_channels": 4,
        "act_fn": "relu",
        "upsample_fn": "nearest",
        "num_encoder_blocks": [1, 1, 1],
        "num_decoder_blocks": [1, 1, 1],
        "encoder_block_out_channels": [8] * 3,
        "decoder_block_out_channels": [8] * 3,
    }
    write_taesd(tmp_path / "vae", cfg)
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    r = run(
        app,
        ["convert", "--from", "diffusers", str(tmp_path / "vae"), "--out", str(tmp_path / "taesd.safetensors")],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    # The autoencoder is not a diffusion model: one line, exit 2
    r = run(app, ["sample", f"ckpt={tmp_path / 'taesd.safetensors'}", "n=1", f"hydra.run.dir={tmp_path / 'x'}"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "is an autoencoder" in lines[0], r.output
    train = [
        "train",
        f"autoencoder={tmp_path / 'taesd.safetensors'}",
        "dataset.resolution=16",
        "dataset.size=64",
        "model.ch=16",
        "model.attn_resolutions=[]",
        "trainer.steps=2",
        "trainer.batch_size=8",
        "trainer.sample_n=2",
        "trainer.sample_steps=2",
        "trainer.log_every=1",
        f"hydra.run.dir={tmp_path / 'ldm'}",
    ]
    r = run(app, train, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(tmp_path / "ldm" / "checkpoints" / "last.safetensors")
    rec = ckpt.config["autoencoder"]
    assert (rec["factor"], rec["latent_channels"]) == (4, 4) and ckpt.config["model"]["resolution"] == 4
    # The measured factor makes the cached latents (shifted and scaled TAESD latents) unit-variance.
    codec = load_autoencoder(tmp_path / "taesd.safetensors")
    cached = next((tmp_path / "ldm" / "latents").glob("latents-*.safetensors"))
    from safetensors.torch import load_file

    z = load_file(str(cached))["latents"]
    assert z.shape == (64, 4, 4, 4) and rec["scale_factor"] == pytest.approx(1 / float(z.double().std()), rel=1e-6)
    from diffuse.data import build_dataset

    data = build_dataset({**ckpt.config["dataset"]})
    assert torch.allclose(z[:8], codec.encode_unscaled(data.batch(torch.arange(8))[0]), atol=1e-6)
    r = run(
        app,
        ["sample", f"ckpt={tmp_path / 'ldm'}", "n=2", "steps=2", "save_npz=true", f"hydra.run.dir={tmp_path / 's'}"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (2, 16, 16, 3)  # decoded by TAESD: the images' size, not the 4x4 latents


NET = {
    "arch": "taesd",
    "resolution": 16,
    "in_channels": 3,
    "encoder_width": 8,
    "decoder_width": 8,
    "encoder_blocks": [1, 1, 1],
    "decoder_blocks": [1, 1, 1],
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder_width": 0}, "model.encoder_width=0 is not allowed"),
        ({"decoder_blocks": []}, "model.decoder_blocks=.. is not allowed"),
        ({"encoder_blocks": [1, -1, 1]}, "model.encoder_blocks=.1, -1, 1. is not allowed"),
        ({"act": "tanh"}, "model.act='tanh' is not allowed: choose one of relu, silu, gelu, mish"),
        ({"upsample_mode": "area"}, "model.upsample_mode='area' is not allowed"),
        ({"upsample_factor": 4}, "model.upsample_factor=4 is not allowed: the decoder's 3 stages must upsample by"),
        ({"scaling_factor": 0.0}, "model.scaling_factor=0.0 is not allowed"),
        ({"shift_factor": float("nan")}, "model.shift_factor=nan is not allowed"),
        ({"resolution": 18}, "resolution=18 is not allowed with model.encoder_blocks=.1, 1, 1.: .* multiple of 4"),
        ({"latent_channels": 0}, "model.latent_channels=0 is not allowed"),
        ({"encoder_width": 16384, "encoder_blocks": [64] * 3}, "describe a network of .* parameters: more than"),
    ],
)
def test_network_arguments_are_bounded(change, message):
    from diffuse.nets import build_network

    with pytest.raises(UserError, match=message):
        build_network({**NET, **change}, keys={})
