"""What a training run refuses from its config alone, before the data is loaded or the network allocated, and the
few facts the config fixes for the whole run: the network's input and output channels, the learning rate at a step,
the objective keys a resume compares."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffuse.diffusion import consistency as cm
from diffuse.diffusion import distillation as pd
from diffuse.diffusion.masks import check_mask_kinds
from diffuse.diffusion.objectives import WEIGHTINGS
from diffuse.diffusion.prediction import PREDICTIONS
from diffuse.errors import UserError
from diffuse.nets import build_network, check_model_config
from diffuse.pipeline.model import schedule_from_config
from diffuse.pipeline.runtime import resolve_runtime
from diffuse.pipeline.sampling import plan_sampler
from diffuse.training.evaluation import check_eval_config
from diffuse.training.superres import network_io
from diffuse.training.tracking import check_logger
from diffuse.validate import check_choice, check_flag, check_number, refuse

KINDS = ("diffusion", "consistency", "edm")


def validate_trainer(t: dict) -> None:
    check_number("trainer.steps", t["steps"], minimum=1, integer=True)
    check_number("trainer.batch_size", t["batch_size"], minimum=1, integer=True)
    check_number("trainer.lr", t["lr"], minimum=0, exclusive_min=True)
    check_number("trainer.weight_decay", t["weight_decay"], minimum=0)
    check_number("trainer.warmup", t["warmup"], minimum=0, integer=True)
    check_number("trainer.grad_clip", t["grad_clip"], minimum=0)
    check_number("trainer.ema_decay", t["ema_decay"], minimum=0, maximum=1)
    for key in ("log_every", "ckpt_every"):
        check_number(f"trainer.{key}", t[key], minimum=1, integer=True)
    for key in ("sample_every", "sample_n", "keep"):
        check_number(f"trainer.{key}", t[key], minimum=0, integer=True)
    check_number("trainer.sample_steps", t["sample_steps"], minimum=1, integer=True)
    check_number("trainer.seed", t["seed"], integer=True)
    check_number("trainer.max_nonfinite", t["max_nonfinite"], minimum=1, integer=True)
    check_flag("trainer.ema_warmup", t["ema_warmup"])


def _check_flag(key: str, value) -> None:
    if value not in (True, False):
        raise refuse(f"objective.{key}", value, "it must be true or false")


def validate_objective(o: dict) -> None:
    check_choice("objective.kind", o["kind"], KINDS)
    check_choice("objective.prediction", o["prediction"], PREDICTIONS)
    if o["kind"] == "edm":
        check_edm(o)
    else:
        check_choice("objective.weighting", o["weighting"], WEIGHTINGS)
    check_number("objective.min_snr_gamma", o["min_snr_gamma"], minimum=0, exclusive_min=True)
    check_number("objective.p_uncond", o["p_uncond"], minimum=0, maximum=1)
    _check_flag("mask_training", o["mask_training"])
    if o["mask_training"]:
        check_mask_kinds(o["mask_kinds"])
    _check_flag("learn_sigma", o["learn_sigma"])
    if o["learn_sigma"]:
        if o["kind"] != "diffusion":
            raise UserError(
                f"objective.learn_sigma=true is not allowed with objective.kind={o['kind']}: learned variances "
                "(Nichol & Dhariwal 2021) are for diffusion training (objective=simple, min_snr or vlb)"
            )
        check_number("objective.vlb_weight", o["vlb_weight"], minimum=0)


def check_edm(o: dict) -> None:
    """The keys of objective=edm. Its network's target and loss weight are fixed by the preconditioning, so
    prediction and weighting only record them (x0: D predicts the clean image; edm: Karras's lambda)."""
    if o["prediction"] != "x0":
        raise UserError(
            f"objective.prediction={o['prediction']!r} is not allowed with objective.kind=edm: the "
            "preconditioned D(x; sigma) predicts x0 (its network regresses (x0 - c_skip x~) / c_out); leave it x0"
        )
    if o["weighting"] != "edm":
        raise UserError(
            f"objective.weighting={o['weighting']!r} is not allowed with objective.kind=edm: its loss weight "
            "is Karras et al.'s lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; leave it edm"
        )
    check_number("objective.sigma_data", o["sigma_data"], minimum=0, exclusive_min=True)
    check_number("objective.p_mean", o["p_mean"])
    check_number("objective.p_std", o["p_std"], minimum=0, exclusive_min=True)


def check_progressive(d: dict, steps: int) -> list[int]:
    """distill.* of progressive distillation against trainer.steps: the rounds' step counts."""
    rounds = pd.rounds(d["start_steps"], d["target_steps"])
    check_choice("distill.weighting", d["weighting"], pd.WEIGHTINGS)
    check_choice("distill.spacing", d["spacing"], pd.SPACINGS)
    if steps < len(rounds):
        raise UserError(
            f"trainer.steps={steps} is fewer than the {len(rounds)} rounds from {d['start_steps']} to "
            f"{d['target_steps']} steps: give each round at least one step"
        )
    return rounds


def check_consistency(o: dict, method: str) -> None:
    """The consistency keys of an objective config (objective=consistency, or a distillation method's)."""
    if o["mask_training"]:
        raise UserError(
            "objective.mask_training=true is for diffusion objectives: a consistency model is not trained with masks"
        )
    check_number("objective.target_decay", o["target_decay"], minimum=0, maximum=1)
    check_number("objective.sigma_data", o["sigma_data"], minimum=0, exclusive_min=True)
    check_choice("objective.loss", o["loss"], cm.LOSSES)
    check_number("objective.p_std", o["p_std"], minimum=0, exclusive_min=True)
    check_number("objective.p_mean", o["p_mean"])
    if method == "ect":
        check_number("distill.ect_delta", o["ect_delta"], minimum=0, maximum=1, exclusive_min=True)
        return
    check_choice("objective.curriculum", o["curriculum"], ("cd", "ict"))
    for key in ("levels_start", "levels_end"):
        check_number(f"objective.{key}", o[key], minimum=2, integer=True)
    if o["levels_end"] < o["levels_start"]:
        raise UserError(
            f"objective.levels_end={o['levels_end']} is not allowed: at least levels_start={o['levels_start']}"
        )


def output_channels(o: dict, channels: int) -> int | None:
    """The network's output channels when they are not its input's: the image's C beside a mask-conditioned input
    (2C + 1), doubled with learned variances (objective.learn_sigma)."""
    if o["learn_sigma"]:
        return 2 * channels
    return channels if o["mask_training"] else None


def network_config(model: dict, o: dict, channels: int, resolution: int, superres: bool) -> dict:
    """The model group sized for the data it reads: mask training adds the masked image and the mask (C + 1), a
    super-resolution model the upsampled low-resolution image (and its augmentation level's embedding)."""
    net = {**model, "resolution": resolution, "in_channels": channels}
    if o["mask_training"]:
        net.update(in_channels=2 * channels + 1)
    if superres:
        net.update(network_io(channels))
    if output_channels(o, channels) is not None:
        net.update(out_channels=output_channels(o, channels))
    return net


def check_classes(model: dict, dataset: str, classes: int | None) -> None:
    k = model.get("num_classes")  # autoencoders have no such key
    if k and (not classes or classes > k):
        raise UserError(f"model.num_classes={k} does not fit dataset={dataset!r}, which has {classes or 'no'} classes")


def superres_of(cfg: dict, resolution: int):
    """condition=lowres of a training config, checked: its LowResTraining, or None."""
    from diffuse.training.superres import LowResTraining, lowres_condition

    # before the condition's keys: with an autoencoder, `resolution` is the latent side, which the user never typed
    c = cfg.get("condition")  # only diffuse train has the group
    if isinstance(c, dict) and c.get("name") not in (None, "none") and cfg.get("autoencoder"):
        raise UserError(
            "condition=lowres with autoencoder= is not supported: super-resolution models are trained on pixels"
        )
    cond = lowres_condition(c, cfg["model"], cfg["objective"], resolution)
    return LowResTraining(cond) if cond is not None else None


def check_latent_cache(value) -> None:
    """latent_cache=DIR: a folder, or one that can be made; checked before any work (the encoding makes it)."""
    if value in (None, ""):
        return
    p = Path(str(value)).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(
            f"latent_cache={str(value)!r} is not allowed: it is a file; give a folder for the encoded dataset"
        )
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"latent_cache={str(value)!r} cannot be written: {parent} is not a writable folder")


def objective_key(o) -> dict:
    """An objective config as resume compares it: checkpoints from before mask training lack its keys, and
    mask_kinds only matter when mask_training is on."""
    o = dict(o or {})
    if o.get("kind", "diffusion") == "diffusion":  # checkpoints from before consistency models lack the key
        o.pop("kind", None)
    if not o.get("mask_training"):
        o["mask_training"] = False
        o.pop("mask_kinds", None)
    if not o.get("learn_sigma"):  # checkpoints from before learned variances lack the keys
        o.pop("learn_sigma", None)
        o.pop("vlb_weight", None)
    return o


def check_resumable(path: Path, then: dict, now: dict, schedule) -> None:
    """What a resume refuses: a checkpoint's config (`then`) that describes another run than this one's record
    (`now`, with its `schedule`)."""
    if then.get("model") != now["model"]:
        raise UserError(
            f"cannot resume from {path}: it was trained with model {then.get('model')}, this run has {now['model']}"
        )
    # The schedule is compared by what it is (its betas): a key added to the config since is not a difference.
    same_schedule = torch.equal(schedule_from_config(then.get("schedule")).betas, schedule.betas)
    if not same_schedule or objective_key(then.get("objective")) != objective_key(now["objective"]):
        raise UserError(f"cannot resume from {path}: its schedule or objective differs from this run's")
    if then.get("condition") != now.get("condition"):
        raise UserError(
            f"cannot resume from {path}: it was trained with condition {then.get('condition')}, "
            f"this run has {now.get('condition')}"
        )
    ae_then, ae_now = (
        (then.get("autoencoder") or {}).get("hash"),
        (now.get("autoencoder") or {}).get("hash"),
    )
    if ae_then != ae_now:
        raise UserError(
            f"cannot resume from {path}: it was trained on the latents of autoencoder {ae_then and ae_then[:12]}, "
            f"this run on those of {ae_now and ae_now[:12]}"
        )
    check_same_run(path, then, now)


# What names a dataset, as resume compares it (keys added to a dataset's config since are no difference).
DATASET_IDENTITY = ("name", "path", "root", "split", "resolution", "channels", "num_classes", "seed")


def check_same_run(path: Path, then: dict, now: dict) -> None:
    """The run a checkpoint continues: plain training or a distillation, of the same method and teacher (a
    checkpoint's by its weights' hash), on the same data (issue 27, part 1)."""
    d_then, d_now = then.get("distill") or {}, now.get("distill") or {}
    if bool(d_then) != bool(d_now):
        kinds = ("a distillation (diffuse distill)", "plain training (diffuse train)")
        was, this = kinds if d_then else kinds[::-1]
        raise UserError(f"cannot resume from {path}: it is {was}, this run is {this}")

    def teacher(d: dict):
        t = d.get("teacher")
        return t.get("sha256") if isinstance(t, dict) else t

    if d_then and (d_then.get("method"), teacher(d_then)) != (d_now.get("method"), teacher(d_now)):
        raise UserError(
            f"cannot resume from {path}: it distils teacher {d_then.get('teacher')!r} by {d_then.get('method')}, "
            f"this run teacher {d_now.get('teacher')!r} by {d_now.get('method')}"
        )
    ds_then, ds_now = then.get("dataset"), now.get("dataset")
    if isinstance(ds_then, dict) and isinstance(ds_now, dict):
        differ = [k for k in DATASET_IDENTITY if k in ds_then and k in ds_now and ds_then[k] != ds_now[k]]
        if differ:
            k = differ[0]
            raise UserError(
                f"cannot resume from {path}: it was trained on dataset.{k}={ds_then[k]!r}, this run has {ds_now[k]!r}"
            )


def learning_rate(t: dict, step: int) -> float:
    """trainer.lr at `step` (counted from 0), after a linear warmup over trainer.warmup steps."""
    warm = t["warmup"]
    return t["lr"] * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)


def check_config(cfg: dict):
    """What a training run refuses from its config alone, without loading the data or allocating the network (it is
    sized on the meta device at the dataset's shape): (runtime, schedule). Trainer runs it first; a -m sweep runs
    it for every job before the first starts (tasks/train.py check)."""
    from diffuse.data import DATASETS, dataset_shape

    t, o = cfg["trainer"], cfg["objective"]
    validate_trainer(t)
    validate_objective(o)
    check_logger(cfg.get("logger"))  # the logger and metrics groups are diffuse train's
    check_eval_config(t, cfg.get("metrics"))
    rt = resolve_runtime(cfg["runtime"])
    schedule = schedule_from_config(cfg["schedule"])
    model, data = cfg["model"], cfg["dataset"]
    if model["arch"] == "oracle":
        raise UserError(
            "model=oracle is the exact mixture denoiser: there is nothing to train (use it with diffuse sample)"
        )
    check_model_config(model)
    if data["name"] not in DATASETS:
        raise UserError(f"dataset={data['name']!r} is not allowed: choose one of {', '.join(sorted(DATASETS))}")
    channels, resolution, classes = dataset_shape(data)
    if cfg.get("autoencoder"):  # latent diffusion (diffuse train only): the network is sized for the latents
        from diffuse.pipeline.latent import check_latent_config

        channels, resolution = check_latent_config(cfg, channels, resolution)
        check_latent_cache(cfg["latent_cache"])
    if t["sample_steps"] > schedule.T:
        raise UserError(f"trainer.sample_steps={t['sample_steps']} is not allowed: at most schedule.T={schedule.T}")
    plan_sampler(cfg["sampler"], t["sample_steps"], schedule, data["name"] != "gmm")
    check_classes(model, data["name"], classes)
    _check_network(cfg, channels, resolution)
    return rt, schedule


def _check_network(cfg: dict, channels: int, resolution: int) -> None:
    """The network of the run, built on the meta device: its config refused before anything is allocated."""
    net = network_config(cfg["model"], cfg["objective"], channels, resolution, superres_of(cfg, resolution) is not None)
    try:
        with torch.device("meta"):
            build_network(net)
    except UserError as e:
        if not cfg.get("autoencoder"):
            raise
        # the network's resolution is the latents' side, not the dataset.resolution the user typed
        msg = str(e).replace(f"dataset.resolution={resolution} ", f"the latent side {resolution} ")
        raise UserError(
            f"with autoencoder= the network sees {resolution}x{resolution} latents of dataset.resolution="
            f"{cfg['dataset']['resolution']}: {msg}"
        ) from None
