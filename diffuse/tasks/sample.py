"""diffuse sample: checkpoint (or the mixture oracle) -> denoiser -> sampler -> grid.png, images/, samples.npz."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from diffuse import distributed
from diffuse.checkpoint import atomic_write, load_checkpoint, remove_stale_temps, resolve_ckpt_path
from diffuse.diffusion.noise import PerSample, randn
from diffuse.diffusion.prediction import NetworkDenoiser
from diffuse.diffusion.samplers import get_sampler
from diffuse.diffusion.timesteps import sampler_timesteps
from diffuse.errors import UserError
from diffuse.fastpath import check_attention, compile_network, set_attention, switch
from diffuse.images import from_uint8, grid_upscale, make_grid, read_png, save_png, to_uint8
from diffuse.tasks.common import (
    autocast_dtype,
    build_schedule,
    check_number,
    console,
    pick_device,
    save_resolved_config,
    to_dict,
    write_json,
)

# Keys of a sampler config that are not arguments of the sampler function itself.
_SAMPLER_META = {"name", "spacing", "default_steps", "clip_x0", "rho"}


def resolve_steps(sampler_cfg: dict, steps: Optional[int], T: int) -> int:
    if steps is None:
        steps = sampler_cfg.get("default_steps") or T
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UserError(f"steps={steps!r} is not allowed: it must be an integer between 1 and {T}")
    return steps


def sampler_call(sampler_cfg: dict, steps: int, schedule, clip_default: bool):
    """(sampler function, timesteps, keyword arguments) from a sampler config; unknown options are refused."""
    name = sampler_cfg.get("name")
    fn = get_sampler(name)
    timesteps = sampler_timesteps(schedule, steps, sampler_cfg.get("spacing", "trailing"), sampler_cfg.get("rho", 7.0))
    params = set(inspect.signature(fn).parameters)
    kwargs = {}
    for key, val in sampler_cfg.items():
        if key in _SAMPLER_META:
            continue
        if key not in params or key in ("denoiser", "x_T", "timesteps", "schedule", "generator", "y", "hook"):
            raise UserError(f"sampler.{key} is not an option of sampler {name}")
        kwargs[key] = val
    clip = sampler_cfg.get("clip_x0", "auto")
    kwargs["clip_x0"] = clip_default if clip in ("auto", None) else bool(clip)
    # Samplers check their options on entry: a call over no timesteps validates them before any work is done.
    fn(None, torch.zeros(1), timesteps[:0], schedule, **kwargs)
    return fn, timesteps, kwargs


class CountingDenoiser:
    """A denoiser that counts its calls: the honest number of network evaluations (NFE) a sampler made.
    One call is one batched forward pass (with classifier-free guidance, cond and null share it)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x_t, t, y=None):
        self.calls += 1
        return self.denoiser(x_t, t, y)


def generate(
    denoiser,
    *,
    n: int,
    shape: tuple[int, ...],
    schedule,
    sampler_cfg: dict,
    steps: int,
    seed: int,
    device: torch.device,
    batch_size: int,
    clip_default: bool,
    labels: Optional[torch.Tensor] = None,
    indices: Optional[list[int]] = None,
    on_batch=None,
    progress: bool = True,
    stats: Optional[dict] = None,
    keep: bool = True,
    fixed_shape: bool = False,
) -> torch.Tensor:
    """Draw images `indices` (default 0..n-1), each from its own (seed, i) noise stream; returns them in
    model space on the CPU. `on_batch(first_index, images)` is called as each batch completes; `stats["nfe"]`
    receives the number of denoiser calls per sample (counted on the first batch). keep=False returns nothing
    and holds no images: for callers that consume each batch in on_batch (evaluation of 50k samples).
    `fixed_shape` pads a short last batch to batch_size with copies of its last image (dropped after), so that a
    compiled network / its CUDA graph sees one shape only; images are drawn independently, so the padding
    changes none of them."""
    fn, timesteps, kwargs = sampler_call(sampler_cfg, steps, schedule, clip_default)
    indices = list(range(n)) if indices is None else indices
    outs = []
    with _progress(progress) as bar:
        task = bar.add_task(f"sampling ({sampler_cfg.get('name')}, {steps} steps)", total=len(indices))
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            pad = batch_size - len(idx) if fixed_shape else 0
            gen = PerSample(seed, idx + idx[-1:] * pad)
            x_T = randn((len(idx) + pad, *shape), gen, device)
            y = labels[start : start + len(idx)] if labels is not None else None
            y = torch.cat([y, y[-1:].expand(pad)]).to(device) if y is not None else None
            counter = CountingDenoiser(denoiser)
            x0 = fn(counter, x_T, timesteps, schedule, generator=gen, y=y, **kwargs)[: len(idx)].float().cpu()
            if stats is not None and "nfe" not in stats:
                stats["nfe"] = counter.calls
            if keep:
                outs.append(x0)
            if on_batch is not None:
                on_batch(start, x0)
            bar.advance(task, len(idx))
    return torch.cat(outs) if outs else torch.empty(0, *shape)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def fast_paths(cfg: DictConfig, device: torch.device) -> dict:
    """Sampling's fast-path switches (see diffuse.fastpath), resolved for `device`. compile: auto compiles on
    CUDA when n >= 1024 images (an FID-sized run amortises the minute it takes; a 64-image grid does not);
    cuda_graphs: auto replays the compiled forward as a CUDA graph whenever it compiles on CUDA."""
    cuda = device.type == "cuda"
    n = cfg.get("n", 0)
    compiled = switch("compile", cfg.get("compile", "auto"), cuda and isinstance(n, int) and n >= 1024)
    return {
        "channels_last": switch("channels_last", cfg.get("channels_last", "auto"), cuda),
        "attention": check_attention("attention", cfg.get("attention", "sdpa")),
        "compile": compiled,
        "cuda_graphs": switch("cuda_graphs", cfg.get("cuda_graphs", "auto"), cuda and compiled) and compiled,
    }


def fast_network(net, device: torch.device, fast: dict):
    """`net` on `device` for inference with the fast paths in `fast`; returns what to call (maybe compiled)."""
    net = set_attention(net, fast["attention"]).to(device).eval().requires_grad_(False)
    if fast["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    if not fast["compile"]:
        return net
    return compile_network(net, "reduce-overhead" if fast["cuda_graphs"] else "default")


def load_denoiser(cfg: DictConfig, device: torch.device, dtype=None):
    """(denoiser, shape, schedule, clip default, num_classes, description) from ckpt= or model=oracle."""
    model_cfg = to_dict(cfg.get("model"))
    if cfg.get("ckpt") in (None, "") and model_cfg and model_cfg.get("arch") == "oracle":
        from diffuse.data import build_mixture
        from diffuse.diffusion.oracle import GMMDenoiser

        ds = to_dict(cfg.get("dataset")) or {"name": "gmm", "path": None, "resolution": 8, "channels": 3}
        if ds.get("name") != "gmm":
            raise UserError(f"model=oracle needs dataset=gmm (got dataset={ds.get('name')!r})")
        schedule = build_schedule(cfg.get("schedule") or {"kind": "linear", "T": 1000})
        mixture = build_mixture(DictConfig(ds))
        return GMMDenoiser(mixture, schedule), mixture.shape, schedule, False, mixture.K, {"model": "oracle"}
    if cfg.get("ckpt") in (None, "") and model_cfg:
        raise UserError(f"model={model_cfg.get('arch')!r} without ckpt=: only model=oracle samples without a checkpoint")
    path = resolve_ckpt_path(cfg.get("ckpt"))
    ckpt = load_checkpoint(path)
    net, schedule, prediction, meta = network_from_checkpoint(ckpt, use_ema=bool(cfg.get("use_ema", True)))
    if cfg.get("schedule"):
        raise UserError("schedule= cannot be changed when sampling a checkpoint: it is the one the model was trained with")
    runner = fast_network(net, device, fast_paths(cfg, device))
    if (ckpt.config.get("objective") or {}).get("mask_training"):
        from diffuse.diffusion.inpainting import MaskConditioned

        # A mask-conditioned network: told that nothing is known it samples; inpaint gives it the known pixels.
        den = NetworkDenoiser(MaskConditioned(runner), prediction, schedule, autocast_dtype=dtype)
    else:
        den = NetworkDenoiser(runner, prediction, schedule, autocast_dtype=dtype)
    shape = (net.out_channels, net.resolution, net.resolution)
    return den, shape, schedule, meta.get("is_8bit", True), net.num_classes, {"ckpt": str(path), "step": ckpt.step}


def network_from_checkpoint(ckpt, use_ema: bool = True):
    from diffuse.nets import build_network

    conf = ckpt.config
    if not isinstance(conf, dict) or "model" not in conf or "schedule" not in conf:
        raise UserError("checkpoint config lacks model/schedule: not a diffuse training checkpoint")
    net = build_network(conf["model"])
    weights = ckpt.ema if (use_ema and ckpt.ema) else ckpt.model
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint weights do not fit its model config: {first}") from None
    schedule = build_schedule(conf["schedule"])
    prediction = (conf.get("objective") or {}).get("prediction", "eps")
    return net, schedule, prediction, conf.get("data", {})


def resolve_labels(cfg: DictConfig, n: int, num_classes: Optional[int]) -> Optional[torch.Tensor]:
    """The label of each image: `label=k` for all, `labels=[...]` cycled, else all classes in turn; None for an
    unconditional model (which refuses label/labels)."""
    label, labels = cfg.get("label"), cfg.get("labels")
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


def sample_labels(cfg: DictConfig, n: int, num_classes: Optional[int], source: dict) -> Optional[torch.Tensor]:
    """resolve_labels, except that the oracle, unguided and without label=/labels=, samples the whole mixture."""
    labels = resolve_labels(cfg, n, num_classes)
    unguided = float((to_dict(cfg.get("guidance")) or {}).get("scale", 1.0)) == 1.0
    if source.get("model") == "oracle" and cfg.get("label") is None and cfg.get("labels") is None and unguided:
        labels = None  # the oracle is ground truth: without a label it samples the mixture, at its weights
    return labels


def guide(den, cfg: DictConfig, num_classes: Optional[int], schedule):
    """The denoiser with classifier-free guidance from the `guidance` group, or unchanged."""
    g = to_dict(cfg.get("guidance")) or {"name": "none"}
    name = g.get("name", "none")
    if name not in ("none", "cfg"):
        raise UserError(f"guidance={name!r} is not allowed: choose one of cfg, none")
    scale, interval, rescale = g.get("scale", 1.0), g.get("interval"), g.get("rescale", 0.0)
    if name == "none":
        return den
    from diffuse.diffusion.guidance import cfg_denoiser, check_guidance

    check_guidance(scale, interval, rescale, schedule)
    if not num_classes:
        if scale != 1.0:
            raise UserError(f"guidance.scale={scale} needs a class-conditional model (model.num_classes); this one is unconditional")
        return den
    return cfg_denoiser(den, scale, null_label=num_classes, interval=interval, rescale=rescale, schedule=schedule)


def save_outputs(images: torch.Tensor, labels: Optional[torch.Tensor], out: Path, *, save_images: bool, save_npz: bool, grid_n: int) -> None:
    u8 = to_uint8(images)
    if grid_n > 0 and len(u8):
        save_png(make_grid(u8[:grid_n]), out / "grid.png", upscale=grid_upscale(u8.shape[-1]))
    if save_npz:
        arrays = {"arr_0": u8.permute(0, 2, 3, 1).numpy()}
        if labels is not None:
            arrays["arr_1"] = labels.to(torch.int64).numpy()
        atomic_write(out / "samples.npz", lambda tmp: _savez(tmp, arrays))


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:  # np.savez on a path would append ".npz" to the temp name
        np.savez(f, **arrays)


# What must be the same for resume=true to keep the images an earlier run wrote (n and batch_size may change:
# image i depends only on (seed, i)).
_RESUME_KEYS = ("ckpt", "seed", "label", "labels", "use_ema", "sampler", "steps", "guidance", "model", "dataset", "schedule", "precision")


def check_resume(cfg: DictConfig, out: Path) -> None:
    """resume=true continues a run dir only if it was made with the same images in mind."""
    from omegaconf import OmegaConf

    if not cfg.get("save_images", True):
        raise UserError("resume=true needs save_images=true: the images already in images/ are what it skips")
    old_path = out / "config.yaml"
    if not old_path.is_file():
        return
    old = to_dict(OmegaConf.load(old_path))
    new = to_dict(cfg)
    for key in _RESUME_KEYS:
        if old.get(key) != new.get(key):
            raise UserError(f"resume=true but {old_path} has {key}={old.get(key)!r} and this run {key}={new.get(key)!r}: "
                            "the images written would not be this run's (use another hydra.run.dir)")


def written_images(images_dir: Path, indices: list[int], shape) -> dict[int, torch.Tensor]:
    """The images among `indices` already complete in images_dir, as uint8 C x H x W (a file that does not
    decode to the model's shape is not complete, and is drawn again)."""
    found = {}
    for i in indices:
        img = read_png(images_dir / f"{i:06d}.png")
        if img is not None and tuple(img.shape) == tuple(shape):
            found[i] = img
    return found


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    n = check_number("n", cfg.n, minimum=1, integer=True)
    batch_size = check_number("batch_size", cfg.batch_size, minimum=1, integer=True)
    seed = check_number("seed", cfg.seed, integer=True)
    grid_n = check_number("grid_n", cfg.get("grid_n", 64), minimum=0, integer=True)
    device = pick_device(cfg.get("device", "auto"))
    dtype = autocast_dtype(cfg.get("precision", "auto"), device)
    den, shape, schedule, clip_default, num_classes, source = load_denoiser(cfg, device, dtype)
    sampler_cfg = to_dict(cfg.sampler)
    steps = resolve_steps(sampler_cfg, cfg.get("steps"), schedule.T)
    sampler_call(sampler_cfg, steps, schedule, clip_default)  # validate before anything is written
    labels = sample_labels(cfg, n, num_classes, source)
    den = guide(den, cfg, num_classes, schedule)
    resume = cfg.get("resume", False)
    if not isinstance(resume, bool):
        raise UserError(f"resume={resume!r} is not allowed: true or false")
    if resume:
        check_resume(cfg, out)

    save_resolved_config(cfg, out)
    images_dir = out / "images"
    if cfg.get("save_images", True):
        images_dir.mkdir(parents=True, exist_ok=True)

    # Under torchrun each rank draws images rank, rank + world, ...; image i depends only on (seed, i), so the
    # set is the one a single process draws. Rank 0 gathers them for the grid and the npz.
    d = distributed.setup(device.type)
    mine = list(range(d.rank, n, d.world))
    done = written_images(images_dir, mine, shape) if resume else {}
    todo = [i for i in mine if i not in done]
    if resume:
        console.print(f"resume: {len(done)} image(s) already written, {len(todo)} to draw")

    def write_batch(start: int, x0: torch.Tensor) -> None:
        if cfg.get("save_images", True):
            for j, img in enumerate(to_uint8(x0)):
                save_png(img, images_dir / f"{todo[start + j]:06d}.png")

    stats: dict = {}
    try:
        local = generate(
            den, stats=stats, n=n, shape=shape, schedule=schedule, sampler_cfg=sampler_cfg, steps=steps, seed=seed,
            device=device, batch_size=batch_size, clip_default=clip_default, on_batch=write_batch, indices=todo,
            labels=labels[todo] if labels is not None else None, progress=d.main,
            fixed_shape=source.get("model") != "oracle" and fast_paths(cfg, device)["compile"],
        )
        if done:  # read back exactly: to_uint8(from_uint8(u)) == u
            local = torch.cat([local, from_uint8(torch.stack(list(done.values())))])
        parts = distributed.gather((todo + list(done), local), d)
    finally:
        distributed.teardown(d)
    if not d.main:
        return {}
    images = torch.empty(n, *local.shape[1:])
    for idx, imgs in parts:
        images[idx] = imgs
    save_outputs(images, labels, out, save_images=cfg.get("save_images", True), save_npz=bool(cfg.get("save_npz", False)), grid_n=grid_n)
    if resume:
        remove_stale_temps(images_dir)  # writes an earlier run's interruption left before their rename
    nfe = stats.get("nfe", 0)
    if "nfe" not in stats and resume and (out / "sample.json").is_file():
        nfe = json.loads((out / "sample.json").read_text()).get("nfe", 0)  # nothing was left to draw
    info = {"n": n, "sampler": sampler_cfg.get("name"), "steps": steps, "nfe": nfe, "seed": seed, **source}
    if labels is not None:
        info["guidance_scale"] = float((to_dict(cfg.get("guidance")) or {}).get("scale", 1.0))
        info["classes"] = sorted(set(labels.tolist()))
    write_json(out / "sample.json", info)
    console.print(f"wrote {n} samples ({sampler_cfg.get('name')}, {steps} steps, NFE {nfe})")
    return info
