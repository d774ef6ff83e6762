"""Import a diffusers UNet2DModel (Ho et al.'s DDPM U-Net, e.g. google/ddpm-cifar10-32) as a diffuse checkpoint.

    diffuse convert --from diffusers PATH_OR_DIR out=FILE.safetensors

PATH_OR_DIR is a model folder (config.json + diffusion_pytorch_model.safetensors), a pipeline folder holding
unet/ (and scheduler/scheduler_config.json), or one of those two files. Only safetensors and JSON are read:
pickled weights (.bin, .pt, .ckpt) are refused, never opened.

The mapping is exact for the family of networks our U-Net (diffuse/nets/unet.py) can express: DownBlock2D /
AttnDownBlock2D levels mirrored by UpBlock2D / AttnUpBlock2D, a UNetMidBlock2D, sinusoidal [sin, cos] time
embedding with frequencies exp(-log(10000) i / (half - 1)) (diffusers' flip_sin_to_cos=false, freq_shift=1),
GroupNorm eps 1e-6, SiLU. Any other setting is refused with one line naming the config key. Diffusers'
attention keeps q, k, v as three linear layers; ours is one 1x1 conv producing [q; k; v], so the three weight
matrices are stacked. diffusers is not needed here: this module reads its files, it does not import it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffuse import nets
from diffuse.checkpoint import Checkpoint, save_checkpoint
from diffuse.errors import UserError
from diffuse.pipeline.model import MAX_T

WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

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

# The schedule and objective google/ddpm-cifar10-32 was trained with (Ho et al.): what its checkpoint records
# when no scheduler_config.json says otherwise. Same keys as conf/schedule/linear.yaml, conf/objective/simple.yaml.
# scale_with_T is false because diffusers' linear betas are linspace(beta_start, beta_end, T) for every T.
DEFAULT_SCHEDULE = {"kind": "linear", "T": 1000, "beta_start": 1.0e-4, "beta_end": 0.02, "scale_with_T": False}
OBJECTIVE = {"prediction": "eps", "weighting": "simple", "min_snr_gamma": 5.0, "p_uncond": 0.1}


def find_files(src: str | Path) -> tuple[Path, Path, Path | None]:
    """(config.json, weights, scheduler_config.json or None) for a model dir, a pipeline dir or one of the files."""
    p = Path(src).expanduser()
    if not p.exists():
        raise UserError(f"{src}: no such file or directory (give a diffusers model folder or its {WEIGHTS})")
    given = None  # a weights file named on the command line (e.g. a .fp16.safetensors variant)
    if p.is_file():
        if p.suffix in PICKLED:
            raise UserError(
                f"{p}: pickled weights are refused (loading them can run code): give the {WEIGHTS} file or its folder"
            )
        if p.name == "config.json" or p.suffix == ".safetensors":
            given = p if p.suffix == ".safetensors" else None
            p = p.parent
        else:
            raise UserError(f"{p}: not a diffusers model file: give a folder with config.json and {WEIGHTS}")
    model_dir = p if (p / "config.json").is_file() else p / "unet"
    if not (model_dir / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        model_dir = p / "vae"  # a pipeline folder holding only its autoencoder
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{p}: no config.json (nor unet/config.json): not a diffusers model or pipeline folder")
    weights = given if given is not None and given.parent == model_dir else model_dir / WEIGHTS
    if not weights.is_file():
        pickled = sorted(q.name for q in model_dir.iterdir() if q.suffix in PICKLED)
        if pickled:
            raise UserError(
                f"{model_dir}: only pickled weights ({pickled[0]}) are there and they are refused (loading them can run code): "
                f"save the model with safe_serialization to get {WEIGHTS}"
            )
        raise UserError(f"{model_dir}: no {WEIGHTS}")
    sched = next(
        (
            c
            for c in (
                model_dir / "scheduler" / "scheduler_config.json",
                model_dir.parent / "scheduler" / "scheduler_config.json",
            )
            if c.is_file()
        ),
        None,
    )
    return model_dir / "config.json", weights, sched


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def unet_config(dcfg: dict, where: str = "config.json") -> dict:
    """Our UNet's arguments (a model config for diffuse.nets.build_network) for a diffusers UNet2DModel config,
    or a UserError naming the first key we cannot reproduce exactly."""
    if dcfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{where}: _class_name={dcfg['_class_name']!r}: only UNet2DModel converts")
    unknown = sorted(k for k in dcfg if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise UserError(f"{where}: key {unknown[0]!r} is not a UNet2DModel setting this converter knows")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in dcfg.items() if not k.startswith("_")}}

    def refuse(key: str, allowed: str):
        raise UserError(f"{where}: {key}={c[key]!r} cannot be converted: diffuse's U-Net needs {allowed}")

    for key, want in REQUIRED.items():
        if c[key] != want:
            refuse(key, json.dumps(want))
    chans = c["block_out_channels"]
    if (
        not isinstance(chans, list)
        or not 1 <= len(chans) <= nets.MAX_LEVELS
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= nets.MAX_WIDTH for x in chans)
    ):
        refuse("block_out_channels", f"a list of 1 to {nets.MAX_LEVELS} integers, each from 1 to {nets.MAX_WIDTH}")
    ch = chans[0]
    if any(x % ch for x in chans):
        refuse("block_out_channels", f"multiples of its first entry {ch}")
    n = len(chans)
    down, up = c["down_block_types"], c["up_block_types"]
    if not isinstance(down, list) or len(down) != n or any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in down):
        refuse("down_block_types", f"{n} entries, each DownBlock2D or AttnDownBlock2D")
    mirror = [b.replace("Down", "Up") for b in reversed(down)]
    if up != mirror:
        refuse("up_block_types", f"the mirror of down_block_types, {mirror}")
    size = c["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    # The weights do not fix the resolution (convolutions run at any size); the levels do (each halves it), and
    # the sampler allocates it: an absurd one would hang or exhaust memory at the first image.
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or not 0 < size <= nets.MAX_RESOLUTION
        or size % 2 ** (n - 1)
    ):
        refuse(
            "sample_size",
            f"a square size up to {nets.MAX_RESOLUTION} divisible by {2 ** (n - 1)} (each of its {n - 1} downsamplings halves it)",
        )
    if (
        isinstance(c["layers_per_block"], bool)
        or not isinstance(c["layers_per_block"], int)
        or not 1 <= c["layers_per_block"] <= nets.MAX_BLOCKS
    ):
        refuse("layers_per_block", f"an integer from 1 to {nets.MAX_BLOCKS}")
    if c["downsample_padding"] not in (0, 1):
        refuse("downsample_padding", "0 (pad after, as Ho et al.) or 1")
    groups = c["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1 or any(x % groups for x in chans):
        refuse("norm_num_groups", f"a divisor of every entry of block_out_channels {chans}")
    for key in ("in_channels", "out_channels"):
        if isinstance(c[key], bool) or not isinstance(c[key], int) or not 1 <= c[key] <= nets.MAX_IO_CHANNELS:
            refuse(key, f"an integer from 1 to {nets.MAX_IO_CHANNELS}")
    # Diffusers fixes the width of a head (default: the whole width, one head); ours fixes the number of heads.
    head_dim = c["attention_head_dim"]
    attn_chans = [chans[i] for i, b in enumerate(down) if b.startswith("Attn")] + [chans[-1]]
    if head_dim is None:
        heads = 1
    else:
        if (
            not isinstance(head_dim, int)
            or any(x % head_dim for x in attn_chans)
            or len({x // head_dim for x in attn_chans}) != 1
        ):
            refuse(
                "attention_head_dim",
                f"null, or a width giving the same number of heads at every attention layer (channels {attn_chans})",
            )
        heads = attn_chans[0] // head_dim
    dropout = c["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        refuse("dropout", "a number in [0, 1)")
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
        "kind": "linear",
        "T": s.get("num_train_timesteps", 1000),
        "beta_start": s.get("beta_start", 1e-4),
        "beta_end": s.get("beta_end", 0.02),
        "scale_with_T": False,
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


def _attn_weights(sd: dict, pre: str) -> dict[str, torch.Tensor]:
    """Diffusers' attention layer at `pre` as our AttnBlock's tensors; reads the current names (to_q, ...) and
    the ones of checkpoints saved before diffusers 0.15 (query, key, value, proj_attn)."""

    def take(new: str, old: str, part: str) -> torch.Tensor:
        for name in (f"{pre}.{new}.{part}", f"{pre}.{old}.{part}"):
            if name in sd:
                return sd.pop(name)
        raise UserError(f"weights lack {pre}.{new}.{part}: they do not fit their config.json")

    out = {
        "norm.weight": take("group_norm", "group_norm", "weight"),
        "norm.bias": take("group_norm", "group_norm", "bias"),
    }
    qkv = [
        (take(f"to_{x}", old, "weight"), take(f"to_{x}", old, "bias"))
        for x, old in (("q", "query"), ("k", "key"), ("v", "value"))
    ]
    out["qkv.weight"] = torch.cat([w for w, _ in qkv])[:, :, None, None]
    out["qkv.bias"] = torch.cat([b for _, b in qkv])
    out["proj.weight"] = take("to_out.0", "proj_attn", "weight")[:, :, None, None]
    out["proj.bias"] = take("to_out.0", "proj_attn", "bias")
    return out


_RES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}


def map_weights(sd: dict[str, torch.Tensor], net, model: dict) -> dict[str, torch.Tensor]:
    """Diffusers' state dict renamed onto `net`, our UNet built from `model` = unet_config(...)."""
    from diffuse.nets.layers import AttnBlock, Downsample, ResBlock, Upsample

    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def module(ours: str, mod, theirs: str) -> None:
        if isinstance(mod, ResBlock):
            for name in mod.state_dict():
                sub, _, part = name.partition(".")
                key = f"{theirs}.{_RES[sub]}.{part}"
                if key not in sd:
                    raise UserError(f"weights lack {key}: they do not fit their config.json")
                out[f"{ours}.{name}"] = sd.pop(key)
        elif isinstance(mod, AttnBlock):
            out.update({f"{ours}.{k}": v for k, v in _attn_weights(sd, theirs).items()})
        elif isinstance(mod, (Downsample, Upsample)):
            for part in ("weight", "bias"):
                key = f"{theirs}.conv.{part}"
                if key not in sd:
                    raise UserError(f"weights lack {key}: they do not fit their config.json")
                out[f"{ours}.conv.{part}"] = sd.pop(key)

    for ours, theirs in (
        ("temb.0", "time_embedding.linear_1"),
        ("temb.2", "time_embedding.linear_2"),
        ("conv_in", "conv_in"),
        ("norm_out", "conv_norm_out"),
        ("conv_out", "conv_out"),
    ):
        for part in ("weight", "bias"):
            if f"{theirs}.{part}" not in sd:
                raise UserError(f"weights lack {theirs}.{part}: they do not fit their config.json")
            out[f"{ours}.{part}"] = sd.pop(f"{theirs}.{part}")

    # Our down/up lists are flat: per level, its resnets (each with its attention, if any), then the resampler
    # (none after the last level), in diffusers' order.
    levels, n_res = len(model["ch_mult"]), model["num_res_blocks"]
    for path, blocks, per_level, resampler in (
        ("down", net.down, n_res, "downsamplers"),
        ("up", net.up, n_res + 1, "upsamplers"),
    ):
        k = 0
        for level in range(levels):
            for layer in range(per_level):
                block = blocks[k]
                module(f"{path}.{k}.0", block[0], f"{path}_blocks.{level}.resnets.{layer}")
                if len(block) > 1:
                    module(f"{path}.{k}.1", block[1], f"{path}_blocks.{level}.attentions.{layer}")
                k += 1
            if level != levels - 1:
                module(f"{path}.{k}.0", blocks[k][0], f"{path}_blocks.{level}.{resampler}.0")
                k += 1
    module("mid.0", net.mid[0], "mid_block.resnets.0")
    module("mid.1", net.mid[1], "mid_block.attentions.0")
    module("mid.2", net.mid[2], "mid_block.resnets.1")
    if sd:
        raise UserError(
            f"weights have {sorted(sd)[0]} (and {len(sd) - 1} more) that their config.json does not describe"
        )
    want = net.state_dict()
    for name, t in want.items():
        if name not in out:
            raise UserError(f"weights give nothing for {name}")
        if out[name].shape != t.shape:
            raise UserError(
                f"weights' tensor for {name} has shape {tuple(out[name].shape)}, the config asks for {tuple(t.shape)}"
            )
    return out


def check_out(out: Path) -> None:
    """out=FILE.safetensors, checked before any work: a file path whose folder exists or can be made, and can be
    written to."""
    if out.suffix != ".safetensors":
        raise UserError(f"out={str(out)!r} is not allowed: the checkpoint is a .safetensors file")
    if out.is_dir():
        raise UserError(
            f"out={str(out)!r} is a directory: give the checkpoint's file name, e.g. out={out / 'model.safetensors'}"
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"out={str(out)!r} cannot be written: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"out={str(out)!r} cannot be written: {parent} is not writable")


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file declares, as meta tensors of their shapes: its header read, no data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a malformed header
        raise UserError(
            f"{path}: not a readable safetensors file ({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})"
        ) from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or one line for a file that cannot be read as one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def mapped_weights(
    weights_path: Path, model: dict, mapping: Callable, *, where: str, keys: dict
) -> dict[str, torch.Tensor]:
    """The float32 state dict of the network `model` describes from a safetensors file of another layout, by
    mapping(tensors, net) -> our names. The mapping runs first on the file's header against the network built on
    the meta device (shapes, no storage), so that weights that do not fit, or a config describing a network too
    large to build, are refused before a tensor is read or a parameter allocated."""
    mapping(header_tensors(weights_path), nets.meta_network(model, where=where, keys=keys))
    sd = read_tensors(weights_path)
    net = nets.build_network(model, where=where, keys=keys)
    return {k: v.to(torch.float32).contiguous() for k, v in mapping(sd, net).items()}


def convert_diffusers(src: str | Path, out: str | Path) -> Path:
    """Write the diffuse checkpoint of the diffusers UNet2DModel at `src` to `out`; returns `out`."""
    out = Path(out).expanduser()
    check_out(out)
    config_path, weights_path, sched_path = find_files(src)
    dcfg = read_json(config_path)
    from diffuse.convert_autoencoder import convert_autoencoder, is_autoencoder_config

    if is_autoencoder_config(dcfg):
        return convert_autoencoder(config_path, weights_path, dcfg, src, out)
    model = unet_config(dcfg, str(config_path))
    schedule = schedule_config(sched_path)
    keys = {
        "resolution": "sample_size",
        "ch": "block_out_channels",
        "ch_mult": "block_out_channels",
        "num_res_blocks": "layers_per_block",
        "heads": "attention_head_dim",
        "groups": "norm_num_groups",
    }
    weights = mapped_weights(
        weights_path, model, lambda sd, net: map_weights(sd, net, model), where=str(config_path), keys=keys
    )
    config = {
        "model": model,
        "schedule": schedule,
        "objective": dict(OBJECTIVE),
        "data": {"is_8bit": True, "num_classes": None},
        "source": {"format": "diffusers", "path": str(Path(src).expanduser().resolve())},
    }
    # Pretrained weights are what sampling uses; there is no separate EMA copy to carry (sampling falls back to them).
    return save_checkpoint(out, Checkpoint(config=config, step=0, model=weights))
