"""The classifier of classifier guidance (`guidance.classifier=`): a diffuse train-classifier checkpoint, or the
mixture's exact one for model=oracle, as grad(x_t, t, y) = grad_x log p(y | x_t) at the model's timesteps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffuse.checkpoint import Checkpoint, check_weights, load_checkpoint, resolve_ckpt_path
from diffuse.diffusion.classifier import log_prob_grad
from diffuse.diffusion.schedule import Schedule
from diffuse.errors import UserError
from diffuse.pipeline.model import Model, schedule_from_config


@dataclass(frozen=True)
class TrainedClassifier:
    """A train-classifier checkpoint's network (EMA weights unless asked otherwise) and what it was trained with."""

    net: nn.Module
    schedule: Schedule
    config: dict
    path: Path
    step: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.resolution, self.net.resolution)


def is_classifier_config(conf: Any) -> bool:
    return isinstance(conf, dict) and isinstance(conf.get("model"), dict) and conf["model"].get("arch") == "classifier"


def classifier_network(ckpt: Checkpoint, path: Path, key: str, use_ema: bool = True) -> TrainedClassifier:
    """The classifier a checkpoint holds, or one line naming `key`=path when it holds something else. Its config is
    user input: built through the allow-list, sized on the meta device and its weights' shapes checked first."""
    from diffuse.nets import build_network

    conf = ckpt.config
    if not is_classifier_config(conf) or "schedule" not in conf:
        arch = (
            (conf.get("model") or {}).get("arch")
            if isinstance(conf, dict) and isinstance(conf.get("model"), dict)
            else None
        )
        what = f"a {arch} denoiser" if arch else "no classifier"
        raise UserError(
            f"{key}={path} is not a classifier checkpoint (it holds {what}): train one with diffuse train-classifier"
        )
    schedule = schedule_from_config(conf["schedule"], where=str(path))
    weights = ckpt.ema if (use_ema and ckpt.ema) else ckpt.model
    check_weights(weights, str(path), "ema." if weights is ckpt.ema else "model.")
    net = build_network(conf["model"], where=str(path), keys={}, weights=weights)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit its model config: {str(e).strip().splitlines()[0]}") from None
    return TrainedClassifier(net.eval().requires_grad_(False), schedule, conf, path, ckpt.step)


def load_classifier_checkpoint(value: Any, key: str, *, use_ema: bool = True, verify: bool = True) -> TrainedClassifier:
    path = resolve_ckpt_path(value, key=key)
    return classifier_network(load_checkpoint(path, verify=verify), path, key, use_ema)


class NetworkGrad:
    """A trained classifier as grad(x_t, t, y). Its schedule may differ from the model's: t is then mapped to the
    classifier's (fractional) timestep of the same noise level, which is what it was trained to read. It runs in
    float32 on the device of the images it is given (moved there at the first call)."""

    def __init__(self, tc: TrainedClassifier, model_schedule: Schedule):
        self.net, self.schedule, self.model_schedule = tc.net, tc.schedule, model_schedule
        self.same_schedule = torch.equal(tc.schedule.betas, model_schedule.betas)

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.same_schedule:
            return t
        ab = self.model_schedule.alpha_bar_at(t.cpu())
        return self.schedule.t_from_sigma(((1 - ab) / ab).sqrt()).to(t.device)

    def logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if next(self.net.parameters()).device != x.device:
            self.net = self.net.to(x.device)
        return self.net(x, t)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return log_prob_grad(self.logits, x_t, self.timesteps(t), y)


@dataclass(frozen=True)
class GuideClassifier:
    grad: Callable  # (x_t, t, y) -> grad_x log p(y | x_t), t the model's timesteps
    num_classes: int
    source: dict  # what the outputs record: {"classifier": "oracle"} or the checkpoint, its step and hash state


def load_guide_classifier(value: Any, model: Model, *, use_ema: bool = True, verify: bool = True) -> GuideClassifier:
    """guidance.classifier= for `model`: `oracle` (model=oracle only), or a train-classifier checkpoint (file or run
    dir) of the model's image shape and, for a class-conditional model, its classes."""
    if value in (None, ""):
        raise UserError(
            "guidance=classifier needs guidance.classifier=FILE|RUN_DIR (a diffuse train-classifier checkpoint), "
            "or guidance.classifier=oracle with model=oracle"
        )
    if str(value) == "oracle":
        from diffuse.diffusion.oracle import GMMClassifier

        mixture = getattr(model.denoiser, "mixture", None)
        if not model.is_oracle or mixture is None:
            raise UserError(
                f"guidance.classifier=oracle is the exact classifier of the mixture of model=oracle dataset=gmm; "
                f"this model is {model.source.get('ckpt', 'not the oracle')}: give a train-classifier checkpoint"
            )
        return GuideClassifier(GMMClassifier(mixture, model.schedule).grad, mixture.K, {"classifier": "oracle"})
    tc = load_classifier_checkpoint(value, "guidance.classifier", use_ema=use_ema, verify=verify)
    if tc.shape != tuple(model.shape):
        raise UserError(
            f"guidance.classifier={value}: it classifies images of {'x'.join(map(str, tc.shape))}, the model makes "
            f"{'x'.join(map(str, model.shape))}"
        )
    k = tc.net.num_classes
    if model.num_classes and k != model.num_classes:
        raise UserError(
            f"guidance.classifier={value}: it has {k} classes, the class-conditional model {model.num_classes}; "
            "they must be the same classes"
        )
    return GuideClassifier(NetworkGrad(tc, model.schedule), k, {"classifier": str(tc.path), "classifier_step": tc.step})
