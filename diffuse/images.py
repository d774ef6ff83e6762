"""Tensor <-> image files, grids and masks. Model space is [-1, 1]; files are 8-bit.

Every image a user hands us (a dataset folder, an inpainting image or mask, samples or a reference to score) is
opened by `open_image`: size-checked from the header, decoding errors made one clear line, odd modes converted
by `convert_image` (16-bit scaled, not clipped). Sets of images to score are `ImageSource`s: an ADM-style npz,
a folder of PNGs, or a `diffuse sample` run dir.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffuse.errors import UserError
from diffuse.io import atomic_write

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounded to nearest (not truncated)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    """uint8 N x C x H x W -> one uint8 C x H' x W' grid, close to square by default."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = (
            images[i]
        )
    return grid


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = img.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def save_png(img: torch.Tensor, path: str | Path, upscale: int = 1) -> None:
    """Write a uint8 C x H x W image whole or not at all."""
    pil = to_pil(img)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    atomic_write(Path(path), lambda tmp: pil.save(tmp, format="PNG"))


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def read_png(path: str | Path):
    """A PNG this program wrote, as uint8 C x H x W, or None if it is missing or incomplete."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(-len(_PNG_END), 2)
            if f.read() != _PNG_END:
                return None
        with Image.open(path) as im:
            arr = np.array(im)
    except (OSError, ValueError, SyntaxError):
        return None
    return torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1).contiguous()


def check_size(im: Image.Image, name) -> None:
    """Refuse, from the header alone, an image PIL would warn about as a possible decompression bomb (more
    than Image.MAX_IMAGE_PIXELS, ~89M pixels): decoding it could take gigabytes."""
    w, h = im.size
    if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
        raise UserError(f"{name} is {w}x{h}: more than {Image.MAX_IMAGE_PIXELS} pixels, too large to read")


def convert_image(im: Image.Image, mode: str, name) -> Image.Image:
    """An opened image in `mode` (L or RGB). Palette, alpha (dropped), bilevel, CMYK and the like convert as PIL
    converts them; 16- and 32-bit integer images are scaled to 8 bits (PIL's own conversion clips them, which
    turns a 16-bit image white); floating-point images, whose range is anyone's guess, are refused."""
    if im.mode == "F":
        raise UserError(f"{name} is a floating-point image (mode F): save it with 8 or 16 bits per channel")
    if im.mode == "I" or im.mode.startswith("I;16"):
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    return im.convert(mode)


def is_grey(mode: str) -> bool:
    """Modes that hold one channel of intensity (alpha aside): read as 1-channel images."""
    return mode in ("1", "L", "LA", "La", "I") or mode.startswith("I;16")


def open_image(path: str | Path, mode: str, *, mask: bool = False) -> Image.Image:
    """An image file decoded in `mode` (L or RGB), or a UserError naming it. A mask must say plainly what to keep:
    one with transparent or coloured pixels is refused rather than guessed at."""
    path = Path(path)
    im = _decode(path)
    if mask:
        _check_mask(im, path)
    return _convert(im, mode, path)


def _decode(path: Path) -> Image.Image:
    """The decoded file in its own mode, detached from the file, or a UserError naming it."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    try:
        with Image.open(path) as im:
            check_size(im, path)
            im.load()
            return im.copy()  # detached from the file, which closes here
    except UserError:
        raise
    except Exception as e:  # a damaged file makes PIL raise OSError, ValueError, SyntaxError, EOFError...
        raise UserError(f"{path} is not a readable image: {type(e).__name__}") from None


def _convert(im: Image.Image, mode: str, path: Path) -> Image.Image:
    try:
        return convert_image(im, mode, path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"{path} is not a readable image: mode {im.mode} does not convert ({type(e).__name__})"
        ) from None


def _check_mask(im: Image.Image, path: Path) -> None:
    if "A" in im.mode or "a" in im.mode or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        if (alpha < 255).any():
            raise UserError(
                f"mask {path} has transparent pixels: draw it in black (keep) and white (generate), without alpha"
            )
    if not is_grey(im.mode) and im.mode != "F":
        rgb = np.asarray(im.convert("RGB"))
        if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
            raise UserError(f"mask {path} has coloured pixels: use black (keep) and white (generate)")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """A PIL image (L or RGB) as uint8 C x H x W."""
    arr = np.array(im)
    return torch.from_numpy(arr).reshape(im.size[1], im.size[0], -1).permute(2, 0, 1).contiguous()


def read_image(path: str | Path, channels: int) -> torch.Tensor:
    """An image file as uint8 C x H x W with C = channels (1: grey, 3: RGB)."""
    return to_tensor(open_image(path, "L" if channels == 1 else "RGB"))


def resize(x: torch.Tensor, hw, mode: str) -> torch.Tensor:
    """One image (C x H x W) or a batch (N x C x H x W), as float, to size hw (bilinear antialiased, or nearest)."""
    batch = x.float() if x.dim() == 4 else x.float().unsqueeze(0)
    opts = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    out = torch.nn.functional.interpolate(batch, size=hw, mode=mode, **opts)
    return out if x.dim() == 4 else out[0]


# ------------------------------------------------------------------------------------------- inpainting masks


def image_mask_pairs(image: Path, mask: Path) -> list[tuple[Path, Path]]:
    """(image, mask) files: one of each, a folder of images with one mask, or two folders matched by name."""
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


def load_image_and_mask(img_path: Path, mask_path: Path, shape, resize: bool, invert: bool):
    """(image uint8 C x H x W at its own size, keep mask 1 x H x W bool at that size) or a UserError. White (255)
    is generated, black kept (the other way round with invert); grey values are binarised at 50%."""
    c, h, w = shape
    im = open_image(img_path, "L" if c == 1 else "RGB")
    keep = load_keep_mask(mask_path, img_path, im.size, invert)
    if im.size != (w, h) and not resize:
        raise UserError(
            f"image {img_path} is {im.size[0]}x{im.size[1]} but the model makes {w}x{h} (inpaint.resize=true resizes it)"
        )
    return to_tensor(im), keep


def load_keep_mask(mask_path: Path, img_path: Path, size, invert: bool) -> torch.Tensor:
    """The keep mask (1 x H x W bool) of a mask file for an image of `size` (W, H): white (255) is generated,
    black kept (the other way round with invert); grey values are binarised at 50%, with a warning."""
    from diffuse.console import warn

    mk = open_image(mask_path, "L", mask=True)
    if mk.size != tuple(size):
        raise UserError(f"mask {mask_path} is {mk.size[0]}x{mk.size[1]} but image {img_path} is {size[0]}x{size[1]}")
    arr = np.asarray(mk)
    if ((arr > 0) & (arr < 255)).any():
        warn(f"mask {mask_path} has grey values; binarised at 50%")
    generate = arr >= 128
    if invert:
        generate = ~generate
    return torch.from_numpy(~generate).unsqueeze(0)


def image_files(image: Path, what: str = "--image") -> list[Path]:
    """One image file, or the images of a folder sorted by name."""
    if image.is_dir():
        imgs = sorted(p for p in image.iterdir() if p.suffix.lower() in IMAGE_EXT)
        if not imgs:
            raise UserError(f"{what} {image}: the folder holds no images")
        seen: dict[str, Path] = {}
        for p in imgs:  # results are written as STEM_NN.png: two inputs of one stem would overwrite each other's
            if p.stem in seen:
                raise UserError(
                    f"{what} {image}: {seen[p.stem].name} and {p.name} would both write {p.stem}_00.png: rename one"
                )
            seen[p.stem] = p
        return imgs
    return [image]


def load_model_image(path: Path, shape, fit: bool, key: str, role: str = "makes") -> torch.Tensor:
    """An image for a model making `shape` (C, H, W), as uint8 C x H x W at its own size. One of another size or
    channel count is refused unless `fit` (the caller then resizes it; grey and colour convert as PIL converts
    them); `key` names the switch that allows it, `role` what the model does with `shape` ("takes" for a
    super-resolution model's input)."""
    c, h, w = shape
    raw = _decode(Path(path))
    channels = 1 if is_grey(raw.mode) else 3
    if not fit:
        if channels != c:
            raise UserError(
                f"image {path} has {channels} channel{'s' if channels != 1 else ''} but the model {role} {c} "
                f"({key}=true converts it)"
            )
        if raw.size != (w, h):
            raise UserError(
                f"image {path} is {raw.size[0]}x{raw.size[1]} but the model {role} {w}x{h} ({key}=true resizes it)"
            )
    return to_tensor(_convert(raw, "L" if c == 1 else "RGB", Path(path)))


# ---------------------------------------------------------------------------------- images to score (diffuse eval)


@dataclass
class ImageSource:
    """uint8 images C x H x W by index, from an array in memory or files read on demand."""

    desc: str
    n: int
    shape: tuple[int, int, int]
    array: torch.Tensor | None = None  # N x C x H x W uint8
    files: list[Path] | None = None

    def batch(self, idx: list[int]) -> torch.Tensor:
        if self.array is not None:
            return self.array[idx]
        return torch.stack([read_image(self.files[i], self.shape[0]) for i in idx])


def open_images(value, what: str) -> ImageSource:
    """A samples.npz (ADM style), a folder of PNGs, or a `diffuse sample` run dir (its samples.npz, else images/)."""
    p = Path(str(value)).expanduser()
    if not p.exists():
        raise UserError(f"{what}={str(value)!r} does not exist")
    if p.is_dir():
        if (p / "samples.npz").is_file():
            return read_npz(p / "samples.npz")
        if (p / "images").is_dir() and not png_files(p):
            p = p / "images"
        return read_png_folder(p, what)
    if p.suffix.lower() == ".npz":
        return read_npz(p)
    raise UserError(f"{what}={str(value)!r} is neither a .npz file nor a folder of PNG images")


def sample_info(p: Path) -> dict:
    """sampler/steps/NFE/seed of images `diffuse sample` wrote (its sample.json beside them), else {}."""
    import json

    for cand in (p / "sample.json", p.parent / "sample.json"):  # a sample run dir; its samples.npz or images/
        if cand.is_file():
            try:
                info = json.loads(cand.read_text())
            except ValueError:
                return {}
            return {
                k: info[k] for k in ("sampler", "steps", "nfe", "seed", "ckpt", "model", "guidance_scale") if k in info
            }
    return {}


def read_npz(path: Path) -> ImageSource:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise UserError(f"{path}: no arr_0 in the npz (ADM-style images: arr_0 uint8 N x H x W x C)")
            a = z["arr_0"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(
            f"{path}: not a readable .npz file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
        ) from None
    if a.dtype != np.uint8:
        raise UserError(
            f"{path}: arr_0 is {a.dtype}; images must be uint8 N x H x W x C (as diffuse sample save_npz=true writes)"
        )
    if a.ndim == 3:  # N x H x W: grayscale without a channel axis
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or a.shape[0] < 1:
        raise UserError(f"{path}: arr_0 has shape {a.shape}; images must be uint8 N x H x W x C with C = 1 or 3")
    # Contiguous N x C x H x W: a channels-last view would send convolutions down other kernels (other rounding).
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()
    return ImageSource(f"{path}", t.shape[0], tuple(t.shape[1:]), array=t)


def write_npz(path: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """samples.npz as read_npz reads it (ADM style), whole or not at all: arr_0 the uint8 N x C x H x W `images`
    as N x H x W x C, and arr_1 their labels as int64 when there are any."""
    arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.to(torch.int64).numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.savez on a path would append ".npz" to the temp name
            np.savez(f, **arrays)

    atomic_write(Path(path), write)


def png_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == ".png" and f.is_file())


def read_png_folder(folder: Path, what: str) -> ImageSource:
    """Every *.png directly in `folder`, sorted by name, read on demand. All must have one size and channel count
    (grey modes, 16-bit included, are 1 channel; every other mode is read as RGB, alpha dropped)."""
    files = png_files(folder)
    if not files:
        raise UserError(f"{what}={str(folder)!r} holds no .png images")
    shape = None
    for f in files:
        try:
            with Image.open(f) as im:  # the header only: the pixels are read when the batch is
                s = (1 if is_grey(im.mode) else 3, im.height, im.width)
        except Exception as e:
            raise UserError(f"{f}: not a readable image ({type(e).__name__})") from None
        if shape is None:
            shape, first = s, f
        elif s != shape:
            raise UserError(
                f"{f} is {describe_shape(s)} but {first.name} is {describe_shape(shape)}: all images of {what}= must have one size and channel count"
            )
    return ImageSource(f"{folder}", len(files), shape, files=files)


def describe_shape(shape) -> str:
    c, h, w = shape
    return f"{h}x{w} with {c} channel{'s' if c != 1 else ''}"


def grid_upscale(h: int) -> int:
    """Small images are shown enlarged (nearest neighbour) so that a grid is readable: at least ~64 px tiles."""
    return max(1, 64 // h)
