"""Export a diffuse checkpoint as a diffusers pipeline folder: the inverse of diffuse/interop/diffusers_unet.py.

    diffuse export --to diffusers --ckpt FILE|RUN_DIR --out DIR [--no-ema]

DIR gets what `DDPMPipeline.from_pretrained(DIR)` reads: model_index.json, unet/config.json +
unet/diffusion_pytorch_model.safetensors (a UNet2DModel) and scheduler/scheduler_config.json (a DDPMScheduler that
DDIMScheduler.from_config also takes). The scheduler carries our betas (linear and cosine by name when diffusers'
formula gives the same betas, any other schedule as trained_betas), the prediction type and our samplers' default
clipping, so a diffusers scheduler steps through the same alpha_bar as ours.

What diffusers cannot express is refused with one line before anything is written: a DiT backbone, EDM
preconditioning or a consistency model's parameterisation (both wrap the network in sigma-dependent scalings no
diffusers UNet2DModel config can hold), mask- or low-resolution-conditioned inputs, a latent model (its
autoencoder is not part of a DDPMPipeline), and attention whose head width changes between layers (diffusers
fixes the width of a head, we fix their number). A class-conditional U-Net exports with num_class_embeds = K + 1:
its last label is the null label classifier-free guidance uses. Learned variances (objective.learn_sigma) export
as UNet2DModel's 2C output channels and the scheduler's variance_type=learned_range, which DDPMScheduler reads
(DDIMScheduler, which has no variance to learn, takes the first C channels).
diffusers is not imported: the files are written the way it reads them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffuse.errors import UserError
from diffuse.interop.diffusers_unet import RESNET, TOP, unet_layout
from diffuse.interop.weights import WEIGHTS, missing_parents
from diffuse.io import ENVIRONMENT_ERRNOS, os_error_of

# The version whose file layout and config keys this module writes (the one tests/unit/interop/test_export.py loads it with).
DIFFUSERS_VERSION = "0.42.1"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# The U-Net options UNet2DModel has a setting for.
MAPPED = {
    "resolution",
    "in_channels",
    "out_channels",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "num_classes",
    "heads",
    "groups",
    "downsample_pad",
}
# diffusers' squaredcos_cap_v2 is Nichol & Dhariwal's cosine with s fixed at 0.008 and betas capped at 0.999.
DIFFUSERS_COSINE_S, DIFFUSERS_MAX_BETA = 0.008, 0.999


def refuse(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what}, which a diffusers UNet2DModel pipeline cannot express: it is not exported")


def unet2d_config(model: dict, where: str, learn_sigma: bool = False) -> dict:
    """The UNet2DModel config.json of our U-Net config (as nets.build_network takes it); `learn_sigma`: its
    output is C mean channels and C variance channels."""
    m = _unet_arguments(model, where, learn_sigma)
    ch, mult, res = m["ch"], list(m["ch_mult"]), m["resolution"]
    chans = [ch * k for k in mult]
    attn_levels = [i for i in range(len(mult)) if res // 2**i in set(m["attn_resolutions"])]
    down = ["AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(len(mult))]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": res,
        "in_channels": m["in_channels"],
        "out_channels": m["out_channels"] or m["in_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "block_out_channels": chans,
        "layers_per_block": m["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 0 if m["downsample_pad"] == "end" else 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(m["dropout"]),
        "act_fn": "silu",
        # the middle block always attends
        "attention_head_dim": _head_dim(m["heads"], [chans[i] for i in attn_levels] + [chans[-1]], where),
        "norm_num_groups": m["groups"],
        "attn_norm_num_groups": None,
        "norm_eps": 1e-6,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": m["num_classes"] + 1 if m["num_classes"] else None,
    }


def _unet_arguments(model: dict, where: str, learn_sigma: bool) -> dict:
    """Every argument of our U-Net for `model` (defaults filled in), or one line for what UNet2DModel lacks."""
    import inspect

    from diffuse.nets.unet import UNet

    if model.get("arch") != "unet":
        raise refuse(
            where, f"model.arch={model.get('arch')!r} (only the U-Net, model.arch=unet, has a diffusers counterpart)"
        )
    defaults = {k: p.default for k, p in inspect.signature(UNet).parameters.items()}
    m = {**defaults, **{k: v for k, v in model.items() if k != "arch"}}
    unknown = sorted(set(m) - set(defaults))
    if unknown:
        raise refuse(where, f"model.{unknown[0]} is set")
    # Options of our U-Net beyond the ones mapped here (e.g. a super-resolution model's augmentation embedding)
    # are refused unless they hold their default, whatever later versions add.
    extra = sorted(k for k in m if k not in MAPPED and m[k] != defaults[k])
    if extra:
        raise refuse(where, f"model.{extra[0]}={m[extra[0]]!r}")
    in_ch, out_ch = m["in_channels"], m["out_channels"] or m["in_channels"]
    if out_ch != (2 * in_ch if learn_sigma else in_ch):
        raise refuse(where, f"the network outputs {out_ch} channels for {in_ch} input channels (a conditioning input)")
    return m


def _head_dim(heads: int, attn_widths: list[int], where: str) -> int | None:
    """Diffusers fixes the width of a head where we fix their number: one width must fit every attention layer."""
    if heads == 1:
        return None  # diffusers' null: one head as wide as its layer, at every layer
    if len({w // heads for w in attn_widths}) == 1 and all(w % heads == 0 for w in attn_widths):
        return attn_widths[0] // heads
    raise refuse(
        where, f"model.heads={heads} gives heads of different widths at attention layers of {attn_widths} channels"
    )


def scheduler_config(
    schedule: dict, betas: torch.Tensor, prediction: str, clip: bool, learn_sigma: bool = False
) -> dict:
    """A DDPMScheduler config whose betas are ours: by name where diffusers' formula is ours, else listed.
    Learned variances are diffusers' learned_range: the same interpolation of log beta and log beta-tilde
    (Nichol & Dhariwal eq. 15) on the respaced process; the two differ only in the clipping of beta-tilde at
    t = 0, a step that adds no noise in either."""
    cfg: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(betas.shape[0]),
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "trained_betas": None,
        "variance_type": "learned_range" if learn_sigma else "fixed_small",
        "clip_sample": bool(clip),
        "clip_sample_range": 1.0,
        "prediction_type": PREDICTION_TYPES[prediction],
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        # DDIMScheduler reads this from the same file: its last step goes to alpha_bar = 1, as our samplers' does.
        "set_alpha_to_one": True,
    }
    kind, T = schedule.get("kind", "linear"), int(betas.shape[0])
    scaled = schedule.get("scale_with_T", True) and T != 1000
    if (
        kind == "linear"
        and not scaled
        and max(schedule.get("beta_start", 1e-4), schedule.get("beta_end", 0.02)) <= schedule.get("max_beta", 0.999)
    ):
        cfg.update(beta_start=float(schedule.get("beta_start", 1e-4)), beta_end=float(schedule.get("beta_end", 0.02)))
    elif (
        kind == "cosine"
        and math.isclose(schedule.get("cosine_s", 0.008), DIFFUSERS_COSINE_S, rel_tol=0, abs_tol=1e-12)
        and math.isclose(schedule.get("max_beta", 0.999), DIFFUSERS_MAX_BETA, rel_tol=0, abs_tol=1e-12)
    ):
        cfg["beta_schedule"] = "squaredcos_cap_v2"
    else:
        # diffusers keeps trained_betas as float32, as it keeps its own; the float64 values are what we list.
        cfg.update(beta_schedule="linear", trained_betas=[float(b) for b in betas.tolist()])
    return cfg


def diffusers_weights(sd: dict[str, torch.Tensor], net) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict under diffusers' UNet2DModel names (diffusers_unet.map_weights read backwards)."""
    from diffuse.nets.layers import AttnBlock, ResBlock

    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        return sd[name].detach().to(torch.float32).contiguous()

    for ours, theirs in TOP:
        for part in ("weight", "bias"):
            out[f"{theirs}.{part}"] = take(f"{ours}.{part}")
    if net.label_emb is not None:
        out["class_embedding.weight"] = take("label_emb.weight")
    for ours, mod, theirs in unet_layout(net):
        if isinstance(mod, ResBlock):
            for name in mod.state_dict():
                sub, _, part = name.partition(".")
                out[f"{theirs}.{RESNET[sub]}.{part}"] = take(f"{ours}.{name}")
        elif isinstance(mod, AttnBlock):
            out[f"{theirs}.group_norm.weight"] = take(f"{ours}.norm.weight")
            out[f"{theirs}.group_norm.bias"] = take(f"{ours}.norm.bias")
            w, b = take(f"{ours}.qkv.weight")[:, :, 0, 0], take(f"{ours}.qkv.bias")
            for x, wx, bx in zip("qkv", w.chunk(3), b.chunk(3)):
                out[f"{theirs}.to_{x}.weight"], out[f"{theirs}.to_{x}.bias"] = wx.contiguous(), bx.contiguous()
            out[f"{theirs}.to_out.0.weight"] = take(f"{ours}.proj.weight")[:, :, 0, 0].contiguous()
            out[f"{theirs}.to_out.0.bias"] = take(f"{ours}.proj.bias")
        else:  # a resampler
            for part in ("weight", "bias"):
                out[f"{theirs}.conv.{part}"] = take(f"{ours}.conv.{part}")
    return out


def check_out_dir(out: Path) -> None:
    """--out DIR: a folder that does not exist yet or is empty, in a writable place; checked before any work."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"--out={str(out)!r} is not allowed: it exists and is not an empty folder "
            "(give a new folder for the pipeline)"
        )
    _, parent = missing_parents(out)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out={str(out)!r} cannot be written: {parent} is not a writable folder")


def check_exportable(conf: Any, where: str) -> None:
    """One line for a model a DDPMPipeline cannot run. `conf` is complete
    (checkpoint.complete_config); an objective that is not a mapping is network_from_checkpoint's to refuse."""
    if isinstance(conf.get("model"), dict) and conf["model"].get("arch") == "classifier":
        raise refuse(where, "it is a noise-aware classifier, not a diffusion model")
    objective = conf["objective"] if isinstance(conf["objective"], dict) else {}
    kind = objective.get("kind")
    if kind == "edm":
        raise refuse(where, "objective.kind=edm (EDM preconditioning scales the network's input and output by sigma)")
    if kind == "consistency":
        raise refuse(where, "objective.kind=consistency (a consistency model's skip/out scalings of sigma)")
    if objective.get("mask_training"):
        raise refuse(where, "objective.mask_training=true (the network also takes the known pixels and the mask)")
    for key in ("autoencoder", "condition"):
        if conf.get(key) not in (None, {}, False):
            raise refuse(
                where,
                f"its config has {key} "
                "(a latent or super-resolution model: the network does not make images by itself)",
            )


def _check_norm_groups(net, model: dict, where: str) -> None:
    """Our GroupNorm falls back to gcd(groups, width) on a width that `groups` does not divide; diffusers' U-Net
    uses norm_num_groups everywhere and would refuse to build (or normalise otherwise)."""
    groups = model.get("groups", 32)
    odd = next((g for g in net.modules() if isinstance(g, torch.nn.GroupNorm) and g.num_groups != groups), None)
    if odd is not None:
        raise refuse(
            where,
            f"a {odd.num_channels}-channel layer (model.ch={model.get('ch')}) that {groups} norm "
            f"groups do not divide, normalised here in {odd.num_groups} (diffusers uses norm_num_groups={groups} "
            "at every layer)",
        )


def export_diffusers(ckpt: str | Path, out: str | Path, *, use_ema: bool = True) -> Path:
    """Write the diffusers pipeline folder of the diffuse checkpoint `ckpt` (a file or a training run dir) to
    `out`; returns `out`."""
    from diffuse.checkpoint import complete_config, load_checkpoint, resolve_ckpt_path
    from diffuse.pipeline.model import network_from_checkpoint

    out = Path(out).expanduser()
    check_out_dir(out)
    path = resolve_ckpt_path(ckpt, key="--ckpt")
    where = str(path)
    loaded = load_checkpoint(path)
    conf = complete_config(loaded.config)
    check_exportable(conf, where)
    tn = network_from_checkpoint(loaded, use_ema=use_ema, where=where)
    _check_norm_groups(tn.net, conf["model"], where)
    learn_sigma = tn.learn_sigma
    unet_cfg = unet2d_config(conf["model"], where, learn_sigma)
    sched_cfg = scheduler_config(
        conf["schedule"], tn.schedule.betas, tn.prediction, clip=tn.is_8bit, learn_sigma=learn_sigma
    )
    weights = diffusers_weights(tn.net.state_dict(), tn.net)
    meta = {
        "format": "pt",
        "diffuse.source": json.dumps(
            {"ckpt": str(path.resolve()), "step": loaded.step, "ema": bool(use_ema and loaded.ema)}
        ),
    }
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    configs = {"unet/config.json": unet_cfg, "scheduler/scheduler_config.json": sched_cfg, "model_index.json": index}
    return write_pipeline(out, configs, weights, meta)


def write_pipeline(out: Path, configs: dict[str, dict], weights: dict[str, torch.Tensor], meta: dict) -> Path:
    """The folder `out`: unet/ with `weights` (and `meta`), each of `configs` as JSON under its path. Everything
    is written into a temporary folder beside `out` and renamed at the end; a failed write or a signal leaves
    neither it nor the parents made for it behind."""
    from safetensors.torch import save_file

    made, _ = missing_parents(out)  # innermost first
    tmp = None
    try:
        for d in reversed(made):
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        for name, config in configs.items():
            (tmp / name).write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / "unet" / WEIGHTS), metadata=meta)
        if out.is_dir():
            out.rmdir()  # empty, as check_out_dir made sure
        os.replace(tmp, out)
    except Exception as e:
        err = os_error_of(e)  # safetensors' own error for a full disk wraps the OSError
        if not isinstance(e, OSError) and err.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise UserError(f"--out={str(out)!r} cannot be written: {err.strerror or e}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not out.is_dir():
            for d in made:
                if d.is_dir():
                    try:
                        d.rmdir()
                    except OSError:
                        break
    return out
