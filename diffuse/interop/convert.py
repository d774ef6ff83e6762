"""`diffuse convert`: pretrained weights of another toolkit as a diffuse checkpoint, each format and each diffusers
class by its own importer.

    diffuse convert --from diffusers PATH_OR_DIR --out FILE.safetensors
    diffuse convert --from improved-diffusion|guided-diffusion MODEL.safetensors --out FILE.safetensors OPTIONS

A diffusers folder says what it holds in its config.json (_class_name): a UNet2DModel (diffusers_unet.py), an
AutoencoderKL (diffusers_vae.py) or an AutoencoderTiny (taesd.py). An ADM state dict does not: what its weights
cannot tell comes as options (adm.py). --out is checked before anything is read.
"""

from __future__ import annotations

from pathlib import Path

from diffuse.errors import UserError
from diffuse.interop import adm, diffusers_unet, diffusers_vae, taesd
from diffuse.interop.weights import check_out, find_files, read_json

FORMATS = ("diffusers", *adm.FORMATS)


def convert(fmt: str, src: str | Path, out: str | Path, options: dict | None = None, *, force: bool = False) -> Path:
    """Write the diffuse checkpoint of `src`, in format `fmt`, to `out`; returns `out`. `options`: adm.OPTIONS'
    values (None: not given), which only the ADM formats take; `force`: an existing `out` may be replaced."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if fmt not in FORMATS:
        raise UserError(f"--from {fmt!r} is not allowed: choose {', '.join(FORMATS)}")
    if fmt in adm.FORMATS:
        return adm.convert_adm(src, out, given, fmt, force=force)
    if given:
        raise UserError(
            f"{adm.flag(next(iter(given)))} is an option of --from {' and '.join(adm.FORMATS)}: "
            "a diffusers folder's config.json says what it sets"
        )
    return convert_diffusers(src, out, force=force)


def convert_diffusers(src: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the diffuse checkpoint of the diffusers model at `src` to `out`; returns `out`."""
    out = Path(out).expanduser()
    check_out(out, src, force)
    config_path, weights_path, sched_path = find_files(src)
    dcfg = read_json(config_path)
    if dcfg.get("_class_name") == "AutoencoderKL":
        return diffusers_vae.convert_autoencoder(config_path, weights_path, dcfg, src, out)
    if dcfg.get("_class_name") == "AutoencoderTiny":  # TAESD: another network (diffuse/nets/taesd.py)
        return taesd.convert_taesd(config_path, weights_path, dcfg, src, out)
    return diffusers_unet.convert_unet(config_path, weights_path, sched_path, dcfg, src, out)
