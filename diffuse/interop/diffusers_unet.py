"""Import a diffusers UNet2DModel (Ho et al.'s DDPM U-Net, e.g. google/ddpm-cifar10-32) as a diffuse checkpoint.

    diffuse convert --from diffusers PATH_OR_DIR --out FILE.safetensors

PATH_OR_DIR is a model folder (config.json + diffusion_pytorch_model.safetensors), a pipeline folder holding
unet/ (and scheduler/scheduler_config.json), or one of those two files.

The mapping is exact for the family of networks our U-Net (diffuse/nets/unet.py) can express: DownBlock2D /
AttnDownBlock2D levels mirrored by UpBlock2D / AttnUpBlock2D, a UNetMidBlock2D, sinusoidal [sin, cos] time
embedding with frequencies exp(-log(10000) i / (half - 1)) (diffusers' flip_sin_to_cos=false, freq_shift=1),
GroupNorm eps 1e-6, SiLU. Any other setting is refused with one line naming the config key. The layout of names
(unet_layout) is export's too: it writes our U-Net back under the same names. diffusers is not needed here: this
module reads its files, it does not import it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffuse import nets
from diffuse.errors import UserError
from diffuse.interop.weights import (
    DiffusersConfig,
    attn_weights,
    check_fit,
    conf_values,
    mapped_weights,
    read_json,
    refuse_extra,
    save_converted,
)
from diffuse.pipeline.model import MAX_T

# UNet2DModel's constructor defaults (diffusers 0.42): what a key absent from config.json means.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Settings our U-Net has exactly one way of doing: the value google/ddpm-cifar10-32 has, and nothing else.
REQUIRED: dict[str, Any] = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "attn_norm_num_groups": None,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}

# The schedule and objective google/ddpm-cifar10-32 was trained with (Ho et al.), which are schedule=linear and
# objective=simple: what its checkpoint records when no scheduler_config.json says otherwise. scale_with_T is false
# because diffusers' linear betas are linspace(beta_start, beta_end, T) for every T.
DEFAULT_SCHEDULE = {**conf_values("schedule", "linear"), "scale_with_T": False}
OBJECTIVE = conf_values("objective", "simple", ("prediction", "weighting", "min_snr_gamma", "p_uncond"))

# Our U-Net's arguments -> the config.json keys that set them, for the network's own checks' messages.
KEYS = {
    "resolution": "sample_size",
    "ch": "block_out_channels",
    "ch_mult": "block_out_channels",
    "num_res_blocks": "layers_per_block",
    "heads": "attention_head_dim",
    "groups": "norm_num_groups",
}

# Our names -> diffusers', outside the levels and the middle block; and within a residual block.
TOP = (
    ("temb.0", "time_embedding.linear_1"),
    ("temb.2", "time_embedding.linear_2"),
    ("conv_in", "conv_in"),
    ("norm_out", "conv_norm_out"),
    ("conv_out", "conv_out"),
)
RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}


def unet_config(dcfg: dict, where: str = "config.json") -> dict:
    """Our UNet's arguments (a model config for diffuse.nets.build_network) for a diffusers UNet2DModel config,
    or a UserError naming the first key we cannot reproduce exactly."""
    if dcfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{where}: _class_name={dcfg['_class_name']!r}: only UNet2DModel converts")
    c = DiffusersConfig(dcfg, DIFFUSERS_DEFAULTS, where=where, cls="a UNet2DModel", ours="U-Net")
    for key, want in REQUIRED.items():
        if c[key] != want:
            c.refuse(key, json.dumps(want))
    chans = c.widths()
    down = _block_types(c, len(chans))
    size = _sample_size(c, len(chans))
    c.integer("layers_per_block", 1, nets.MAX_BLOCKS)
    if c["downsample_padding"] not in (0, 1):
        c.refuse("downsample_padding", "0 (pad after, as Ho et al.) or 1")
    groups = c["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1 or any(x % groups for x in chans):
        c.refuse("norm_num_groups", f"a divisor of every entry of block_out_channels {chans}")
    for key in ("in_channels", "out_channels"):
        c.integer(key, 1, nets.MAX_IO_CHANNELS)
    heads = _heads(c, [chans[i] for i, b in enumerate(down) if b.startswith("Attn")] + [chans[-1]])
    dropout = c["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        c.refuse("dropout", "a number in [0, 1)")
    ch = chans[0]
    model = {
        "arch": "unet",
        "ch": ch,
        "ch_mult": [x // ch for x in chans],
        "num_res_blocks": c["layers_per_block"],
        "attn_resolutions": [size // 2**i for i, b in enumerate(down) if b.startswith("Attn")],
        "dropout": float(dropout),
        "heads": heads,
        "num_classes": None,
        "downsample_pad": "end" if c["downsample_padding"] == 0 else "both",
        "resolution": size,
        "in_channels": c["in_channels"],
    }
    if c["out_channels"] != c["in_channels"]:
        model["out_channels"] = c["out_channels"]
    if groups != 32:
        model["groups"] = groups
    return model


def _block_types(c: DiffusersConfig, n: int) -> list[str]:
    down, up = c["down_block_types"], c["up_block_types"]
    if not isinstance(down, list) or len(down) != n or any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in down):
        c.refuse("down_block_types", f"{n} entries, each DownBlock2D or AttnDownBlock2D")
    mirror = [b.replace("Down", "Up") for b in reversed(down)]
    if up != mirror:
        c.refuse("up_block_types", f"the mirror of down_block_types, {mirror}")
    return down


def _sample_size(c: DiffusersConfig, n: int) -> int:
    # The weights do not fix the resolution (convolutions run at any size); the levels do (each halves it), and
    # the sampler allocates it: an absurd one would hang or exhaust memory at the first image.
    size = c.side()
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or not 0 < size <= nets.MAX_RESOLUTION
        or size % 2 ** (n - 1)
    ):
        c.refuse(
            "sample_size",
            f"a square size up to {nets.MAX_RESOLUTION} divisible by {2 ** (n - 1)} "
            f"(each of its {n - 1} downsamplings halves it)",
        )
    return size


def _heads(c: DiffusersConfig, attn_chans: list[int]) -> int:
    """Diffusers fixes the width of a head (default: the whole width, one head); ours fixes the number of heads."""
    head_dim = c["attention_head_dim"]
    if head_dim is None:
        return 1
    if (
        not isinstance(head_dim, int)
        or any(x % head_dim for x in attn_chans)
        or len({x // head_dim for x in attn_chans}) != 1
    ):
        c.refuse(
            "attention_head_dim",
            f"null, or a width giving the same number of heads at every attention layer (channels {attn_chans})",
        )
    return attn_chans[0] // head_dim


def schedule_config(path: Path | None) -> dict:
    """The linear schedule of a DDPM/DDIM scheduler_config.json (eps prediction only), or Ho et al.'s."""
    if path is None:
        return dict(DEFAULT_SCHEDULE)
    s = read_json(path)
    where = str(path)
    if s.get("beta_schedule", "linear") != "linear":
        raise UserError(f"{where}: beta_schedule={s['beta_schedule']!r} cannot be converted: only linear is")
    if s.get("trained_betas") is not None:
        raise UserError(f"{where}: trained_betas cannot be converted: only a linear schedule is")
    if s.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(f"{where}: prediction_type={s['prediction_type']!r} cannot be converted: only epsilon is")
    out = {
        **DEFAULT_SCHEDULE,
        "T": s.get("num_train_timesteps", DEFAULT_SCHEDULE["T"]),
        "beta_start": s.get("beta_start", DEFAULT_SCHEDULE["beta_start"]),
        "beta_end": s.get("beta_end", DEFAULT_SCHEDULE["beta_end"]),
    }
    # The weights do not fix T either (the time embedding is sinusoidal in t); the schedule's tables do cost it.
    if isinstance(out["T"], bool) or not isinstance(out["T"], int) or not 2 <= out["T"] <= MAX_T:
        raise UserError(
            f"{where}: num_train_timesteps={out['T']!r} cannot be converted: it must be an integer from 2 to {MAX_T:,}"
        )
    for key in ("beta_start", "beta_end"):
        if isinstance(out[key], bool) or not isinstance(out[key], (int, float)) or not 0 < out[key] < 1:
            raise UserError(f"{where}: {key}={out[key]!r} is not a number in (0, 1)")
    return out


def unet_layout(net) -> Iterator[tuple[str, Any, str]]:
    """(our name, module, diffusers' name) for every block of our U-Net `net` in UNet2DModel's layout. Our down/up
    lists are flat: per level, its resnets (each with its attention, if any), then the resampler (none after the
    last level), in diffusers' order; diffusers numbers them within their level."""
    from diffuse.nets.layers import Downsample, Upsample

    for path, blocks, resampler in (("down", net.down, "downsamplers"), ("up", net.up, "upsamplers")):
        level, layer = 0, 0
        for k, block in enumerate(blocks):
            if isinstance(block[0], (Downsample, Upsample)):
                yield f"{path}.{k}.0", block[0], f"{path}_blocks.{level}.{resampler}.0"
                level, layer = level + 1, 0
                continue
            yield f"{path}.{k}.0", block[0], f"{path}_blocks.{level}.resnets.{layer}"
            if len(block) > 1:
                yield f"{path}.{k}.1", block[1], f"{path}_blocks.{level}.attentions.{layer}"
            layer += 1
    yield "mid.0", net.mid[0], "mid_block.resnets.0"
    yield "mid.1", net.mid[1], "mid_block.attentions.0"
    yield "mid.2", net.mid[2], "mid_block.resnets.1"


def map_weights(sd: dict[str, torch.Tensor], net) -> dict[str, torch.Tensor]:
    """Diffusers' state dict renamed onto `net`, our UNet built from unet_config(...)."""
    from diffuse.nets.layers import AttnBlock, ResBlock

    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(ours: str, theirs: str) -> None:
        if theirs not in sd:
            raise UserError(f"weights lack {theirs}: they do not fit their config.json")
        out[ours] = sd.pop(theirs)

    for ours, theirs in TOP:
        for part in ("weight", "bias"):
            take(f"{ours}.{part}", f"{theirs}.{part}")
    for ours, mod, theirs in unet_layout(net):
        if isinstance(mod, ResBlock):
            for name in mod.state_dict():
                sub, _, part = name.partition(".")
                take(f"{ours}.{name}", f"{theirs}.{RESNET[sub]}.{part}")
        elif isinstance(mod, AttnBlock):
            out.update({f"{ours}.{k}": v for k, v in attn_weights(sd, theirs).items()})
        else:  # a resampler
            for part in ("weight", "bias"):
                take(f"{ours}.conv.{part}", f"{theirs}.conv.{part}")
    refuse_extra(sd)
    return check_fit(out, net)


def convert_unet(config_path: Path, weights_path: Path, sched_path: Path | None, dcfg: dict, src, out: Path) -> Path:
    """Write the diffuse checkpoint of the UNet2DModel described by `dcfg` (config_path) to `out`."""
    where = str(config_path)
    model = unet_config(dcfg, where)
    schedule = schedule_config(sched_path)
    weights = mapped_weights(weights_path, model, map_weights, where=where, keys=KEYS)
    return save_converted(
        out, src, model, weights, source={"format": "diffusers"}, schedule=schedule, objective=dict(OBJECTIVE)
    )
