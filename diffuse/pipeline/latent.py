"""Latent diffusion as a wrapper around the pixel pipeline (Rombach et al. 2022): a diffusion model of
z = scale_factor * E(x), where E is the posterior mean of a KL autoencoder's encoder and scale_factor = 1 / std(E(x))
over the training data, so that the diffusion model sees unit-variance latents whatever the autoencoder. Images
are encoded once before training (cached, keyed by the dataset and the autoencoder's hash) and samples decoded
after the sampler, D(z / scale_factor); nothing in between knows.

A latent checkpoint's config carries `autoencoder`: the path and hash of the autoencoder's file and the scale
factor. Sampling loads that file and refuses one whose hash differs (retrained in place, replaced): its latent
space would not be the one the model learnt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffuse.checkpoint import HASH_KEY, check_weights, load_checkpoint, read_metadata, resolve_ckpt_path
from diffuse.errors import UserError
from diffuse.io import atomic_write
from diffuse.nets import AUTOENCODERS

ENCODE_BATCH = 256


@dataclass
class LatentCodec:
    """An autoencoder's network and the latent scale: encode(x) -> scaled latents, decode(z) -> images in [-1, 1]."""

    net: nn.Module
    path: str
    hash: str
    scale_factor: float = 1.0
    autocast: torch.dtype | None = None
    # A converted KL VAE's diffusers shift_factor (SD3, Flux): its latents are centred by it before they are
    # scaled, as diffusers' pipelines do (TAESD's network applies its own).
    shift: float = 0.0

    @property
    def factor(self) -> int:
        return self.net.factor

    def latent_shape(self, channels: int, resolution: int) -> tuple[int, int, int]:
        return self.net.latent_channels, resolution // self.net.factor, resolution // self.net.factor

    def image_shape(self, latent_resolution: int) -> tuple[int, int, int]:
        return self.net.out_channels, latent_resolution * self.net.factor, latent_resolution * self.net.factor

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def encode_unscaled(self, x: torch.Tensor) -> torch.Tensor:
        dev = self._device()
        with torch.autocast(dev.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.net.encode(x.to(dev))
            # A KL autoencoder gives (mean, logvar), whose mean is the latent; TAESD gives its latents themselves.
            return (out if getattr(self.net, "deterministic", False) else out[0]).float() - self.shift

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_unscaled(x) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dev = self._device()
        with torch.autocast(dev.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.net.decode(z.to(dev) / self.scale_factor + self.shift).float().clamp(-1.0, 1.0)

    def record(self) -> dict:
        """What a latent model's checkpoint says of its autoencoder."""
        return {
            "path": self.path,
            "hash": self.hash,
            "scale_factor": self.scale_factor,
            "factor": self.factor,
            "latent_channels": self.net.latent_channels,
        }


def autoencoder_header(value: Any, key: str = "autoencoder") -> tuple[Path, dict, str]:
    """(file, its config, its hash) of an autoencoder checkpoint (a file or a train-ae run dir), from its header
    alone: what a training run checks before it loads any data."""
    path = resolve_ckpt_path(value, key=key)
    meta = read_metadata(path)
    try:
        config = json.loads(meta.get("diffuse.config", "null"))
    except ValueError:
        config = None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or model.get("arch") not in AUTOENCODERS:
        what = f"model.arch={model.get('arch')!r}" if isinstance(model, dict) else "no model config"
        raise UserError(
            f"{key}={value}: {path} is not an autoencoder checkpoint ({what}; make one with diffuse train-ae)"
        )
    if HASH_KEY not in meta:
        raise UserError(f"{key}={value}: {path} carries no hash, and a latent model records its autoencoder by hash")
    from diffuse.nets import complete_config

    # The header is user input: its config is checked and completed before any key of it is read.
    return path, complete_config(model, where=str(path), keys={}), meta[HASH_KEY]


def load_autoencoder(
    value: Any,
    *,
    expected: str | None = None,
    scale_factor: float = 1.0,
    device=None,
    autocast=None,
    use_ema: bool = True,
    key: str = "autoencoder",
) -> LatentCodec:
    """The autoencoder at `value`; `expected`: the hash a latent model recorded, a different one is refused."""
    from diffuse.nets import build_network

    path, model, digest = autoencoder_header(value, key)
    if expected is not None and digest != expected:
        raise UserError(
            f"{key}={value}: {path} is not the autoencoder this model was trained with (hash {digest[:12]}, "
            f"the model records {expected[:12]}): give the one it was trained on with autoencoder=FILE"
        )
    ckpt = load_checkpoint(path)
    weights = ckpt.ema if (use_ema and ckpt.ema) else ckpt.model
    check_weights(weights, str(path), "ema." if weights is ckpt.ema else "model.")
    shift = (ckpt.config.get("source") or {}).get("shift_factor") if model["arch"] == "autoencoder" else None
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not abs(shift) < 1e6):
        raise UserError(f"{key}={value}: its source.shift_factor={shift!r} is not allowed: a finite number (or null)")
    net = build_network(model, where=str(path), keys={}, weights=weights)
    net.load_state_dict(weights)
    net = net.eval().requires_grad_(False)
    if device is not None:
        net = net.to(device)
    return LatentCodec(net, str(path.resolve()), digest, scale_factor, autocast, float(shift or 0.0))


def check_latent_data(codec_model: dict, channels: int, resolution: int, where: str) -> tuple[int, int]:
    """(latent channels, latent resolution) for images of `channels` x `resolution`, or one line if they do not fit
    the autoencoder (its config `codec_model`)."""
    factor = latent_factor(codec_model)
    if channels != codec_model["in_channels"]:
        raise UserError(
            f"dataset.channels={channels} does not fit the autoencoder {where}, which encodes "
            f"{codec_model['in_channels']}-channel images"
        )
    if resolution % factor:
        raise UserError(
            f"dataset.resolution={resolution} is not allowed with the autoencoder {where}: it downsamples by "
            f"{factor}, so the resolution must be a multiple of {factor}"
        )
    return codec_model["latent_channels"], resolution // factor


def latent_factor(codec_model: dict) -> int:
    """The downsampling factor of the autoencoder a (checked) config describes, from the config alone."""
    levels = codec_model["encoder_blocks"] if codec_model["arch"] == "taesd" else codec_model["ch_mult"]
    return 2 ** (len(levels) - 1)


def cache_key(dataset_cfg: dict, ae_hash: str) -> str:
    blob = json.dumps({"dataset": dataset_cfg, "autoencoder": ae_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_dataset(data, codec: LatentCodec, dataset_cfg: dict, cache_dir: Path, dist, report=print):
    """The latents E(x) (unscaled, float32, on the CPU) of every image of `data`, in its order: read from
    cache_dir/latents-KEY.safetensors when an earlier run left them, else encoded (under torchrun each rank encodes
    images rank, rank + world, ...; the parts are gathered) and written there by rank 0."""
    from safetensors.torch import load_file, save_file

    from diffuse import distributed

    key = cache_key(dataset_cfg, codec.hash)
    path = cache_dir / f"latents-{key}.safetensors"
    meta = {
        "dataset": json.dumps(dataset_cfg, sort_keys=True),
        "autoencoder": codec.hash,
        "autoencoder_path": codec.path,
    }
    if path.is_file():
        try:
            if read_metadata(path) == meta:
                z = load_file(str(path))["latents"]
                if z.shape[0] == len(data):
                    report(f"latents read from {path}")
                    return z
        except (UserError, KeyError, OSError, RuntimeError):
            pass  # a damaged or foreign cache file is encoded again and replaced
    mine = torch.arange(dist.rank, len(data), dist.world)
    parts = []
    for s in range(0, len(mine), ENCODE_BATCH):
        x, _ = data.batch(mine[s : s + ENCODE_BATCH])
        parts.append(codec.encode_unscaled(x).cpu())
    local = torch.cat(parts) if parts else torch.empty(0)
    gathered = distributed.gather(local, dist)
    c, h, w = gathered[0].shape[1:]
    z = torch.empty(len(data), c, h, w)
    for rank, part in enumerate(gathered):
        z[rank :: dist.world] = part
    if dist.main:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a place even root cannot write (/proc): the up-front check cannot see that
            raise UserError(
                f"latent_cache={cache_dir}: the encoded data cannot be kept there ({e.strerror}); give "
                "latent_cache=DIR on a writable disk"
            ) from None
        atomic_write(path, lambda tmp: save_file({"latents": z.contiguous()}, str(tmp), metadata=meta))
        report(f"encoded {len(data)} images to latents {c}x{h}x{w}: {path}")
    return z


def measured_scale(z: torch.Tensor) -> float:
    """1 / std of every latent element (latent diffusion's scale factor), in float64."""
    return float(1.0 / z.double().std())


def check_latent_config(cfg: dict, channels: int, resolution: int) -> tuple[int, int]:
    """A training config with autoencoder=: (latent channels, latent resolution) the diffusion network is sized
    for, or one line for what a latent model cannot do."""
    value = cfg["autoencoder"]
    data, o = cfg["dataset"], cfg["objective"]
    if data.get("name") == "gmm":
        raise UserError("autoencoder= with dataset=gmm is not allowed: the mixture's draws are not images to encode")
    if data.get("flip"):
        raise UserError(
            "dataset.flip=true is not allowed with autoencoder=: the latents are encoded once, unflipped "
            "(a mirrored latent is not the latent of the mirrored image)"
        )
    if o.get("mask_training"):
        raise UserError(
            "objective.mask_training=true is not allowed with autoencoder=: inpaint a latent model with "
            "inpaint=replace or inpaint=repaint"
        )
    path, model, _ = autoencoder_header(value)
    return check_latent_data(model, channels, resolution, str(path))


def latent_training_data(cfg: dict, data, out: Path, dist, device, report=print):
    """The training set as scaled latents (an ImageDataset of floats: the Trainer draws batches from it as from
    any other) and the codec that made them, its scale factor measured on them."""
    from diffuse.data import ImageDataset

    codec = load_autoencoder(cfg["autoencoder"], device=device)
    cache_dir = Path(str(cfg.get("latent_cache") or out / "latents"))
    z = encode_dataset(data, codec, cfg["dataset"], cache_dir, dist, report)
    codec.scale_factor = measured_scale(z)
    return ImageDataset((z * codec.scale_factor).float(), data.labels, data.num_classes, data.name), codec
