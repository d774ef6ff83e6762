"""Import a diffusers AutoencoderTiny (TAESD, e.g. madebyollin/taesd) as a diffuse `taesd` checkpoint, for
`diffuse train autoencoder=FILE`.

    diffuse convert --from diffusers PATH_OR_DIR --out FILE.safetensors

The folder is found as for AutoencoderKL (config.json + diffusion_pytorch_model.safetensors; a pipeline's vae/);
only safetensors and JSON are read. The mapping is exact for AutoencoderTiny's whole design space as diffusers runs
it: equal widths within each half (diffusers builds other widths but cannot run them), any block counts, any of its
activations and upsampling modes, and an upsampling factor that undoes the encoder's 2^(stages - 1). Diffusers keeps
each half as one nn.Sequential, so its tensor names are layer indices; they are recomputed here from the config.
scaling_factor and shift_factor are part of our network (its latents are (E(x) - shift) * scale, as in diffusers'
pipelines); latent_magnitude and latent_shift (the 8-bit storage format) are recorded, not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffuse import nets
from diffuse.errors import UserError
from diffuse.interop.weights import DiffusersConfig, mapped_weights, refuse_extra, save_converted
from diffuse.nets.taesd import ACTIVATIONS, UPSAMPLE_MODES

# AutoencoderTiny's constructor defaults (diffusers 0.42), which are madebyollin/taesd's settings.
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}
# Written into config.json by AutoencoderTiny itself (a copy of decoder_block_out_channels), or read by pipelines
# only (sample_size): neither changes the network.
IGNORED = ("block_out_channels", "sample_size")
RECORDED = ("latent_magnitude", "latent_shift", "force_upcast")
# Nothing in the weights depends on the image size; this is the size the checkpoint records when config.json has no
# sample_size (Stable Diffusion's, which madebyollin/taesd stands in for), divisible by every factor allowed.
DEFAULT_RESOLUTION = 512


def taesd_config(dcfg: dict, where: str = "config.json") -> dict:
    """Our `taesd` arguments for a diffusers AutoencoderTiny config, or one line naming the first key we cannot
    reproduce exactly."""
    c = DiffusersConfig(dcfg, DEFAULTS, where=where, cls="an AutoencoderTiny", ours="taesd", ignored=IGNORED)
    act = c["act_fn"].lower() if isinstance(c["act_fn"], str) else c["act_fn"]
    act = "silu" if act == "swish" else act  # diffusers' two names for one function
    if act not in ACTIVATIONS:
        c.refuse("act_fn", f"one of {', '.join(ACTIVATIONS)} (or swish)")
    if c["upsample_fn"] not in UPSAMPLE_MODES:
        c.refuse("upsample_fn", f"one of {', '.join(UPSAMPLE_MODES)}")
    widths = {}
    for half in ("encoder", "decoder"):
        chans, blocks = f"{half}_block_out_channels", f"num_{half}_blocks"
        if (
            not isinstance(c[blocks], list)
            or not 1 <= len(c[blocks]) <= nets.MAX_LEVELS
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= nets.MAX_BLOCKS for n in c[blocks])
        ):
            c.refuse(blocks, f"a list of 1 to {nets.MAX_LEVELS} integers, each from 0 to {nets.MAX_BLOCKS}")
        w = c[chans]
        if not isinstance(w, list) or len(w) != len(c[blocks]):
            c.refuse(chans, f"a list as long as {blocks} ({len(c[blocks])} entries)")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= nets.MAX_WIDTH for x in w):
            c.refuse(chans, f"integers from 1 to {nets.MAX_WIDTH}")
        if len(set(w)) != 1:
            # Each stage's first conv reads the stage's own width, so diffusers' forward fails on unequal ones.
            c.refuse(chans, "one width for every stage (AutoencoderTiny only runs with equal widths)")
        widths[half] = w[0]
    for key in ("scaling_factor", "shift_factor"):
        if isinstance(c[key], bool) or not isinstance(c[key], (int, float)):
            c.refuse(key, "a number")
    model = {
        "arch": "taesd",
        "in_channels": c["in_channels"],
        "latent_channels": c["latent_channels"],
        "encoder_width": widths["encoder"],
        "decoder_width": widths["decoder"],
        "encoder_blocks": c["num_encoder_blocks"],
        "decoder_blocks": c["num_decoder_blocks"],
        "act": act,
        "upsample_mode": c["upsample_fn"],
        "upsample_factor": c["upsampling_scaling_factor"],
        "scaling_factor": float(c["scaling_factor"]),
        "shift_factor": float(c["shift_factor"]),
        # Nothing checks a bad sample_size here: the network's own check names it.
        "resolution": DEFAULT_RESOLUTION if c.side() is None else c.side(),
    }
    if c["out_channels"] != c["in_channels"]:
        model["out_channels"] = c["out_channels"]
    return model


def tensor_names(model: dict) -> dict[str, str]:
    """Our state-dict name -> diffusers' for the network `model` describes."""
    names: dict[str, str] = {}

    def conv(ours: str, theirs: str, bias: bool = True):
        names[f"{ours}.weight"] = f"{theirs}.weight"
        if bias:
            names[f"{ours}.bias"] = f"{theirs}.bias"

    def block(ours: str, theirs: str):
        for k, idx in ((1, 0), (2, 2), (3, 4)):  # the Sequential is conv, act, conv, act, conv
            conv(f"{ours}.conv{k}", f"{theirs}.conv.{idx}")

    conv("encoder.conv_in", "encoder.layers.0")
    i = 1
    for s, n in enumerate(model["encoder_blocks"]):
        if s > 0:
            conv(f"encoder.stages.{s}.down", f"encoder.layers.{i}", bias=False)
            i += 1
        for j in range(n):
            block(f"encoder.stages.{s}.blocks.{j}", f"encoder.layers.{i}")
            i += 1
    conv("encoder.conv_out", f"encoder.layers.{i}")

    conv("decoder.conv_in", "decoder.layers.0")
    i = 2  # after conv_in and its activation
    stages = model["decoder_blocks"]
    for s, n in enumerate(stages):
        for j in range(n):
            block(f"decoder.stages.{s}.blocks.{j}", f"decoder.layers.{i}")
            i += 1
        if s < len(stages) - 1:
            conv(f"decoder.stages.{s}.conv", f"decoder.layers.{i + 1}", bias=False)  # after the Upsample
            i += 2
        else:
            conv("decoder.conv_out", f"decoder.layers.{i}")
    return names


def map_weights(sd: dict[str, torch.Tensor], net, model: dict) -> dict[str, torch.Tensor]:
    """Diffusers' AutoencoderTiny state dict renamed onto `net` (ours), checked name by name and shape by shape."""
    names = tensor_names(model)
    refuse_extra(set(sd) - set(names.values()))
    want = net.state_dict()
    out = {}
    for ours, t in want.items():
        theirs = names[ours]
        if theirs not in sd:
            raise UserError(f"weights give nothing for {theirs}: they do not fit their config.json")
        if sd[theirs].shape != t.shape:
            raise UserError(
                f"weights' tensor {theirs} has shape {tuple(sd[theirs].shape)}, the config asks for {tuple(t.shape)}"
            )
        out[ours] = sd[theirs]
    return out


KEYS = {
    "resolution": "sample_size",
    "encoder_width": "encoder_block_out_channels",
    "decoder_width": "decoder_block_out_channels",
    "encoder_blocks": "num_encoder_blocks",
    "decoder_blocks": "num_decoder_blocks",
    "act": "act_fn",
    "upsample_mode": "upsample_fn",
    "upsample_factor": "upsampling_scaling_factor",
}


def convert_taesd(config_path: Path, weights_path: Path, dcfg: dict, src, out: Path) -> Path:
    """Write the diffuse checkpoint of the AutoencoderTiny described by `dcfg` (config_path) to `out`."""
    where = str(config_path)
    model = taesd_config(dcfg, where)
    weights = mapped_weights(weights_path, model, lambda sd, net: map_weights(sd, net, model), where=where, keys=KEYS)
    full = {**DEFAULTS, **dcfg}
    source = {"format": "diffusers", "class": "AutoencoderTiny", **{k: full[k] for k in RECORDED}}
    return save_converted(out, src, model, weights, source=source)
