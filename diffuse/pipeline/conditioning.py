"""Class labels of the images to draw, and classifier-free guidance around a model's denoiser."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from diffuse.diffusion.guidance import cfg_denoiser, check_guidance
from diffuse.errors import UserError
from diffuse.pipeline.model import Model

GUIDANCE = ("cfg", "none")
# The most images one command draws. 200 times the 50000 of a standard FID; every command holds a label per
# image (80 MB of them here) and the images or their features, so far beyond this it would fail partway, after
# hours, on an allocation (n = 10^12 labels alone would be 8 TB).
MAX_IMAGES = 10_000_000


@dataclass(frozen=True)
class Guidance:
    """The `guidance` group, checked once: eps_null + scale (eps_cond - eps_null) within `interval`."""

    name: str = "none"
    scale: float = 1.0
    interval: Optional[tuple[float, float]] = None
    rescale: float = 0.0

    @property
    def unguided(self) -> bool:
        return self.scale == 1.0


def parse_guidance(g: Optional[dict]) -> Guidance:
    if not g:
        return Guidance()
    if g["name"] not in GUIDANCE:
        raise UserError(f"guidance={g['name']!r} is not allowed: choose one of {', '.join(GUIDANCE)}")
    check_guidance(g["scale"], g["interval"], g["rescale"])
    interval = tuple(g["interval"]) if g["interval"] is not None else None
    return Guidance(g["name"], float(g["scale"]), interval, float(g["rescale"]))


def guide(model: Model, guidance: Guidance):
    """The model's denoiser with classifier-free guidance, or unchanged (guidance=none, or an unconditional model
    at scale 1)."""
    if guidance.name == "none":
        return model.denoiser
    if not model.num_classes:
        if guidance.scale != 1.0:
            raise UserError(f"guidance.scale={guidance.scale:g} needs a class-conditional model (model.num_classes); this one is unconditional")
        return model.denoiser
    return cfg_denoiser(model.denoiser, guidance.scale, null_label=model.num_classes, interval=guidance.interval,
                        rescale=guidance.rescale, schedule=model.schedule)


def resolve_labels(label: Optional[int], labels: Optional[Sequence[int]], n: int, num_classes: Optional[int]) -> Optional[torch.Tensor]:
    """The label of each of n images: `label` for all, `labels` cycled, else all classes in turn; None for an
    unconditional model (which refuses label and labels)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise UserError(f"n={n!r} is not allowed: it must be an integer from 1 to {MAX_IMAGES:,} (the images one run draws)")
    if label is not None and labels is not None:
        raise UserError("label= and labels= cannot both be given: choose one")
    if not num_classes:
        if label is not None or labels is not None:
            raise UserError(f"label={label if label is not None else list(labels)!r} needs a class-conditional model (model.num_classes); this one is unconditional")
        return None
    chosen = [label] if label is not None else (list(labels) if labels is not None else list(range(num_classes)))
    if not chosen:
        raise UserError("labels=[] is not allowed: give at least one class")
    for k in chosen:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_classes:
            raise UserError(f"label {k!r} is not allowed: classes are 0..{num_classes - 1}")
    return torch.tensor(chosen, dtype=torch.long).repeat(math.ceil(n / len(chosen)))[:n]


def sample_labels(model: Model, guidance: Guidance, label, labels, n: int) -> Optional[torch.Tensor]:
    """resolve_labels, except that the oracle, unguided and without label/labels, samples the whole mixture at its
    weights (it is ground truth), not its components in turn."""
    chosen = resolve_labels(label, labels, n, model.num_classes)
    if model.is_oracle and label is None and labels is None and guidance.unguided:
        return None
    return chosen
