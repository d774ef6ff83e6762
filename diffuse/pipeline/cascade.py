"""Cascaded generation (Ho et al. 2021): a base model's images refined by super-resolution models, each conditioned on
the previous stage's output (diffusion.superres). What sample, eval and upsample share: the `condition` config of a
super-resolution model checked, a cascade of models checked against each other, and its generation, in which image i
depends only on (seed, i) at every stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffuse.diffusion.noise import PerSample, randn, sample_seed
from diffuse.diffusion.superres import aug_alpha_bar, aug_level_of, augment, condition_lowres
from diffuse.errors import UserError
from diffuse.pipeline.condition import SuperResRefusal
from diffuse.pipeline.model import Model
from diffuse.pipeline.sampling import CountingDenoiser, SamplerPlan, Samples, in_batches, plan_sampler
from diffuse.validate import check_flag


def load_cascade(paths: Any, load: Callable[[Any, bool], Model]) -> list[Model]:
    """The models of cascade=[BASE, SR, ...]; load(path, superres) loads one (pipeline.config.job_of's loader)."""
    if not isinstance(paths, (list, tuple)) or len(paths) < 2 or not all(isinstance(p, str) and p for p in paths):
        raise UserError(
            f"cascade={paths!r} is not allowed: give a list of checkpoints, the base model first and then "
            "one super-resolution model per stage, e.g. cascade=[BASE_RUN,SR_RUN]"
        )
    from diffuse.checkpoint import resolve_ckpt_path

    for i, p in enumerate(paths):  # a missing entry named as typed, not as the loader's ckpt=
        resolve_ckpt_path(p, key=f"cascade[{i}]")
    models = []
    for i, p in enumerate(paths):
        try:
            models.append(load(p, i > 0))
        except SuperResRefusal:
            if i > 0:
                raise
            raise UserError(
                f"cascade={list(paths)!r} is not allowed: its first checkpoint {p!r} is a super-resolution model; "
                "the base model (one that samples from noise) comes first, then one super-resolution model "
                "per stage, lowest resolution first"
            ) from None
    return models


def stage_seed(seed: int, stage: int) -> int:
    """The seed of a super-resolution stage's noise streams (stage 0, the base, uses the command's seed itself, so
    that its images are those `diffuse sample ckpt=BASE` draws)."""
    return seed if stage == 0 else sample_seed(seed, -stage)


@dataclass(frozen=True)
class SuperRes:
    """One super-resolution stage: its model (Model.lowres set), its sampler plan, and how it is conditioned."""

    model: Model
    plan: SamplerPlan
    aug_level: float
    truncated: bool

    @property
    def factor(self) -> int:
        return self.model.lowres["factor"]


def plan_superres(
    model: Model,
    sampler: dict,
    steps: int | None,
    aug_level: float | None = None,
    truncated: bool | None = None,
) -> SuperRes:
    """A super-resolution model's stage: its sampler, and its augmentation level and truncation (None: the
    checkpoint's condition.aug_level and condition.truncated)."""
    if not model.lowres:
        raise UserError(
            f"{model.source.get('ckpt', 'the model')} is not a super-resolution model (trained with condition=lowres)"
        )
    level = model.lowres["aug_level"] if aug_level is None else aug_level
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level <= 1:
        raise UserError(f"condition.aug_level={level!r} is not allowed: it must be a number in [0, 1]")
    trunc = model.lowres["truncated"] if truncated is None else truncated
    check_flag("condition.truncated", trunc)
    return SuperRes(
        model, plan_sampler(sampler, steps, model.schedule, model.clip_x0, model.tuned), float(level), trunc
    )


def check_chain(base: Model, stages: Sequence[SuperRes]) -> None:
    """Each super-resolution model reads the resolution and channels of the stage before it (a latent base's: its
    decoded images)."""
    if base.lowres:
        raise UserError(
            f"cascade=: its first model, {base.source.get('ckpt')}, is a super-resolution model; the first "
            "generates from noise (a model trained without condition=lowres)"
        )
    if base.autoencoder is not None and stages and stages[0].truncated:
        # A truncated base hands on its x_t, which for a latent model is a noised latent: decoding it is not the
        # noised image sqrt(g) x + sqrt(1 - g) eps the super-resolution model was trained on.
        raise UserError(
            f"condition.truncated=true is not allowed after a latent base model ({base.source.get('ckpt')}): its "
            "reverse process would stop in latent space, where x_t is not a noised image; "
            "use condition.truncated=false "
            "for the first super-resolution stage"
        )
    shape = base.image_shape
    for st in stages:
        want = (st.model.shape[0], st.model.lowres["from_resolution"], st.model.lowres["from_resolution"])
        if tuple(shape) != want:
            raise UserError(
                f"cascade=: {st.model.source.get('ckpt')} super-resolves {want[0]} x {want[1]} x {want[2]} images, "
                f"the stage before it makes {shape[0]} x {shape[1]} x {shape[2]}"
            )
        if st.truncated and st.aug_level == 0:
            raise UserError(
                f"condition.truncated=true needs condition.aug_level > 0 ({st.model.source.get('ckpt')}): the "
                "previous stage stops at that level, and at 0 it is not truncated at all"
            )
        shape = st.model.shape


class _Reached(Exception):
    """Raised by the truncation hook: the previous stage's reverse process has reached the augmentation level."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x


def truncation(plan: SamplerPlan, level: float) -> tuple[SamplerPlan, int, float]:
    """`plan` cut at the timestep whose alpha_bar is nearest g(level): (the plan over its levels down to that one, the
    timestep, the level its alpha_bar has exactly, which the next stage is told)."""
    ab = plan.schedule.alpha_bar
    t_stop = int((ab - float(aug_alpha_bar(level))).abs().argmin())
    ts = plan.timesteps
    kept = torch.cat([ts[ts.to(torch.float64) > t_stop], torch.tensor([t_stop], dtype=ts.dtype)])
    return dataclasses.replace(plan, timesteps=kept, steps=len(kept)), t_stop, float(aug_level_of(ab[t_stop]))


def run_stage(denoiser, plan: SamplerPlan, x_T: torch.Tensor, gen, y, stop_at: int | None) -> tuple[torch.Tensor, int]:
    """One stage's samples (or, with stop_at, its x_t at that timestep) and the denoiser calls it made."""
    counter = CountingDenoiser(denoiser)
    if stop_at is None:
        return plan(counter, x_T, generator=gen, y=y), counter.calls
    if float(plan.timesteps[0]) == stop_at:  # the level is the first one: x_T is already there
        return x_T, 0

    def hook(x, t_next):
        if t_next == stop_at:
            raise _Reached(x)
        return x

    try:
        plan(counter, x_T, generator=gen, y=y, hook=hook)
    except _Reached as r:
        return r.x, counter.calls
    raise UserError(
        f"sampler={plan.name} cannot be truncated (condition.truncated=true): it did not pass through "
        f"timestep {stop_at}; use a fixed-step sampler such as ddim or ddpm"
    )


def conditioned(stage: SuperRes, x_prev: torch.Tensor, level: float | None, gen) -> tuple[Callable, float]:
    """The stage's denoiser told its low-resolution images: x_prev itself when the stage before was truncated (it is
    already x_t at `level`), else x_prev noised at the stage's own level, the first draw of each image's stream."""
    if level is None:
        level = stage.aug_level
        x_prev = augment(x_prev, torch.tensor(level), randn(x_prev.shape, gen, x_prev.device))
    return condition_lowres(stage.model.denoiser, x_prev, level), level


@dataclass(frozen=True)
class CascadeJob:
    """A base SamplingJob followed by super-resolution stages: duck-typed as a SamplingJob for sample and eval
    (model: the last stage's, plan: the base's, labels, generate, info)."""

    base: Any  # pipeline.job.SamplingJob
    stages: tuple[SuperRes, ...]
    denoiser: Callable  # the base stage's (eval swaps in a counting one, as for a SamplingJob)

    @property
    def model(self) -> Model:
        return self.stages[-1].model

    @property
    def plan(self) -> SamplerPlan:
        return self.base.plan

    @property
    def labels(self) -> torch.Tensor | None:
        return self.base.labels

    @property
    def seed(self) -> int:
        return self.base.seed

    def draw(self, idx: list[int], y: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """Images idx through every stage: (final images, denoiser calls per stage). A stage followed by a truncated
        one stops at that one's level, whose exact value (its alpha_bar on this stage's schedule) the next is told."""
        x, level, nfe = None, None, []
        for j in range(len(self.stages) + 1):
            gen = PerSample(stage_seed(self.seed, j), idx)
            if j == 0:
                den, plan, model = self.denoiser, self.base.plan, self.base.model
            else:
                st = self.stages[j - 1]
                den, _ = conditioned(st, x, level, gen)
                plan, model = st.plan, st.model
            nxt = self.stages[j] if j < len(self.stages) else None
            stop_at, level = None, None
            if nxt is not None and nxt.truncated:
                plan, stop_at, level = truncation(plan, nxt.aug_level)
            x_T = randn((len(idx), *model.shape), gen, device)
            x, calls = run_stage(den, plan, x_T, gen, y if (j == 0 or model.num_classes) else None, stop_at)
            if model.decode is not None:  # a latent base (check_chain: never truncated): the next stage reads images
                x = model.decode(x)
            nfe.append(calls)
        return x, nfe

    def generate(
        self,
        indices: list[int],
        *,
        device: torch.device,
        batch_size: int,
        on_batch: Callable[[int, torch.Tensor], None] | None = None,
        progress: bool = True,
        keep: bool = True,
        fixed_shape: bool = False,
        stop=None,
    ) -> Samples:
        """Images `indices` through every stage, batch after batch as pipeline.sampling.generate draws them (image
        i with label labels[i]); fixed_shape is taken as a SamplingJob takes it, and not applied."""

        def batch(start: int, idx: list[int]) -> tuple[torch.Tensor, int]:
            x, calls = self.draw(idx, self.labels[idx].to(device) if self.labels is not None else None, device)
            return x, sum(calls)

        what = f"cascade of {len(self.stages) + 1} ({self.plan.name}, {self.plan.describe_steps()})"
        return in_batches(batch, indices, batch_size, what, self.model.shape, on_batch, progress, keep, stop)

    def info(self) -> dict:
        out = self.base.info()
        out["cascade"] = [self.base.model.source] + [
            {
                **st.model.source,
                "sampler": st.plan.name,
                "steps": st.plan.steps,
                "aug_level": st.aug_level,
                "truncated": st.truncated,
            }
            for st in self.stages
        ]
        return out
