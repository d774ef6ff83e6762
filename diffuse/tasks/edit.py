"""diffuse edit: image [+ mask] -> noised to t0 (SDEdit) or inverted to t0 (DDIM) -> sampler from t0 -> edits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from diffuse.console import console
from diffuse.diffusion.edit import check_strength, sdedit, start_timestep, trajectory_hook, truncate
from diffuse.diffusion.inpainting import MaskConditioned, condition_on, replace_hook
from diffuse.diffusion.noise import PerSample, randn
from diffuse.diffusion.samplers import SELF_STEPPING, STOCHASTIC
from diffuse.diffusion.samplers.ddim import ddim_invert
from diffuse.errors import UserError
from diffuse.images import (
    from_uint8,
    grid_upscale,
    image_files,
    image_mask_pairs,
    load_keep_mask,
    load_model_image,
    make_grid,
    resize,
    save_png,
    to_uint8,
    write_npz,
)
from diffuse.io import save_resolved_config
from diffuse.pipeline.conditioning import guide
from diffuse.pipeline.config import checking_runtime, model_of, runtime_of, sampling_job_of, to_dict
from diffuse.pipeline.job import SamplingJob
from diffuse.pipeline.sampling import CountingDenoiser
from diffuse.rundir.per_image import each_image, write_record
from diffuse.signals import StopRequest
from diffuse.validate import check_choice, check_flag, check_number

METHODS = ("sdedit", "invert")


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    with StopRequest() as stop:  # from the start; images are the safe points
        return edit(cfg, out, stop)


@dataclass(frozen=True)
class EditPlan:
    """What edit() needs, every value checked."""

    n: int
    seed: int
    method: str
    strength: float
    t0: int
    levels: torch.Tensor  # the sampler's levels from t0 down
    job: SamplingJob  # model, guided denoiser, sampler plan, labels of the n edits
    conditioned: bool  # the network sees the kept pixels (a mask-trained model, with --mask)
    fixed_point_iters: int = 0
    source_y: int | None = None  # the label the image is inverted with (None: an unconditional model)
    round_trip: bool = False


def prepare(cfg: DictConfig, checking: bool = False):
    """Everything edit() refuses before it writes anything, and what it needs. With checking=True
    (overrides.check_overrides, for every job of a -m sweep before the first starts) the model loads on the CPU."""
    if not cfg.image:
        raise UserError("--image PATH is required: an image file or a folder of images")
    n = check_number("n", cfg.n, minimum=1, integer=True)
    seed = check_number("seed", cfg.seed, integer=True)
    check_flag("save_npz", cfg.save_npz)
    ec = to_dict(cfg.edit)
    method, strength, fpi = edit_options(ec)
    pairs = edit_pairs(cfg.image, cfg.mask)
    rt = runtime_of(cfg, images=n * len(pairs))
    model = model_of(cfg, checking_runtime(rt) if checking else rt)
    if model.autoencoder is not None:
        raise UserError(
            f"ckpt={cfg.ckpt} is a latent model (autoencoder {model.autoencoder.path}): diffuse edit works in "
            "pixel space and does not take one; inpaint it with diffuse inpaint, or edit with a pixel model"
        )
    job = sampling_job_of(cfg, model, n)
    masked = pairs[0][1] is not None
    check_sampler(job, method, strength, masked, n)
    conditioned = use_conditioned(ec["conditioned"], model.denoiser, masked)
    invert = method == "invert"
    source_y = source_label(ec["source_label"], model.num_classes) if invert else None
    t0 = start_timestep(strength, model.schedule.T)
    if t0 < 0:
        levels = job.plan.timesteps[:0]
    else:
        levels = job.plan.timesteps if strength == 1.0 else truncate(job.plan.timesteps, t0)
    loaded = []
    for img_path, mask_path in pairs:
        img = load_model_image(img_path, model.shape, ec["resize"], "edit.resize")
        keep = load_keep_mask(mask_path, img_path, (img.shape[2], img.shape[1]), ec["mask_invert"]) if masked else None
        loaded.append((img, keep))
    round_trip = invert and ec["round_trip"]
    plan = EditPlan(n, seed, method, strength, t0, levels, job, conditioned, fpi, source_y, round_trip)
    return plan, pairs, loaded, rt


def edit_options(ec: dict) -> tuple[str, float, int]:
    """The edit group's method, strength and fixed-point iterations (0 unless inverting), its switches checked."""
    method = check_choice("edit.method", ec["method"], METHODS)
    if method == "invert" and "fixed_point_iters" not in ec:
        raise UserError("edit.method=invert needs the inversion's options: choose the method with edit=invert")
    strength = check_strength(ec["strength"])
    for key in ("resize", "mask_invert", *(("round_trip",) if method == "invert" else ())):
        check_flag(f"edit.{key}", ec[key])
    if ec["conditioned"] not in ("auto", True, False):
        raise UserError(f"edit.conditioned={ec['conditioned']!r} is not allowed: auto, true or false")
    if method != "invert":
        return method, strength, 0
    return method, strength, check_number("edit.fixed_point_iters", ec["fixed_point_iters"], minimum=0, integer=True)


def edit_pairs(image, mask) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) files; two images whose results would share a file name are refused."""
    image = Path(str(image))
    pairs = (
        image_mask_pairs(image, Path(str(mask))) if mask not in (None, "") else [(p, None) for p in image_files(image)]
    )
    stems: dict[str, Path] = {}
    for p, _ in pairs:
        other = stems.setdefault(p.stem, p)
        if other != p:
            raise UserError(f"--image {image}: {other.name} and {p.name} would both write {p.stem}_00.png: rename one")
    return pairs


def check_sampler(job: SamplingJob, method: str, strength: float, masked: bool, n: int) -> None:
    plan = job.plan
    if plan.options.get("afs") and (method == "invert" or strength < 1):
        raise UserError(
            "sampler.afs=true takes eps = x_T at the first level, which holds for pure noise only; an edit "
            "starts from the image at t0: set sampler.afs=false"
        )
    if method == "invert":
        if plan.name in STOCHASTIC or (plan.name == "ddim" and plan.options.get("eta", 0.0) > 0):
            raise UserError(
                f"edit.method=invert needs a deterministic sampler: sampler={plan.name}"
                f"{' with eta > 0' if plan.name == 'ddim' else ''} is stochastic, so its output is not a function "
                "of the inverted latent; choose ddim (eta=0), dpm_solver, unipc, ipndm, deis, euler or heun"
            )
        if plan.name in SELF_STEPPING:
            raise UserError(
                f"edit.method=invert needs the levels it regenerates over: sampler={plan.name} chooses its own "
                "steps; choose ddim (eta=0), dpm_solver, unipc, ipndm, deis, euler or heun"
            )
    if masked and plan.options.get("per_sample") and n > 1:
        raise UserError(
            f"sampler={plan.name} with per_sample=true cannot follow a mask on {n} edits at once: set "
            "sampler.per_sample=false"
        )


def use_conditioned(choice, denoiser, masked: bool) -> bool:
    trained = isinstance(getattr(denoiser, "net", None), MaskConditioned)
    if choice is True:
        if not trained:
            raise UserError(
                "edit.conditioned=true needs a model trained with objective.mask_training=true; this one "
                "was not: use edit.conditioned=auto or false"
            )
        if not masked:
            raise UserError("edit.conditioned=true needs --mask: the kept pixels are what the network is shown")
    return masked and trained and choice in ("auto", True)


def source_label(label, num_classes: int | None) -> int | None:
    """The label the image is inverted with: the given class, else the null label of a class-conditional model."""
    if label is None:
        return num_classes or None
    if not num_classes:
        raise UserError(
            f"edit.source_label={label!r} needs a class-conditional model (model.num_classes); "
            "this one is unconditional"
        )
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
        raise UserError(
            f"edit.source_label={label!r} is not allowed: classes are 0..{num_classes - 1} (null: unconditional)"
        )
    return label


@dataclass
class Edits:
    full: torch.Tensor | None  # uint8 n x C x H x W at the input's size (None once written: edit() keeps the rest)
    model: torch.Tensor  # uint8 n x C x h x w at the model's size (the grid and samples.npz)
    shown: torch.Tensor  # uint8 C x h x w: the input as the model saw it
    nfe: int  # denoiser calls for this image, every pass included
    nfe_inversion: int = 0
    nfe_round_trip: int = 0
    rmse: float | None = None  # the plain round trip's RMS error, in [-1, 1] units


def edit(cfg: DictConfig, out: Path, stop: StopRequest) -> dict[str, Any]:
    plan, pairs, loaded, rt = prepare(cfg)
    save_resolved_config(cfg, out)
    job, n = plan.job, plan.n
    masked = pairs[0][1] is not None

    def one(idx: int):
        img, keep_full = loaded[idx]
        res = edit_image(plan, img, keep_full, first=idx * n, device=rt.device)
        row = [res.shown.unsqueeze(0)]
        if masked:
            kept = resized_keep(keep_full, res.shown.shape[-2:])
            row.append(torch.where(kept, res.shown, torch.full_like(res.shown, 255)).unsqueeze(0))
        # the full-size edits are on disk once each_image returns: the grid and samples.npz need the rest only
        return res.full, (torch.cat([*row, res.model]), dataclasses.replace(res, full=None))

    what = f"editing ({plan.method}, {job.plan.name}, {len(plan.levels)} levels from t0={plan.t0})"
    paths = [p for p, _ in pairs]
    kept = each_image(paths, n, one, out, stop, progress=what)
    if kept:
        rows = [row for row, _ in kept]
        grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0])
        save_png(grid, out / "grid.png", upscale=grid_upscale(rows[0].shape[-2]))
    edits = [res for _, res in kept]
    if cfg.save_npz and len(kept) == len(pairs):
        labels = job.labels.repeat(len(kept)) if job.labels is not None else None
        write_npz(out / "samples.npz", torch.cat([res.model for res in edits]), labels)
    info = edit_info(plan, [str(p) for p in paths[: len(kept)]], masked, edits)
    stopped = write_record(out, "edit.json", info, paths, len(kept), stop, "image(s) edited, in")
    if stopped:
        return stopped
    line = (
        f"edited {len(kept)} image(s) x {n} ({plan.method}, strength {plan.strength:g}: t0={plan.t0}, "
        f"NFE {info['nfe']} per image)"
    )
    rmse = info.get("reconstruction_rmse")
    if rmse:
        line += f"; round trip RMS error {sum(rmse.values()) / len(rmse):.4f}"
    console.print(line, markup=False)
    return info


def edit_info(plan: EditPlan, done: list[str], masked: bool, edits: list[Edits]) -> dict[str, Any]:
    """What edit.json records of the edits of the images `done` (their Edits, in order)."""
    job = plan.job
    first = next((res for res in edits if res.nfe), None)  # none when strength 0 left nothing to do
    info = {
        "method": plan.method,
        "strength": plan.strength,
        "t0": plan.t0,
        "levels": len(plan.levels),
        "images": done,
        "n": plan.n,
        "mask": masked,
        "conditioned": plan.conditioned,
        "nfe": first.nfe if first else 0,
        **job.info(),
    }
    if job.labels is not None:
        info["labels"] = job.labels.tolist()
    if plan.method == "invert":
        nfe_inv = first.nfe_inversion if first else 0
        info.update(fixed_point_iters=plan.fixed_point_iters, source_label=plan.source_y, nfe_inversion=nfe_inv)
        if plan.round_trip:
            rmse = {p: res.rmse for p, res in zip(done, edits) if res.rmse is not None}
            info.update(nfe_round_trip=first.nfe_round_trip if first else 0, reconstruction_rmse=rmse)
    return info


def resized_keep(keep_full: torch.Tensor, hw) -> torch.Tensor:
    if tuple(keep_full.shape[-2:]) == tuple(hw):
        return keep_full
    return resize(keep_full.float(), tuple(hw), "nearest") > 0.5


def edit_image(plan: EditPlan, img: torch.Tensor, keep_full: torch.Tensor | None, *, first: int, device) -> Edits:
    """n edits of one image (uint8 C x H x W at its own size; keep_full: its kept pixels, or None), drawn at the
    model's size from noise streams first, first + 1, ...; kept pixels are exactly the input's."""
    job, n = plan.job, plan.n
    model = job.model
    h, w = model.shape[1:]
    H, W = img.shape[-2:]
    scaled = (H, W) != (h, w)
    shown = resize(img, (h, w), "bilinear").round().clamp(0, 255).to(torch.uint8) if scaled else img
    if plan.t0 < 0:  # strength 0: nothing is noised, the image is the edit
        return Edits(
            img.unsqueeze(0).expand(n, -1, -1, -1).clone(), shown.unsqueeze(0).expand(n, -1, -1, -1).clone(), shown, 0
        )
    x0 = from_uint8(shown).unsqueeze(0).to(device)
    keep = resized_keep(keep_full, (h, w)).unsqueeze(0).to(device) if keep_full is not None else None
    base = condition_on(model.denoiser, x0, keep) if plan.conditioned else model.denoiser
    den = CountingDenoiser(guide(model.with_denoiser(base), job.guidance) if plan.conditioned else job.denoiser)
    gen = PerSample(plan.seed, [first + j for j in range(n)])
    y = job.labels[:n].to(device) if job.labels is not None else None
    if plan.method == "sdedit":
        x, (inv_calls, rt_calls, rmse) = sdedit_pass(plan, den, x0, keep, gen, y, device), (0, 0, None)
    else:
        x, inv_calls, rt_calls, rmse = inversion_pass(plan, base, den, x0, keep, gen, y, first, device)
    edits = to_uint8(x.float().cpu())
    full = resize(edits, (H, W), "bilinear").round().clamp(0, 255).to(torch.uint8) if scaled else edits
    if keep_full is not None:
        full = torch.where(keep_full.unsqueeze(0), img.unsqueeze(0), full)
    return Edits(full, edits, shown, den.calls + inv_calls + rt_calls, inv_calls, rt_calls, rmse)


def sdedit_pass(plan: EditPlan, den, x0: torch.Tensor, keep, gen, y, device) -> torch.Tensor:
    """The n SDEdit edits of x0 (1 x C x h x w): noised to t0 by the first draw of each stream, then sampled."""
    noise = randn((plan.n, *x0.shape[1:]), gen, device)
    schedule = plan.job.model.schedule
    hook = replace_hook(x0, keep, schedule, gen) if keep is not None else None
    timesteps, options = plan.job.plan.timesteps, plan.job.plan.options
    return sdedit(
        plan.job.plan.fn,
        den,
        x0,
        timesteps,
        schedule,
        strength=plan.strength,
        noise=noise,
        generator=gen,
        y=y,
        hook=hook,
        **options,
    )


def inversion_pass(plan: EditPlan, base, den, x0: torch.Tensor, keep, gen, y, first: int, device):
    """x0 inverted to t0 with the source label by the unguided `base` denoiser, then regenerated n times by `den`:
    (edits, inversion calls, round trip calls, round trip RMS error or None)."""
    fn, schedule, options = plan.job.plan.fn, plan.job.model.schedule, plan.job.plan.options
    y_src = torch.full((1,), plan.source_y, dtype=torch.long, device=device) if plan.source_y is not None else None
    path: dict = {}

    def record(x_t, t):
        path[t] = x_t
        return x_t

    inv = CountingDenoiser(base)
    hook = record if keep is not None else None
    latent = ddim_invert(inv, x0, plan.levels, schedule, y=y_src, fixed_point_iters=plan.fixed_point_iters, hook=hook)
    rt_calls, rmse = 0, None
    if plan.round_trip:
        back = CountingDenoiser(base)
        rec = fn(back, latent, plan.levels, schedule, generator=PerSample(plan.seed, [first]), y=y_src, **options)
        rt_calls, rmse = back.calls, float((rec.double() - x0.double()).pow(2).mean().sqrt())
    hook = trajectory_hook(path, x0, keep) if keep is not None else None
    latents = latent.expand(plan.n, -1, -1, -1).contiguous()
    x = fn(den, latents, plan.levels, schedule, generator=gen, y=y, hook=hook, **options)
    return x, inv.calls, rt_calls, rmse


def check(cfg: DictConfig, out: Path) -> None:
    prepare(cfg, checking=True)


# What the command writes into its run dir (rundir.outputs: checked before the work starts).
OUTPUTS = ("config.yaml", "edit.json", "grid.png", "samples.npz", "*.png")
