"""A sampler config -> a checked call (`SamplerPlan`), counted network evaluations, and batched generation in which
image i depends only on (seed, i)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from diffuse.console import progress_bar
from diffuse.diffusion.noise import PerSample, randn
from diffuse.diffusion.samplers import get_sampler
from diffuse.diffusion.schedule import Schedule
from diffuse.diffusion.timesteps import explicit_timesteps, sampler_timesteps, sigma_timesteps
from diffuse.errors import UserError

# Keys of a sampler config that choose the levels or the defaults (conf/shared/levels.yaml), not arguments of
# the sampler function.
SAMPLER_META = {"name", "spacing", "default_steps", "clip_x0", "rho", "polyexp_rho", "sigmas", "timesteps", "schedule"}
# Arguments a sampler gets from the caller, never from its config.
CALL_ARGS = {"denoiser", "x_T", "timesteps", "schedule", "generator", "y", "hook", "learned_variance"}


@dataclass(frozen=True)
class SamplerPlan:
    """One sampler with its timesteps and options, checked: `plan(denoiser, x_T, generator=...)` -> x_0."""

    name: str
    fn: Callable
    steps: int
    timesteps: torch.Tensor
    schedule: Schedule
    options: dict  # keyword arguments of fn, clip_x0 included

    def describe_steps(self) -> str:
        from diffuse.diffusion.samplers import SELF_STEPPING

        return "steps chosen by its tolerance" if self.name in SELF_STEPPING else f"{self.steps} steps"

    def __call__(self, denoiser, x_T: torch.Tensor, *, generator, y=None, hook=None) -> torch.Tensor:
        kwargs = dict(self.options, hook=hook) if hook is not None else self.options
        return self.fn(denoiser, x_T, self.timesteps, self.schedule, generator=generator, y=y, **kwargs)


def plan_sampler(
    sampler_cfg: dict,
    steps: int | None,
    schedule: Schedule,
    clip_default: bool,
    tuned: dict | None = None,
    learned_variance: Callable | None = None,
) -> SamplerPlan:
    """The sampler of `sampler_cfg` over `steps` (None: its default_steps, or all T); unknown options are refused.
    `tuned`: the schedules diffuse tune-schedule recorded for the model, for sampler.schedule=tuned.
    `learned_variance`: a learn_sigma model's variance channels (Model.learned_variance), for the samplers that
    take them (ancestral DDPM); the others use the mean only."""
    name = sampler_cfg["name"]
    fn = get_sampler(name)
    timesteps = levels_of(sampler_cfg, steps, schedule, tuned or {})
    steps = len(timesteps)
    params = set(inspect.signature(fn).parameters)
    options = {}
    for key, val in sampler_cfg.items():
        if key in SAMPLER_META:
            continue
        if key not in params or key in CALL_ARGS:
            raise UserError(f"sampler.{key} is not an option of sampler {name}")
        options[key] = val
    clip = sampler_cfg["clip_x0"]
    if clip not in ("auto", None, True, False):
        raise UserError(f"sampler.clip_x0={clip!r} is not allowed: auto, true or false")
    options["clip_x0"] = clip_default if clip in ("auto", None) else clip
    if "learned_variance" in params:
        options["learned_variance"] = learned_variance
    # Samplers check their options on entry: a call over no timesteps refuses bad ones before any work is done.
    fn(None, torch.zeros(1), timesteps[:0], schedule, **options)
    return SamplerPlan(name, fn, steps, timesteps, schedule, options)


def levels_of(sampler_cfg: dict, steps: int | None, schedule: Schedule, tuned: dict) -> torch.Tensor:
    """The timesteps the sampler visits: an explicit list (sampler.sigmas or sampler.timesteps); a tuned schedule
    (sampler.schedule=tuned: the model's, or a schedule.json file diffuse tune-schedule wrote); else `steps` (None:
    the sampler's default_steps, or all T) spaced by sampler.spacing."""
    explicit = sampler_cfg["sigmas"] is not None or sampler_cfg["timesteps"] is not None
    if sampler_cfg["schedule"] != "stock":
        if explicit:
            raise UserError(
                "sampler.schedule and an explicit sampler.sigmas/timesteps list cannot both be given: choose one"
            )
        return tuned_timesteps(sampler_cfg, steps, schedule, tuned)
    if explicit:
        timesteps = explicit_timesteps(schedule, sigmas=sampler_cfg["sigmas"], timesteps=sampler_cfg["timesteps"])
        if steps is not None and steps != len(timesteps):
            raise UserError(
                f"steps={steps} but the sampler's explicit list has {len(timesteps)} levels: give one or the other"
            )
        return timesteps
    if steps is None:
        steps = sampler_cfg["default_steps"] or schedule.T
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UserError(f"steps={steps!r} is not allowed: it must be an integer between 1 and {schedule.T}")
    rho = sampler_cfg["polyexp_rho"] if sampler_cfg["spacing"] == "polyexp" else sampler_cfg["rho"]
    return sampler_timesteps(schedule, steps, sampler_cfg["spacing"], rho)


def tuned_timesteps(sampler_cfg: dict, steps: int | None, schedule: Schedule, tuned: dict) -> torch.Tensor:
    from diffuse.pipeline.tuning import check_tuned_entry, key, read_schedule_file

    name, choice = sampler_cfg["name"], sampler_cfg["schedule"]
    if choice == "tuned":
        steps = steps if steps is not None else sampler_cfg["default_steps"]
        entry = tuned.get(key(name, steps))
        if entry is None:
            have = ", ".join(sorted(tuned)) or "none"
            raise UserError(
                f"sampler.schedule=tuned: the model has no tuned schedule for {name} at {steps} steps "
                f"(it has: {have}); "
                f"make one with diffuse tune-schedule sampler={name} steps={steps}"
            )
        where = "the model's"
        check_tuned_entry(entry, f"sampler.schedule=tuned: the checkpoint's tuned entry {key(name, steps)}")
    else:
        entry, where = read_schedule_file(choice), str(choice)
        if entry["sampler"] != name or (steps is not None and entry["steps"] != steps):
            raise UserError(
                f"sampler.schedule={choice}: it was tuned for {entry['sampler']} at {entry['steps']} steps, "
                f"this run is {name} at {steps if steps is not None else 'its default'} steps"
            )
    sigmas = torch.tensor(entry["sigmas"], dtype=torch.float64)
    s_max, s_min = float(schedule.sigmas[-1]), float(schedule.sigmas[0])
    if len(sigmas) != entry["steps"] or sigmas[0] > s_max * (1 + 1e-9) or sigmas[-1] < s_min * (1 - 1e-9):
        raise UserError(f"sampler.schedule={choice}: {where} tuned levels do not fit this model's noise schedule")
    return sigma_timesteps(schedule, sigmas.clamp(s_min, s_max))


class CountingDenoiser:
    """A denoiser that counts its calls: the honest number of network evaluations (NFE) a sampler made.
    One call is one batched forward pass (with classifier-free guidance, cond and null share it)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x_t, t, y=None):
        self.calls += 1
        return self.denoiser(x_t, t, y)


class Samples(NamedTuple):
    images: torch.Tensor  # in model space, on the CPU (empty when keep=False)
    nfe: int  # denoiser calls per image (counted on the first batch)
    stopped: bool = False  # a stop request ended it between batches: images holds the batches before it


def generate(
    denoiser,
    plan: SamplerPlan,
    *,
    shape: tuple[int, ...],
    seed: int,
    device: torch.device,
    batch_size: int,
    indices: list[int],
    labels: torch.Tensor | None = None,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
    keep: bool = True,
    fixed_shape: bool = False,
    stop=None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Samples:
    """Draw images `indices`, each from its own (seed, i) noise stream; labels[j] is the label of indices[j].

    on_batch(first position in indices, images) is called as each batch completes. keep=False holds no images:
    for callers that consume each batch (evaluation of 50k samples). fixed_shape pads a short last batch to
    batch_size with copies of its last image (dropped after), so that a compiled network or its CUDA graph
    sees one shape only; images are drawn independently, so the padding changes none of them. stop (a
    diffuse.signals.StopRequest) is looked at before each batch: once requested, no new batch starts. decode (a
    latent model's: latents -> images) runs on each batch on the device, before on_batch sees it."""

    def batch(start: int, idx: list[int]) -> tuple[torch.Tensor, int]:
        pad = batch_size - len(idx) if fixed_shape else 0
        gen = PerSample(seed, idx + idx[-1:] * pad)
        x_T = randn((len(idx) + pad, *shape), gen, device)
        y = labels[start : start + len(idx)] if labels is not None else None
        y = torch.cat([y, y[-1:].expand(pad)]).to(device) if y is not None else None
        counter = CountingDenoiser(denoiser)
        x0 = plan(counter, x_T, generator=gen, y=y)[: len(idx)]
        return (decode(x0) if decode is not None else x0), counter.calls

    what = f"sampling ({plan.name}, {plan.describe_steps()})"
    return in_batches(batch, indices, batch_size, what, shape, on_batch, progress, keep, stop)


def in_batches(
    draw: Callable[[int, list[int]], tuple[torch.Tensor, int]],
    indices: list[int],
    batch_size: int,
    what: str,
    shape: tuple[int, ...],
    on_batch: Callable[[int, torch.Tensor], None] | None,
    progress: bool,
    keep: bool,
    stop,
) -> Samples:
    """The loop of generate() and of a cascade: draw(first position in indices, its batch of indices) -> (images,
    denoiser calls per image) for each batch in turn, moved to the CPU as float before on_batch sees them; a stop
    request is looked at before each batch. `what`: the progress bar's description; `shape`: an image's, for the
    empty result of a run that drew nothing."""
    outs, nfe, stopped = [], 0, False
    with progress_bar(progress) as bar:
        task = bar.add_task(what, total=len(indices))
        for start in range(0, len(indices), batch_size):
            if stop is not None and stop.requested:
                stopped = True
                break
            idx = indices[start : start + batch_size]
            x, calls = draw(start, idx)
            x = x.float().cpu()
            nfe = nfe or calls
            if keep:
                outs.append(x)
            if on_batch is not None:
                on_batch(start, x)
            bar.advance(task, len(idx))
    return Samples(torch.cat(outs) if outs else torch.empty(0, *shape), nfe, stopped)
