"""diffuse inpaint: image + mask -> denoiser -> known-region constraint -> sampler -> results and strips."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from diffuse.console import console, warn
from diffuse.diffusion.inpainting import (
    METHODS,
    condition_on,
    paste,
    repaint,
    repaint_nfe,
    replace_hook,
    require_mask_conditioned,
)
from diffuse.diffusion.noise import PerSample, randn
from diffuse.diffusion.samplers import STEPS
from diffuse.errors import UserError
from diffuse.images import from_uint8, image_mask_pairs, load_image_and_mask, make_grid, resize, save_png, to_uint8
from diffuse.io import save_resolved_config
from diffuse.pipeline.conditioning import guide
from diffuse.pipeline.config import checking_runtime, model_of, runtime_of, to_dict
from diffuse.pipeline.job import as_distilled, prepare_sampling
from diffuse.pipeline.sampling import CountingDenoiser
from diffuse.rundir.per_image import each_image, write_record
from diffuse.signals import StopRequest
from diffuse.validate import check_choice, check_number


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    with StopRequest() as stop:  # from the start; images are the safe points
        return fill(cfg, out, stop)


def prepare(cfg: DictConfig, checking: bool = False):
    """Everything fill() refuses before it writes anything, and what it needs. With checking=True
    (overrides.check_overrides, for every job of a -m sweep before the first starts) the model loads on the CPU."""
    if not cfg.image or not cfg.mask:
        raise UserError("--image PATH and --mask PATH are both required")
    n = check_number("n", cfg.n, minimum=1, integer=True)
    seed = check_number("seed", cfg.seed, integer=True)
    if cfg.steps is not None:
        check_number("steps", cfg.steps, minimum=1, integer=True)
    default_steps = check_number("default_steps", cfg.default_steps, minimum=1, integer=True)
    ic = to_dict(cfg.inpaint)
    method = check_choice("inpaint.method", ic["method"], METHODS)
    pairs = image_mask_pairs(Path(str(cfg.image)), Path(str(cfg.mask)))
    rt = runtime_of(cfg, images=n * len(pairs))
    model = model_of(cfg, checking_runtime(rt) if checking else rt)
    if method == "conditioned":
        require_mask_conditioned(model.denoiser)
    sampler, steps = as_distilled(model, to_dict(cfg.sampler), cfg.steps)
    job = prepare_sampling(
        model,
        sampler=sampler,
        steps=steps if steps is not None else default_steps,
        guidance=to_dict(cfg.guidance),
        label=cfg.label,
        labels=cfg.labels,
        n=n,
        seed=seed,
        verify=cfg.verify,
    )
    plan, steps = job.plan, job.plan.steps
    if method == "conditioned" and job.guidance.free_scale != 1.0 and job.labels is not None and model.num_classes:
        key = "guidance.cfg_scale" if job.guidance.name == "classifier" else "guidance.scale"
        raise UserError(
            f"{key}={job.guidance.free_scale:g} with inpaint=conditioned is not supported: the mask-conditioned "
            "network is told the known pixels per image, guidance would double the batch; "
            "use scale 1 or inpaint=replace"
        )
    if method == "repaint":  # its options are checked before anything is written
        if "jump_length" not in ic:
            raise UserError("inpaint.method=repaint needs RePaint's options: choose the method with inpaint=repaint")
        repaint_nfe(steps, ic["jump_length"], ic["resamples"], ic["jump_last"])
        if plan.name not in STEPS:
            raise UserError(f"sampler={plan.name!r} cannot drive repaint: choose one of {', '.join(sorted(STEPS))}")
    loaded = [
        load_image_and_mask(i, m, model.image_shape, bool(ic["resize"]), bool(ic["mask_invert"])) for i, m in pairs
    ]
    return n, seed, steps, ic, method, pairs, loaded, rt, model, job


def fill(cfg: DictConfig, out: Path, stop: StopRequest) -> dict[str, Any]:
    n, seed, steps, ic, method, pairs, loaded, rt, model, job = prepare(cfg)
    save_resolved_config(cfg, out)
    nfe = 0  # stays 0 when every mask keeps everything: no denoiser call is needed

    def one(idx: int):
        nonlocal nfe
        img_path, (img, keep_full) = pairs[idx][0], loaded[idx]
        if keep_full.all():
            warn(f"mask for {img_path} keeps every pixel: nothing to generate, the input is returned")
            res = img.unsqueeze(0).expand(n, -1, -1, -1).clone()
        else:
            res, nfe = complete(model, job, method, ic, img, keep_full, n=n, seed=seed, first=idx * n, device=rt.device)
        masked = torch.where(keep_full, img, torch.full_like(img, 255))
        strip = make_grid(torch.cat([img.unsqueeze(0), masked.unsqueeze(0), res]), nrow=n + 2)
        save_png(strip, out / f"{img_path.stem}_strip.png")
        return res, str(img_path)

    paths = [p for p, _ in pairs]
    results = each_image(paths, n, one, out, stop)
    info = {"method": method, "images": results, "n": n, "steps": steps, "nfe": nfe, "seed": seed, **model.source}
    if job.labels is not None:
        info.update(labels=job.labels.tolist(), **job.guidance_info())
    if method == "repaint":
        info.update(jump_length=ic["jump_length"], resamples=ic["resamples"], jump_last=ic["jump_last"])
    stopped = write_record(out, "inpaint.json", info, paths, len(results), stop, "image(s) inpainted, in")
    if stopped:
        return stopped
    console.print(f"inpainted {len(results)} image(s) x {n} ({method}, {steps} steps, NFE {nfe} per image batch)")
    return info


def complete(
    model,
    job,
    method: str,
    ic: dict,
    img: torch.Tensor,
    keep_full: torch.Tensor,
    *,
    n: int,
    seed: int,
    first: int,
    device,
) -> tuple[torch.Tensor, int]:
    """n completions (uint8, at the image's own size, known pixels exactly the input's) of one image, drawn at the
    model's size from noise streams first, first + 1, ... (completion j with label job.labels[j]); and the
    denoiser calls they took."""
    plan = job.plan
    x0, keep = known_region(model, img, keep_full, device)
    gen = PerSample(seed, [first + j for j in range(n)])
    x_T = randn((n, *model.shape), gen, device)
    known = x0.unsqueeze(0).expand(n, -1, -1, -1)
    # conditioned: the network sees the clean known pixels; the hook still keeps x_t's known pixels on
    # q(x_t | x_0), as in training, and pastes them exactly at the end.
    guided = job.denoiser
    if method == "conditioned":
        told = condition_on(model.denoiser, known, keep)
        guided = guide(dataclasses.replace(model, denoiser=told), job.guidance)
        if plan.options.get("learned_variance") is not None:  # the variances of the network told the known pixels
            plan = dataclasses.replace(plan, options={**plan.options, "learned_variance": told.variance_output})
    den = CountingDenoiser(guided)
    y = job.labels.to(device) if job.labels is not None else None
    if method == "repaint":
        x = repaint(
            den,
            x_T,
            plan.timesteps,
            model.schedule,
            known,
            keep,
            jump_length=ic["jump_length"],
            resamples=ic["resamples"],
            jump_last=ic["jump_last"],
            step=plan.name,
            generator=gen,
            y=y,
            **plan.options,
        )
    else:
        x = plan(den, x_T, generator=gen, y=y, hook=replace_hook(known, keep, model.schedule, gen))
    if model.autoencoder is not None:
        x = model.autoencoder.decode(x)
    res = to_uint8(x.float().cpu())
    if tuple(img.shape[-2:]) != tuple(res.shape[-2:]):
        res = resize(res, tuple(img.shape[-2:]), "bilinear").round().clamp(0, 255).to(torch.uint8)
    return paste(res, img.unsqueeze(0), keep_full.unsqueeze(0)), den.calls


def known_region(model, img: torch.Tensor, keep_full: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and its kept pixels as the sampler sees them: at the model's image size (x0 in [-1, 1], keep a
    1 x H x W bool), and for a latent model as latents and the latent cells whose every pixel is kept."""
    h, w = model.image_shape[1:]
    scaled = tuple(img.shape[-2:]) != (h, w)
    x0 = from_uint8(resize(img, (h, w), "bilinear").round().clamp(0, 255) if scaled else img.float()).to(device)
    keep = (resize(keep_full.float(), (h, w), "nearest") > 0.5) if scaled else keep_full
    keep = keep.unsqueeze(0).to(device)
    if model.autoencoder is not None:
        # The sampler fills the rest of the latent grid; the known pixels go back exactly at the end.
        f = model.autoencoder.factor
        keep = -torch.nn.functional.max_pool2d(-keep.float(), f) > 0.5
        x0 = model.autoencoder.encode(x0.unsqueeze(0))[0].to(device)
    return x0, keep


def check(cfg: DictConfig, out: Path) -> None:
    prepare(cfg, checking=True)


# What the command writes into its run dir (rundir.outputs: checked before the work starts).
OUTPUTS = ("config.yaml", "inpaint.json", "*.png")
