"""Import a diffusers AutoencoderKL (the Stable Diffusion VAE family, e.g. stabilityai/sd-vae-ft-mse) as a diffuse
autoencoder checkpoint, for `diffuse train autoencoder=FILE`.

    diffuse convert --from diffusers PATH_OR_DIR out=FILE.safetensors

PATH_OR_DIR is the VAE's folder (config.json + diffusion_pytorch_model.safetensors), a pipeline folder holding vae/
(and no unet/: give PATH/vae then), or one of those files. Only safetensors and JSON are read.

The mapping is exact for what diffuse/nets/autoencoder.py expresses, which is AutoencoderKL's whole design space but
its activation: DownEncoderBlock2D / UpDecoderBlock2D levels, SiLU, GroupNorm eps 1e-6, a single-head attention in
the middle block (or none), the 1x1 convs around the latent (or not). Diffusers' attention keeps q, k, v as three
linear layers, ours one matrix: they are stacked, as for the U-Net. scaling_factor, shift_factor and latents_mean /
latents_std are recorded; of them only shift_factor is used (the latents are centred by it, as diffusers'
pipelines do): a latent model measures its own scale factor on its data.
AutoencoderTiny (TAESD) is a different network, converted by diffuse/convert_taesd.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from diffuse import nets
from diffuse.checkpoint import Checkpoint, save_checkpoint
from diffuse.errors import UserError

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


def is_autoencoder_config(dcfg: dict) -> bool:
    return dcfg.get("_class_name") in ("AutoencoderKL", "AutoencoderTiny")


def autoencoder_config(dcfg: dict, where: str = "config.json") -> dict:
    """Our autoencoder's arguments for a diffusers AutoencoderKL config, or one line naming the first key we cannot
    reproduce exactly."""
    unknown = sorted(k for k in dcfg if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise UserError(f"{where}: key {unknown[0]!r} is not an AutoencoderKL setting this converter knows")
    c = {**DEFAULTS, **{k: v for k, v in dcfg.items() if not k.startswith("_")}}

    def refuse(key: str, allowed: str):
        raise UserError(f"{where}: {key}={c[key]!r} cannot be converted: diffuse's autoencoder needs {allowed}")

    if c["act_fn"] != "silu":
        refuse("act_fn", '"silu"')
    chans = c["block_out_channels"]
    if (
        not isinstance(chans, list)
        or not 1 <= len(chans) <= nets.MAX_LEVELS
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= nets.MAX_WIDTH for x in chans)
    ):
        refuse("block_out_channels", f"a list of 1 to {nets.MAX_LEVELS} integers, each from 1 to {nets.MAX_WIDTH}")
    ch, n = chans[0], len(chans)
    if any(x % ch for x in chans):
        refuse("block_out_channels", f"multiples of its first entry {ch}")
    if c["down_block_types"] != ["DownEncoderBlock2D"] * n:
        refuse("down_block_types", f"{n} entries, each DownEncoderBlock2D")
    if c["up_block_types"] != ["UpDecoderBlock2D"] * n:
        refuse("up_block_types", f"{n} entries, each UpDecoderBlock2D")
    groups = c["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or any(x % groups for x in chans):
        refuse("norm_num_groups", f"a divisor of every entry of block_out_channels {chans}")
    size = c["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    factor = 2 ** (n - 1)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= nets.MAX_RESOLUTION or size % factor:
        refuse("sample_size", f"a square size up to {nets.MAX_RESOLUTION} divisible by {factor}")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not isinstance(c[key], bool):
            refuse(key, "true or false")
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
    from diffuse.convert import _attn_weights

    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for part in ("encoder", "decoder"):
        if any(k.startswith(f"{part}.mid_block.attentions.0.") for k in sd):
            out.update(
                {f"{part}.mid.attn.{k}": v for k, v in _attn_weights(sd, f"{part}.mid_block.attentions.0").items()}
            )
    for name, t in sd.items():
        ours = name
        for pattern, repl in _RENAMES:
            ours = re.sub(pattern, repl, ours)
        out[ours] = t
    want = net.state_dict()
    extra = sorted(set(out) - set(want))
    if extra:
        raise UserError(f"weights have {extra[0]} (and {len(extra) - 1} more) that their config.json does not describe")
    for name, t in want.items():
        if name not in out:
            raise UserError(f"weights give nothing for {name}: they do not fit their config.json")
        if out[name].shape != t.shape:
            raise UserError(
                f"weights' tensor for {name} has shape {tuple(out[name].shape)}, the config asks for {tuple(t.shape)}"
            )
    return out


def convert_autoencoder(config_path: Path, weights_path: Path, dcfg: dict, src: str | Path, out: Path) -> Path:
    """Write the diffuse checkpoint of the AutoencoderKL described by `dcfg` (config_path) to `out`."""
    from diffuse.convert import mapped_weights

    if dcfg.get("_class_name") == "AutoencoderTiny":  # TAESD: another network (diffuse/nets/taesd.py)
        from diffuse.convert_taesd import convert_taesd

        return convert_taesd(config_path, weights_path, dcfg, src, out)
    where = str(config_path)
    model = autoencoder_config(dcfg, where)
    keys = {
        "resolution": "sample_size",
        "ch": "block_out_channels",
        "ch_mult": "block_out_channels",
        "num_res_blocks": "layers_per_block",
        "groups": "norm_num_groups",
    }
    weights = mapped_weights(weights_path, model, map_weights, where=where, keys=keys)
    full = {**DEFAULTS, **dcfg}
    config = {
        "model": model,
        "data": {"is_8bit": True, "num_classes": None},
        "source": {
            "format": "diffusers",
            "class": "AutoencoderKL",
            "path": str(Path(src).expanduser().resolve()),
            **{k: full[k] for k in RECORDED},
        },
    }
    return save_checkpoint(out, Checkpoint(config=config, step=0, model=weights))
