"""Class labels of the images to draw, and guidance around a model's denoiser: classifier-free, classifier, or both."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffuse.diffusion.guidance import CLASSIFIER_MODES, cfg_denoiser, check_guidance, classifier_guided
from diffuse.errors import UserError
from diffuse.pipeline.model import Model
from diffuse.validate import check_flag

GUIDANCE = ("cfg", "classifier", "none")
# The most images one command draws. 200 times the 50000 of a standard FID; every command holds a label per
# image (80 MB of them here) and the images or their features, so far beyond this it would fail partway, after
# hours, on an allocation (n = 10^12 labels alone would be 8 TB).
MAX_IMAGES = 10_000_000


@dataclass(frozen=True)
class Guidance:
    """The `guidance` group, checked once. cfg: eps_null + scale (eps_cond - eps_null) within `interval`.
    classifier: the same with cfg_scale (a class-conditional model), minus sqrt(1 - alpha_bar) scale grad log p(y | x_t)
    of `classifier` (loaded into `loaded` by attach_classifier, with the ancestral mean's factors for mode=mean)."""

    name: str = "none"
    scale: float = 1.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    cfg_scale: float = 1.0
    classifier: str | None = None
    mode: str = "eps"
    classifier_ema: bool = True
    loaded: Any = field(default=None, compare=False, repr=False)  # pipeline.classifier.GuideClassifier
    mean_factors: dict | None = field(default=None, compare=False, repr=False)

    @property
    def free_scale(self) -> float:
        """The classifier-free scale."""
        return self.cfg_scale if self.name == "classifier" else self.scale

    @property
    def unguided(self) -> bool:
        if self.name == "classifier":
            return self.scale == 0.0 and self.cfg_scale == 1.0
        return self.scale == 1.0


def parse_guidance(g: dict | None) -> Guidance:
    if not g:
        return Guidance()
    if g["name"] not in GUIDANCE:
        raise UserError(f"guidance={g['name']!r} is not allowed: choose one of {', '.join(GUIDANCE)}")
    check_guidance(g["scale"], g["interval"], g["rescale"])
    interval = tuple(g["interval"]) if g["interval"] is not None else None
    if g["name"] != "classifier":
        return Guidance(g["name"], float(g["scale"]), interval, float(g["rescale"]))
    try:
        check_guidance(g["cfg_scale"])
    except UserError:
        raise UserError(
            f"guidance.cfg_scale={g['cfg_scale']!r} is not allowed: it must be a finite number >= 0"
        ) from None
    if g["mode"] not in CLASSIFIER_MODES:
        raise UserError(f"guidance.mode={g['mode']!r} is not allowed: choose one of {', '.join(CLASSIFIER_MODES)}")
    check_flag("guidance.use_ema", g["use_ema"])
    if g["classifier"] in (None, ""):
        raise UserError(
            "guidance=classifier needs guidance.classifier=FILE|RUN_DIR (a diffuse train-classifier checkpoint), "
            "or guidance.classifier=oracle with model=oracle"
        )
    return Guidance(
        "classifier",
        float(g["scale"]),
        interval,
        float(g["rescale"]),
        float(g["cfg_scale"]),
        str(g["classifier"]),
        g["mode"],
        g["use_ema"],
    )


def attach_classifier(guidance: Guidance, model: Model, plan, verify: bool = True) -> Guidance:
    """guidance=classifier with its classifier loaded for `model` and, for mode=mean, the mean shifts of `plan`'s
    ancestral steps; any other guidance as it is."""
    import dataclasses

    from diffuse.diffusion.guidance import mean_shift_factors
    from diffuse.pipeline.classifier import load_guide_classifier

    if guidance.name != "classifier":
        return guidance
    if not model.num_classes and guidance.cfg_scale != 1.0:
        raise UserError(
            f"guidance.cfg_scale={guidance.cfg_scale:g} needs a class-conditional model (model.num_classes); "
            "this one is unconditional: the label steers the classifier only"
        )
    factors = None
    if guidance.mode == "mean":
        if plan.name != "ddpm":
            raise UserError(
                f"guidance.mode=mean moves the mean of the ancestral DDPM step: it needs sampler=ddpm, not {plan.name} "
                "(guidance.mode=eps works with every sampler)"
            )
        from diffuse.diffusion.samplers.ddpm import resolve_variance

        variance = resolve_variance(plan.options.get("variance", "beta_tilde"), plan.options.get("learned_variance"))
        if variance == "learned":
            raise UserError(
                "guidance.mode=mean scales the shift by the step's fixed variance: this model's variances are "
                "learned (per pixel); use guidance.mode=eps, or sampler.variance=beta or beta_tilde"
            )
        factors = mean_shift_factors(plan.timesteps, model.schedule, variance)
    loaded = load_guide_classifier(guidance.classifier, model, use_ema=guidance.classifier_ema, verify=verify)
    return dataclasses.replace(guidance, loaded=loaded, mean_factors=factors)


def guide(model: Model, guidance: Guidance):
    """The model's denoiser with classifier-free guidance, classifier guidance (around the first, for a
    class-conditional model), or unchanged (guidance=none, or an unconditional model at scale 1)."""
    if guidance.name == "none":
        return model.denoiser
    if guidance.name == "classifier":
        if guidance.loaded is None:
            raise RuntimeError("guidance=classifier: attach_classifier() loads the classifier before guide()")
        if model.num_classes:
            base = cfg_denoiser(
                model.denoiser,
                guidance.cfg_scale,
                null_label=model.num_classes,
                interval=guidance.interval,
                rescale=guidance.rescale,
                schedule=model.schedule,
            )
        else:
            base = _unlabelled(model.denoiser)
        return classifier_guided(
            base,
            guidance.loaded.grad,
            guidance.scale,
            model.schedule,
            interval=guidance.interval,
            factors=guidance.mean_factors,
        )
    if not model.num_classes:
        if guidance.scale != 1.0:
            raise UserError(
                f"guidance.scale={guidance.scale:g} needs a class-conditional model (model.num_classes); this one is unconditional"
            )
        return model.denoiser
    return cfg_denoiser(
        model.denoiser,
        guidance.scale,
        null_label=model.num_classes,
        interval=guidance.interval,
        rescale=guidance.rescale,
        schedule=model.schedule,
    )


def resolve_labels(
    label: int | None, labels: Sequence[int] | None, n: int, num_classes: int | None
) -> torch.Tensor | None:
    """The label of each of n images: `label` for all, `labels` cycled, else all classes in turn; None for an
    unconditional model (which refuses label and labels)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise UserError(
            f"n={n!r} is not allowed: it must be an integer from 1 to {MAX_IMAGES:,} (the images one run draws)"
        )
    if label is not None and labels is not None:
        raise UserError("label= and labels= cannot both be given: choose one")
    if not num_classes:
        if label is not None or labels is not None:
            raise UserError(
                f"label={label if label is not None else list(labels)!r} needs a class-conditional model (model.num_classes); this one is unconditional"
            )
        return None
    chosen = [label] if label is not None else (list(labels) if labels is not None else list(range(num_classes)))
    if not chosen:
        raise UserError("labels=[] is not allowed: give at least one class")
    for k in chosen:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_classes:
            raise UserError(f"label {k!r} is not allowed: classes are 0..{num_classes - 1}")
    return torch.tensor(chosen, dtype=torch.long).repeat(math.ceil(n / len(chosen)))[:n]


def _unlabelled(denoiser):
    """An unconditional model's denoiser: the labels are the classifier's alone."""

    def call(x_t, t, y=None):
        return denoiser(x_t, t, None)

    return call


def sample_labels(model: Model, guidance: Guidance, label, labels, n: int) -> torch.Tensor | None:
    """resolve_labels, except that the oracle, unguided and without label/labels, samples the whole mixture at its
    weights (it is ground truth), not its components in turn. Under classifier guidance an unconditional model
    takes the classifier's classes."""
    classes = model.num_classes or (guidance.loaded.num_classes if guidance.loaded is not None else None)
    chosen = resolve_labels(label, labels, n, classes)
    if model.is_oracle and label is None and labels is None and guidance.unguided:
        return None
    return chosen
