"""diffuse convert --from diffusers on an AutoencoderKL folder: diffusers' VAE and ours after conversion are the same
function (a random model of the Stable Diffusion VAE's config); what we cannot express is refused in one line."""

import json

import pytest
import torch
from safetensors.torch import save_file

from diffuse.checkpoint import load_checkpoint
from diffuse.errors import UserError
from diffuse.interop.convert import convert_diffusers
from diffuse.pipeline.latent import load_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")

# stabilityai/sd-vae-ft-mse's config.json (the Stable Diffusion v1 VAE), as published.
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def write_vae(d, config, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "diffusion_pytorch_model.safetensors")
    )
    return model


@pytest.mark.slow
def test_sd_vae_matches_diffusers(tmp_path):
    theirs = write_vae(tmp_path / "pipe" / "vae", SD_VAE)
    assert sum(p.numel() for p in theirs.parameters()) == 83_653_863
    out = convert_diffusers(tmp_path / "pipe", tmp_path / "vae.safetensors")  # a pipeline folder holding vae/ only
    ckpt = load_checkpoint(out)
    assert ckpt.config["model"]["ch_mult"] == [1, 2, 4, 4] and ckpt.config["source"]["scaling_factor"] == 0.18215
    ours = load_autoencoder(out).net
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = theirs.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        a, b = ours.decode(z), theirs.decode(z).sample
    assert (mean - post.mean).abs().max() < 1e-5 and (logvar - post.logvar).abs().max() < 1e-5
    assert post.mean.abs().max() > 0.1 and b.abs().max() > 0.1
    # The decoder's 30 layers accumulate float32 rounding to about 1e-5 on outputs of size 2 (the stacked q, k, v
    # product alone reorders sums): it is held within 1e-5 of the output's scale here, and exactly in float64 below.
    assert (a - b).abs().max() < 1e-5 * b.abs().max()


SMALL = {
    **SD_VAE,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "sample_size": 8,
    "use_quant_conv": False,
    "mid_block_add_attention": False,
    "latent_channels": 16,
}


def test_small_variant_without_quant_conv_or_attention(tmp_path):
    theirs = write_vae(tmp_path / "vae", SMALL)
    ours = load_autoencoder(convert_diffusers(tmp_path / "vae", tmp_path / "v.safetensors")).net
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(x)[0], theirs(x).sample
        assert (a - b).abs().max() < 1e-5
        a, b = ours.double()(x.double())[0], theirs.double()(x.double()).sample
    assert (a - b).abs().max() < 1e-12


def test_attention_and_quant_convs_are_exact_in_float64(tmp_path):
    config = {**SMALL, "use_quant_conv": True, "mid_block_add_attention": True, "latent_channels": 4}
    theirs = write_vae(tmp_path / "vae", config).double()
    ours = load_autoencoder(convert_diffusers(tmp_path / "vae", tmp_path / "v.safetensors")).net.double()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        post = theirs.encode(x).latent_dist
        xr, mean, logvar = ours(x)
        b = theirs.decode(post.mean).sample
    assert (mean - post.mean).abs().max() < 1e-12 and (logvar - post.logvar).abs().max() < 1e-12
    assert (xr - b).abs().max() < 1e-12 and b.abs().max() > 0.1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"act_fn": "relu"}, "act_fn='relu' cannot be converted"),
        ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, "up_block_types"),
        ({"norm_num_groups": 3}, "norm_num_groups=3"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
        ({"sample_size": 7}, "sample_size=7"),
    ],
)
def test_refusals_name_the_key(tmp_path, change, message):
    d = tmp_path / "vae"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**SMALL, **change}))
    save_file({"x": torch.zeros(1)}, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match=message):
        convert_diffusers(d, tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()


def test_a_shift_factor_centres_the_latents_as_diffusers_pipelines_do(tmp_path):
    """SD3 / Flux-style VAEs: the latent is E(x) - shift_factor; decoding adds it back before the decoder."""
    theirs = write_vae(tmp_path / "vae", {**SMALL, "shift_factor": 0.3})
    codec = load_autoencoder(convert_diffusers(tmp_path / "vae", tmp_path / "v.safetensors"))
    assert codec.shift == 0.3
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        mean = theirs.encode(x).latent_dist.mean
        z = codec.encode_unscaled(x)
        torch.testing.assert_close(z, mean - 0.3, rtol=0, atol=1e-5)
        torch.testing.assert_close(codec.decode(z), theirs.decode(mean).sample.clamp(-1, 1), rtol=0, atol=1e-5)
