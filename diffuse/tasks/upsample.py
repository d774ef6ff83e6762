"""diffuse upsample: a user's low-resolution images -> conditioning augmentation -> super-resolution model -> sampler ->
NAME_NN.png and grid.png (each input, enlarged, beside its results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from diffuse.console import console
from diffuse.diffusion.noise import PerSample, randn, sample_seed
from diffuse.errors import UserError
from diffuse.images import (
    from_uint8,
    grid_upscale,
    image_files,
    load_model_image,
    make_grid,
    resize,
    save_png,
    to_uint8,
)
from diffuse.io import save_resolved_config
from diffuse.pipeline.cascade import conditioned, plan_superres, run_stage
from diffuse.pipeline.config import checking_runtime, runtime_of, to_dict
from diffuse.pipeline.model import load_model
from diffuse.rundir.per_image import each_image, write_record
from diffuse.signals import StopRequest
from diffuse.validate import check_flag, check_number


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    with StopRequest() as stop:  # images are the safe points
        return upsample(cfg, out, stop)


def prepare(cfg: DictConfig, checking: bool = False):
    """Everything upsample() refuses before it writes anything: (n, seed, stage, images, runtime)."""
    if cfg.image in (None, ""):
        raise UserError("--image PATH is required: an image file, or a folder of images")
    if cfg.ckpt in (None, ""):
        raise UserError(
            "ckpt= is required: a super-resolution checkpoint (diffuse train condition=lowres) or its run dir"
        )
    n = check_number("n", cfg.n, minimum=1, integer=True)
    seed = check_number("seed", cfg.seed, integer=True)
    if cfg.steps is not None:
        check_number("steps", cfg.steps, minimum=1, integer=True)
    check_flag("resize", cfg.resize)
    files = image_files(Path(str(cfg.image)))
    rt = runtime_of(cfg, images=n * len(files))
    model = load_model(
        ckpt=cfg.ckpt,
        model=None,
        dataset=None,
        schedule=None,
        use_ema=cfg.use_ema,
        runtime=checking_runtime(rt) if checking else rt,
        verify=cfg.verify,
        superres=True,
    )
    stage = plan_superres(model, to_dict(cfg.sampler), cfg.steps, cfg.condition.aug_level, False)
    if cfg.label is not None:
        k = model.num_classes
        if not k:
            raise UserError(
                f"label={cfg.label!r} needs a class-conditional model (model.num_classes); this one is unconditional"
            )
        if isinstance(cfg.label, bool) or not isinstance(cfg.label, int) or not 0 <= cfg.label < k:
            raise UserError(f"label {cfg.label!r} is not allowed: classes are 0..{k - 1}")
    low = stage.model.lowres["from_resolution"]
    shape = (model.shape[0], low, low)
    images = []
    for p in files:
        img = load_model_image(p, shape, cfg.resize, "resize", role="takes")
        if tuple(img.shape) != shape:
            img = to_uint8(resize(from_uint8(img[None]), (low, low), "area"))[0]
        images.append((p, img))
    return n, seed, stage, images, rt


def upsample(cfg: DictConfig, out: Path, stop: StopRequest) -> dict[str, Any]:
    n, seed, stage, images, rt = prepare(cfg)
    save_resolved_config(cfg, out)
    nfe = 0

    def one(i: int):
        nonlocal nfe
        img = images[i][1]
        # result j of image i has its own stream: the same whatever else is upsampled with it
        gen = PerSample(sample_seed(seed, i), range(n))
        x_low = from_uint8(img[None]).to(rt.device).expand(n, -1, -1, -1)
        den, _ = conditioned(stage, x_low, None, gen)
        x_T = randn((n, *stage.model.shape), gen, rt.device)
        y = torch.full((n,), cfg.label, device=rt.device) if cfg.label is not None else None
        x, nfe = run_stage(den, stage.plan, x_T, gen, y, None)
        res = to_uint8(x.float().cpu())
        big = img.repeat_interleave(stage.factor, -1).repeat_interleave(
            stage.factor, -2
        )  # the input, enlarged as it is
        return res, torch.cat([big[None], res])

    paths = [p for p, _ in images]
    rows = each_image(paths, n, one, out, stop)
    if rows:
        grid = make_grid(torch.cat(rows), nrow=n + 1)
        save_png(grid, out / "grid.png", upscale=grid_upscale(stage.model.shape[-1]))
    info = {
        "images": len(rows),
        "n": n,
        "sampler": stage.plan.name,
        "steps": stage.plan.steps,
        "nfe": nfe,
        "aug_level": stage.aug_level,
        "seed": seed,
        **stage.model.source,
    }
    stopped = write_record(out, "upsample.json", info, paths, len(rows), stop, "images upsampled into")
    if stopped:
        return stopped
    console.print(
        f"upsampled {len(rows)} image(s) x {n} ({stage.plan.name}, {stage.plan.steps} steps, aug level "
        f"{stage.aug_level:g}, NFE {nfe} each)"
    )
    return info


def check(cfg: DictConfig, out: Path) -> None:
    prepare(cfg, checking=True)


# What the command writes into its run dir (rundir.outputs: checked before the work starts).
OUTPUTS = ("config.yaml", "upsample.json", "grid.png", "*.png")
