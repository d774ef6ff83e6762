"""Import a diffusers AutoencoderKL (the Stable Diffusion VAE family, e.g. stabilityai/sd-vae-ft-mse) as a diffuse
autoencoder checkpoint, for `diffuse train autoencoder=FILE`.

    diffuse convert --from diffusers PATH_OR_DIR --out FILE.safetensors

PATH_OR_DIR is the VAE's folder (config.json + diffusion_pytorch_model.safetensors), a pipeline folder holding vae/
(and no unet/: give PATH/vae then), or one of those files. Only safetensors and JSON are read.

The mapping is exact for what diffuse/nets/autoencoder.py expresses, which is AutoencoderKL's whole design space but
its activation: DownEncoderBlock2D / UpDecoderBlock2D levels, SiLU, GroupNorm eps 1e-6, a single-head attention in
the middle block (or none), the 1x1 convs around the latent (or not). Diffusers' attention keeps q, k, v as three
linear layers, ours one matrix: they are stacked, as for the U-Net. scaling_factor, shift_factor and latents_mean /
latents_std are recorded; of them only shift_factor is used (the latents are centred by it, as diffusers'
pipelines do): a latent model measures its own scale factor on its data.
AutoencoderTiny (TAESD) is a different network, converted by diffuse/interop/taesd.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from diffuse import nets
from diffuse.interop.weights import (
    DiffusersConfig,
    attn_weights,
    check_fit,
    mapped_weights,
    refuse_extra,
    save_converted,
)

# AutoencoderKL's constructor defaults (diffusers 0.42): what a key absent from config.json means.
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Recorded in the checkpoint's source, not part of the network.
RECORDED = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
# Our autoencoder's arguments -> the config.json keys that set them, for the network's own checks' messages.
KEYS = {
    "resolution": "sample_size",
    "ch": "block_out_channels",
    "ch_mult": "block_out_channels",
    "num_res_blocks": "layers_per_block",
    "groups": "norm_num_groups",
}


def autoencoder_config(dcfg: dict, where: str = "config.json") -> dict:
    """Our autoencoder's arguments for a diffusers AutoencoderKL config, or one line naming the first key we cannot
    reproduce exactly."""
    c = DiffusersConfig(dcfg, DEFAULTS, where=where, cls="an AutoencoderKL", ours="autoencoder")
    if c["act_fn"] != "silu":
        c.refuse("act_fn", '"silu"')
    chans = c.widths()
    ch, n = chans[0], len(chans)
    if c["down_block_types"] != ["DownEncoderBlock2D"] * n:
        c.refuse("down_block_types", f"{n} entries, each DownEncoderBlock2D")
    if c["up_block_types"] != ["UpDecoderBlock2D"] * n:
        c.refuse("up_block_types", f"{n} entries, each UpDecoderBlock2D")
    groups = c["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or any(x % groups for x in chans):
        c.refuse("norm_num_groups", f"a divisor of every entry of block_out_channels {chans}")
    size, factor = c.side(), 2 ** (n - 1)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= nets.MAX_RESOLUTION or size % factor:
        c.refuse("sample_size", f"a square size up to {nets.MAX_RESOLUTION} divisible by {factor}")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not isinstance(c[key], bool):
            c.refuse(key, "true or false")
    model = {
        "arch": "autoencoder",
        "latent_channels": c["latent_channels"],
        "ch": ch,
        "ch_mult": [x // ch for x in chans],
        "num_res_blocks": c["layers_per_block"],
        "groups": groups,
        "mid_attention": c["mid_block_add_attention"],
        "quant_conv": c["use_quant_conv"],
        "post_quant_conv": c["use_post_quant_conv"],
        "dropout": 0.0,
        "resolution": size,
        "in_channels": c["in_channels"],
    }
    if c["out_channels"] != c["in_channels"]:
        model["out_channels"] = c["out_channels"]
    return model


# Diffusers' names -> ours, for everything but the attention layers (whose q, k, v are stacked).
_RENAMES = [
    (r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.levels.\3.blocks.\4."),
    (r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.", r"\1.levels.\3.resample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block2."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^quant_conv\.", "quant."),
    (r"^post_quant_conv\.", "post_quant."),
    (r"\.conv_shortcut\.", ".skip."),
]


def map_weights(sd: dict[str, torch.Tensor], net) -> dict[str, torch.Tensor]:
    """Diffusers' AutoencoderKL state dict renamed onto `net` (ours), checked name by name and shape by shape."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for part in ("encoder", "decoder"):
        if any(k.startswith(f"{part}.mid_block.attentions.0.") for k in sd):
            out.update(
                {f"{part}.mid.attn.{k}": v for k, v in attn_weights(sd, f"{part}.mid_block.attentions.0").items()}
            )
    for name, t in sd.items():
        ours = name
        for pattern, repl in _RENAMES:
            ours = re.sub(pattern, repl, ours)
        out[ours] = t
    refuse_extra(set(out) - set(net.state_dict()))
    return check_fit(out, net)


def convert_autoencoder(config_path: Path, weights_path: Path, dcfg: dict, src, out: Path) -> Path:
    """Write the diffuse checkpoint of the AutoencoderKL described by `dcfg` (config_path) to `out`."""
    where = str(config_path)
    model = autoencoder_config(dcfg, where)
    weights = mapped_weights(weights_path, model, map_weights, where=where, keys=KEYS)
    full = {**DEFAULTS, **dcfg}
    source = {"format": "diffusers", "class": "AutoencoderKL", **{k: full[k] for k in RECORDED}}
    return save_converted(out, src, model, weights, source=source)
