"""diffuse inpaint: image + mask -> denoiser -> known-region constraint -> sampler -> results and strips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from diffuse.diffusion.inpainting import (
    METHODS, condition_on, paste, repaint, repaint_nfe, replace_hook, require_mask_conditioned,
)
from diffuse.diffusion.noise import PerSample, randn
from diffuse.diffusion.samplers import STEPS
from diffuse.errors import UserError
from diffuse.images import check_size, convert_image, from_uint8, make_grid, save_png, to_uint8
from diffuse.tasks.common import autocast_dtype, check_number, console, err_console, pick_device, save_resolved_config, to_dict, write_json
from diffuse.tasks.sample import CountingDenoiser, load_denoiser, sampler_call

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


_GREY_MODES = {"1", "L", "LA", "La", "I", "F"}


def _open(path: Path, mode: str, mask: bool = False) -> Image.Image:
    """An image (or a mask) file in `mode`. Odd modes convert (images.convert_image); a mask must say plainly
    what to keep: one with transparent or coloured pixels is refused rather than guessed at."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    try:
        with Image.open(path) as im:
            check_size(im, path)
            im.load()
            im = im.copy()  # detached from the file, which closes here
    except UserError:
        raise
    except Exception as e:  # a damaged file makes PIL raise OSError, ValueError, SyntaxError, EOFError...
        raise UserError(f"{path} is not a readable image: {type(e).__name__}") from None
    if mask:
        _check_mask(im, path)
    try:
        return convert_image(im, mode, path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} is not a readable image: mode {im.mode} does not convert ({type(e).__name__})") from None


def _check_mask(im: Image.Image, path: Path) -> None:
    if "A" in im.mode or "a" in im.mode or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        if (alpha < 255).any():
            raise UserError(f"mask {path} has transparent pixels: draw it in black (keep) and white (generate), without alpha")
    if im.mode not in _GREY_MODES and not im.mode.startswith("I;16"):
        rgb = np.asarray(im.convert("RGB"))
        if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
            raise UserError(f"mask {path} has coloured pixels: use black (keep) and white (generate)")


def _pairs(image: Path, mask: Path) -> list[tuple[Path, Path]]:
    if image.is_dir():
        imgs = sorted(p for p in image.iterdir() if p.suffix.lower() in IMAGE_EXT)
        if not imgs:
            raise UserError(f"--image {image}: the folder holds no images")
        if mask.is_dir():
            out = []
            for p in imgs:
                m = mask / p.name
                if not m.exists():
                    raise UserError(f"--mask {mask}: no mask named {p.name} for image {p}")
                out.append((p, m))
            return out
        return [(p, mask) for p in imgs]
    if mask.is_dir():
        raise UserError(f"--mask {mask} is a folder but --image {image} is one file")
    return [(image, mask)]


def load_pair(img_path: Path, mask_path: Path, shape, resize: bool, invert: bool):
    """(image uint8 C x H x W at its own size, keep mask 1 x H x W bool at that size) or a UserError."""
    c, h, w = shape
    im = _open(img_path, "L" if c == 1 else "RGB")
    mk = _open(mask_path, "L", mask=True)
    if mk.size != im.size:
        raise UserError(f"mask {mask_path} is {mk.size[0]}x{mk.size[1]} but image {img_path} is {im.size[0]}x{im.size[1]}")
    if im.size != (w, h) and not resize:
        raise UserError(f"image {img_path} is {im.size[0]}x{im.size[1]} but the model makes {w}x{h} (inpaint.resize=true resizes it)")
    arr = np.asarray(mk)
    if ((arr > 0) & (arr < 255)).any():
        err_console.print(f"warning: mask {mask_path} has grey values; binarised at 50%", markup=False)
    generate = arr >= 128
    if invert:
        generate = ~generate
    img = torch.from_numpy(np.array(im)).reshape(im.size[1], im.size[0], -1).permute(2, 0, 1).contiguous()
    return img, torch.from_numpy(~generate).unsqueeze(0)


def _resize(x: torch.Tensor, hw, mode: str) -> torch.Tensor:
    """One image (C x H x W) or a batch (N x C x H x W), as float, to size hw."""
    batch = x.float() if x.dim() == 4 else x.float().unsqueeze(0)
    opts = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    out = torch.nn.functional.interpolate(batch, size=hw, mode=mode, **opts)
    return out if x.dim() == 4 else out[0]


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    if not cfg.get("image") or not cfg.get("mask"):
        raise UserError("--image PATH and --mask PATH are both required")
    n = check_number("n", cfg.n, minimum=1, integer=True)
    seed = check_number("seed", cfg.seed, integer=True)
    ic = to_dict(cfg.inpaint)
    method = ic.get("method")
    if method not in METHODS:
        raise UserError(f"inpaint.method={method!r} is not allowed: choose one of {', '.join(METHODS)}")
    device = pick_device(cfg.get("device", "auto"))
    den, shape, schedule, clip_default, _, source = load_denoiser(cfg, device, autocast_dtype(cfg.get("precision", "auto"), device))
    if method == "conditioned":
        require_mask_conditioned(den)
    sampler_cfg = to_dict(cfg.sampler)
    steps = check_number("steps", cfg.steps, minimum=1, integer=True)
    fn, timesteps, kwargs = sampler_call(sampler_cfg, steps, schedule, clip_default)
    jl, rs, jlast = ic.get("jump_length"), ic.get("resamples"), ic.get("jump_last", 1.0)
    if method == "repaint":  # check the options before anything is written
        repaint_nfe(steps, jl, rs, jlast)
        if sampler_cfg.get("name") not in STEPS:
            raise UserError(f"sampler={sampler_cfg.get('name')!r} cannot drive repaint: choose one of {', '.join(sorted(STEPS))}")
    nfe = None
    pairs = _pairs(Path(str(cfg.image)), Path(str(cfg.mask)))
    loaded = [load_pair(i, m, shape, bool(ic.get("resize", True)), bool(ic.get("mask_invert", False))) for i, m in pairs]

    save_resolved_config(cfg, out)
    c, h, w = shape
    results = []
    for idx, ((img_path, _), (img, keep_full)) in enumerate(zip(pairs, loaded)):
        H, W = img.shape[-2:]
        if keep_full.all():
            err_console.print(f"warning: mask for {img_path} keeps every pixel: nothing to generate, the input is returned", markup=False)
            res = img.unsqueeze(0).expand(n, -1, -1, -1).clone()
        else:
            x0 = from_uint8(_resize(img, (h, w), "bilinear").round().clamp(0, 255) if (H, W) != (h, w) else img.float()).to(device)
            keep = (_resize(keep_full.float(), (h, w), "nearest") > 0.5) if (H, W) != (h, w) else keep_full
            keep = keep.unsqueeze(0).to(device)
            gen = PerSample(seed, [idx * n + j for j in range(n)])
            x_T = randn((n, *shape), gen, device)
            known = x0.unsqueeze(0).expand(n, -1, -1, -1)
            # conditioned: the network sees the clean known pixels; the hook still keeps x_t's known pixels on
            # q(x_t | x_0), as in training, and pastes them exactly at the end.
            d = CountingDenoiser(condition_on(den, known, keep) if method == "conditioned" else den)
            if method == "repaint":
                x = repaint(d, x_T, timesteps, schedule, known, keep, jump_length=jl, resamples=rs, jump_last=jlast,
                            step=sampler_cfg.get("name"), generator=gen, **kwargs)
            else:
                x = fn(d, x_T, timesteps, schedule, generator=gen, hook=replace_hook(known, keep, schedule, gen), **kwargs)
            nfe = d.calls
            res = to_uint8(x.float().cpu())
            if (H, W) != (h, w):
                res = _resize(res, (H, W), "bilinear").round().clamp(0, 255).to(torch.uint8)
            # the known pixels are the input's, exactly, at the input's size
            res = paste(res, img.unsqueeze(0), keep_full.unsqueeze(0))
        stem = img_path.stem
        for j in range(n):
            save_png(res[j], out / f"{stem}_{j:02d}.png")
        masked = torch.where(keep_full, img, torch.full_like(img, 255))
        save_png(make_grid(torch.cat([img.unsqueeze(0), masked.unsqueeze(0), res]), nrow=n + 2), out / f"{stem}_strip.png")
        results.append(str(img_path))
    if nfe is None:  # every mask kept everything: no denoiser call was needed
        nfe = 0
    info = {"method": method, "images": results, "n": n, "steps": steps, "nfe": nfe, "seed": seed, **source}
    if method == "repaint":
        info.update(jump_length=jl, resamples=rs, jump_last=jlast)
    write_json(out / "inpaint.json", info)
    console.print(f"inpainted {len(results)} image(s) x {n} ({method}, {steps} steps, NFE {nfe} per image batch)")
    return info
