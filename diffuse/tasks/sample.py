"""diffuse sample: checkpoint (or the mixture oracle) -> denoiser -> sampler -> grid.png, images/, samples.npz."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import distributed
from diffuse.console import console
from diffuse.errors import UserError
from diffuse.images import from_uint8, grid_upscale, make_grid, read_png, save_png, to_uint8, write_npz
from diffuse.io import remove_stale_temps, save_resolved_config, write_json
from diffuse.pipeline.config import checking_runtime, job_of, runtime_of, to_dict
from diffuse.pipeline.resume import SAMPLING_KEYS, first_change
from diffuse.signals import StopRequest
from diffuse.validate import check_flag, check_number


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    with StopRequest() as stop:  # from the start: a signal while the model loads stops before the first batch
        return draw(cfg, out, stop)


def prepare(cfg: DictConfig, out: Path, checking: bool = False):
    """Everything draw() refuses before it writes anything: (n, batch_size, grid_n, runtime, sampling job). With
    checking=True (overrides.check_overrides, for every job of a -m sweep before the first starts) on the CPU."""
    n = check_number("n", cfg.n, minimum=1, integer=True)
    batch_size = check_number("batch_size", cfg.batch_size, minimum=1, integer=True)
    grid_n = check_number("grid_n", cfg.grid_n, minimum=0, integer=True)
    check_flag("resume", cfg.resume)
    rt = runtime_of(cfg, images=n)
    job = job_of(cfg, checking_runtime(rt) if checking else rt, n)
    if cfg.resume:
        check_resume(cfg, out)
    return n, batch_size, grid_n, rt, job


def draw(cfg: DictConfig, out: Path, stop: StopRequest) -> dict[str, Any]:
    n, batch_size, grid_n, rt, job = prepare(cfg, out)
    save_resolved_config(cfg, out)
    images_dir = out / "images"
    if cfg.save_images:
        images_dir.mkdir(parents=True, exist_ok=True)

    # Under torchrun each rank draws images rank, rank + world, ...; image i depends only on (seed, i), so the
    # set is the one a single process draws. Rank 0 gathers them for the grid and the npz.
    d = distributed.setup(rt.device.type)
    mine = list(range(d.rank, n, d.world))
    done = written_images(images_dir, mine, job.model.image_shape) if cfg.resume else {}
    todo = [i for i in mine if i not in done]
    if cfg.resume:
        console.print(f"resume: {len(done)} image(s) already written, {len(todo)} to draw")

    def write_batch(start: int, x0: torch.Tensor) -> None:
        if cfg.save_images:
            for j, img in enumerate(to_uint8(x0)):
                save_png(img, images_dir / f"{todo[start + j]:06d}.png")

    try:
        drawn = job.generate(
            todo,
            device=rt.device,
            batch_size=batch_size,
            on_batch=write_batch,
            progress=d.main,
            fixed_shape=rt.compile and not job.model.is_oracle,
            stop=stop,
        )
        # Every rank stops if one does (each has written its finished batches), before the gather they would share.
        stopped = distributed.any_rank(drawn.stopped, d, rt.device)
        if not stopped:
            local = drawn.images
            if done:  # read back exactly: to_uint8(from_uint8(u)) == u
                local = torch.cat([local, from_uint8(torch.stack(list(done.values())))])
            parts = distributed.gather((todo + list(done), local, drawn.nfe), d)
    finally:
        distributed.teardown(d)
    if not d.main:
        return {}
    if stopped:
        return stopped_early(cfg, out, n, stop)
    images = torch.empty(n, *local.shape[1:])
    for idx, imgs, _ in parts:
        images[idx] = imgs
    save_outputs(images, job.labels, out, save_images=cfg.save_images, save_npz=cfg.save_npz, grid_n=grid_n)
    if cfg.resume:
        remove_stale_temps(images_dir)  # writes an earlier run's interruption left before their rename
    nfe = max(p[2] for p in parts)  # a rank whose images were all written before drew none and counted none
    if not nfe and cfg.resume and (out / "sample.json").is_file():
        nfe = json.loads((out / "sample.json").read_text()).get("nfe", 0)  # nothing was left to draw
    info = {"n": n, **job.info(), "nfe": nfe}
    if job.labels is not None:
        info["classes"] = sorted(set(job.labels.tolist()))
    write_json(out / "sample.json", info)
    console.print(f"wrote {n} samples ({job.plan.name}, {job.plan.describe_steps()}, NFE {nfe})")
    return info


def stopped_early(cfg: DictConfig, out: Path, n: int, stop: StopRequest) -> dict[str, Any]:
    """The line of a run a signal stopped between batches: the finished images are in images/ (whole files),
    and resume=true draws only the others. grid.png, samples.npz and sample.json wait for the whole set."""
    if not cfg.save_images:
        console.print(stop.line("no image kept (save_images=false): run it again"), markup=False)
        return {"n": n, "written": 0, "stopped": True}
    images_dir = out / "images"
    written = sum((images_dir / f"{i:06d}.png").is_file() for i in range(n))
    console.print(stop.line(f"{written} of {n} images written to {images_dir}", "sample", out.resolve()), markup=False)
    return {"n": n, "written": written, "stopped": True}


def check_resume(cfg: DictConfig, out: Path) -> None:
    """resume=true continues a run dir only if it was made with the same images in mind."""
    if not cfg.save_images:
        raise UserError("resume=true needs save_images=true: the images already in images/ are what it skips")
    old_path = out / "config.yaml"
    if not old_path.is_file():
        return
    old, new = to_dict(OmegaConf.load(old_path)), to_dict(cfg)
    # runtime.precision changes the images (bf16 rounds differently); the other runtime switches do not.
    old_precision = (old.get("runtime") or {}).get("precision", old.get("precision"))
    change = first_change(old, new, SAMPLING_KEYS, ("runtime.precision", old_precision, new["runtime"]["precision"]))
    if change is not None:
        key, before, now = change
        raise UserError(
            f"resume=true but {old_path} has {key}={before!r} and this run {key}={now!r}: "
            "the images written would not be this run's (use another hydra.run.dir)"
        )


def written_images(images_dir: Path, indices: list[int], shape) -> dict[int, torch.Tensor]:
    """The images among `indices` already complete in images_dir, as uint8 C x H x W (a file that does not
    decode to the model's shape is not complete, and is drawn again)."""
    found = {}
    for i in indices:
        img = read_png(images_dir / f"{i:06d}.png")
        if img is not None and tuple(img.shape) == tuple(shape):
            found[i] = img
    return found


def save_outputs(
    images: torch.Tensor, labels: torch.Tensor | None, out: Path, *, save_images: bool, save_npz: bool, grid_n: int
) -> None:
    u8 = to_uint8(images)
    if grid_n > 0 and len(u8):
        save_png(make_grid(u8[:grid_n]), out / "grid.png", upscale=grid_upscale(u8.shape[-1]))
    if save_npz:
        write_npz(out / "samples.npz", u8, labels)


def check(cfg: DictConfig, out: Path) -> None:
    prepare(cfg, out, checking=True)


# What the command writes into its run dir (rundir.outputs: checked before the work starts).
OUTPUTS = ("images/", "config.yaml", "sample.json", "grid.png", "samples.npz", "images/*.png")
