"""A checkpoint, or the exact mixture oracle, as a denoiser with what it takes to sample it (`Model`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from diffuse.checkpoint import Checkpoint, load_checkpoint, resolve_ckpt_path
from diffuse.diffusion.prediction import NetworkDenoiser
from diffuse.diffusion.schedule import Schedule, make_schedule
from diffuse.errors import UserError
from diffuse.pipeline.runtime import Runtime, inference_network

SCHEDULE_KEYS = {"T", "beta_start", "beta_end", "cosine_s", "sigmoid_start", "sigmoid_end", "sigmoid_tau", "max_beta", "scale_with_T"}


@dataclass(frozen=True)
class Model:
    """What every command samples from: `denoiser(x_t, t, y) -> eps` under `schedule`, for images of `shape`."""

    denoiser: Callable
    schedule: Schedule
    shape: tuple[int, int, int]  # C, H, W
    num_classes: Optional[int]  # class-conditional: labels 0..K-1, and K the null label of guidance
    clip_x0: bool  # the samplers' default clipping of x0 to [-1, 1]: on for 8-bit image data
    source: dict  # {"model": "oracle"}, or {"ckpt": path, "step": n}: recorded beside what it makes
    tuned: dict = dataclasses.field(default_factory=dict)  # noise-level schedules tuned for it, "sampler/steps" -> levels

    @property
    def is_oracle(self) -> bool:
        return self.source.get("model") == "oracle"

    def with_denoiser(self, denoiser: Callable) -> "Model":
        return dataclasses.replace(self, denoiser=denoiser)


@dataclass(frozen=True)
class TrainedNetwork:
    """A diffuse checkpoint's network (EMA weights unless asked otherwise) and what it was trained with."""

    net: nn.Module
    schedule: Schedule
    prediction: str
    config: dict

    @property
    def is_8bit(self) -> bool:
        return bool((self.config.get("data") or {}).get("is_8bit", True))

    @property
    def mask_conditioned(self) -> bool:
        return bool((self.config.get("objective") or {}).get("mask_training"))


def schedule_from_config(cfg: Optional[dict]) -> Schedule:
    """A Schedule from a `schedule` config (or a checkpoint's copy of one): unknown keys and non-numbers are refused."""
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", None)
    unknown = sorted(set(cfg) - SCHEDULE_KEYS)
    if unknown:
        raise UserError(f"schedule.{unknown[0]} is not a schedule option: allowed are kind, {', '.join(sorted(SCHEDULE_KEYS))}")
    for key, val in cfg.items():
        if key == "scale_with_T":
            if not isinstance(val, bool):
                raise UserError(f"schedule.scale_with_T={val!r} is not allowed: true or false")
        elif key != "T" and (isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val)):
            raise UserError(f"schedule.{key}={val!r} is not allowed: it must be a finite number")
    return make_schedule(kind, **cfg)


def network_from_checkpoint(ckpt: Checkpoint, use_ema: bool = True) -> TrainedNetwork:
    from diffuse.nets import build_network

    conf = ckpt.config
    if not isinstance(conf, dict) or "model" not in conf or "schedule" not in conf:
        raise UserError("checkpoint config lacks model/schedule: not a diffuse training checkpoint")
    net = build_network(conf["model"])
    weights = ckpt.ema if (use_ema and ckpt.ema) else ckpt.model
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint weights do not fit its model config: {first}") from None
    prediction = (conf.get("objective") or {}).get("prediction", "eps")
    return TrainedNetwork(net, schedule_from_config(conf["schedule"]), prediction, conf)


def load_model(*, ckpt: Any, model: Optional[dict], dataset: Optional[dict], schedule: Optional[dict], use_ema: bool,
               runtime: Runtime) -> Model:
    """`ckpt=` (a file or training run dir), or `model=oracle` with its mixture (`dataset`) and `schedule`."""
    if ckpt in (None, ""):
        if not model:
            raise UserError("ckpt= is required: a .safetensors checkpoint or a training run dir (or model=oracle for the exact mixture)")
        if model.get("arch") != "oracle":
            raise UserError(f"model={model.get('arch')!r} without ckpt=: only model=oracle samples without a checkpoint")
        return oracle_model(dataset, schedule)
    if model:
        raise UserError(f"ckpt= and model={model.get('arch')!r} cannot both be given: a checkpoint carries its own model")
    if schedule:
        raise UserError("schedule= cannot be changed when sampling a checkpoint: it is the one the model was trained with")
    path = resolve_ckpt_path(ckpt)
    loaded = load_checkpoint(path)
    tn = network_from_checkpoint(loaded, use_ema=use_ema)
    runner = inference_network(tn.net, runtime)
    if tn.mask_conditioned:
        from diffuse.diffusion.inpainting import MaskConditioned

        # A mask-conditioned network: told that nothing is known it samples; inpaint gives it the known pixels.
        runner = MaskConditioned(runner)
    den = NetworkDenoiser(runner, tn.prediction, tn.schedule, autocast_dtype=runtime.autocast)
    return Model(den, tn.schedule, (tn.net.out_channels, tn.net.resolution, tn.net.resolution), tn.net.num_classes,
                 tn.is_8bit, {"ckpt": str(path), "step": loaded.step}, loaded.tuned)


def oracle_model(dataset: Optional[dict], schedule: Optional[dict]) -> Model:
    """The exact denoiser of the Gaussian mixture `dataset` (dataset=gmm) under `schedule`."""
    from diffuse.data import build_mixture
    from diffuse.diffusion.oracle import GMMDenoiser

    if not dataset or dataset.get("name") != "gmm":
        raise UserError(f"model=oracle needs dataset=gmm (got dataset={(dataset or {}).get('name')!r})")
    sched = schedule_from_config(schedule)
    mixture = build_mixture(dataset)
    return Model(GMMDenoiser(mixture, sched), sched, tuple(mixture.shape), mixture.K, False, {"model": "oracle"})
