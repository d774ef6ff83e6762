"""The chain every sampling command runs, once: model -> sampler plan -> labels -> guidance (`SamplingJob`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffuse.pipeline.conditioning import Guidance, attach_classifier, guide, parse_guidance, sample_labels
from diffuse.pipeline.model import Model
from diffuse.pipeline.sampling import SamplerPlan, Samples, generate, plan_sampler


@dataclass(frozen=True)
class SamplingJob:
    model: Model
    denoiser: Callable  # the model's denoiser with guidance
    plan: SamplerPlan
    guidance: Guidance
    labels: torch.Tensor | None  # label of image i, for i < n; None: unconditional
    seed: int

    def generate(self, indices: list[int], *, device: torch.device, batch_size: int, **kwargs) -> Samples:
        """Images `indices` (see pipeline.sampling.generate for on_batch, keep, progress, fixed_shape)."""
        labels = self.labels[indices] if self.labels is not None else None
        return generate(
            self.denoiser,
            self.plan,
            shape=self.model.shape,
            seed=self.seed,
            device=device,
            batch_size=batch_size,
            indices=indices,
            labels=labels,
            decode=self.model.decode,
            **kwargs,
        )

    def info(self) -> dict:
        """What sample.json and metrics.json record of how the images were drawn (nfe is added once counted)."""
        out = {"sampler": self.plan.name, "steps": self.plan.steps, "seed": self.seed, **self.model.source}
        if self.labels is not None:
            out.update(self.guidance_info())
        return out

    def guidance_info(self) -> dict:
        """The guidance the labelled images were drawn with: guidance_scale (classifier-free) and, under classifier
        guidance, classifier_scale, its mode and the classifier."""
        g = self.guidance
        if g.name != "classifier":
            return {"guidance_scale": g.scale}
        out = {"guidance": "classifier", "classifier_scale": g.scale, "classifier_mode": g.mode, **g.loaded.source}
        if self.model.num_classes:
            out["guidance_scale"] = g.cfg_scale
        return out


def as_distilled(model: Model, sampler: dict, steps: int | None) -> tuple[dict, int | None]:
    """(sampler, steps) with a distilled student's own steps and levels when the command leaves them to it: the same
    sampler it was distilled for, no steps= or the student's, no explicit or tuned levels."""
    made = model.sampling
    if (
        made.get("sampler") == sampler["name"]
        and steps in (None, made.get("steps"))
        and sampler["sigmas"] is None
        and sampler["timesteps"] is None
        and sampler["schedule"] == "stock"
    ):
        steps = made["steps"]
        if made.get("timesteps") is not None:
            sampler = {**sampler, "timesteps": list(made["timesteps"])}
    return sampler, steps


def prepare_sampling(
    model: Model,
    *,
    sampler: dict,
    steps: int | None,
    guidance: dict | None,
    label,
    labels,
    n: int,
    seed: int,
    verify: Any = True,
) -> SamplingJob:
    """Everything checked before the first image is drawn: the sampler's options, labels and guidance (its classifier
    loaded; `verify`: the command's, for the classifier's checkpoint too)."""
    sampler, steps = as_distilled(model, sampler, steps)
    plan = plan_sampler(sampler, steps, model.schedule, model.clip_x0, model.tuned, model.learned_variance)
    g = attach_classifier(parse_guidance(guidance), model, plan, verify)
    chosen = sample_labels(model, g, label, labels, n)
    return SamplingJob(model, guide(model, g), plan, g, chosen, seed)
