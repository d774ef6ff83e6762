"""diffuse train-ae: dataset -> KL autoencoder (reconstruction + KL) -> checkpoints, metrics.jsonl (loss, recon),
the held-out reconstruction PSNR (ae.json) and reconstructions.png (originals over their reconstructions).

It runs on the Trainer and its loop (resume, checkpoints, EMA, signals, metrics.jsonl) with the autoencoder
objective; `diffuse train autoencoder=RUN` trains a diffusion model in the latent space of its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from diffuse.console import console
from diffuse.errors import UserError
from diffuse.io import write_json
from diffuse.pipeline.config import to_dict
from diffuse.rundir.outputs import TRAINING_OUTPUTS, check_checkpoint_dir
from diffuse.training.autoencoder import autoencoder_objective, check_ae_objective
from diffuse.training.measure import train_then_measure
from diffuse.training.trainer import Trainer, check_config
from diffuse.validate import check_number

KEYS = {"resolution": "dataset.resolution", "in_channels": "dataset.channels"}


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    def setup():
        train_cfg, loss_cfg = prepare(cfg)
        return (
            train_cfg,
            lambda tr: autoencoder_objective(tr, loss_cfg),
            lambda tr: held_out_psnr(tr, train_cfg["dataset"], cfg.eval_n, cfg.grid_n, out),
        )

    result, report = train_then_measure(cfg, out, setup, "train-ae", "the held-out PSNR")
    if report is None:
        return result
    write_json(out / "ae.json", report)
    console.print(
        f"held-out reconstruction PSNR {report['psnr']:.2f} dB over {report['n']} images "
        f"({report['held_out']}); latents {'x'.join(map(str, report['latent_shape']))}",
        markup=False,
    )
    return {**result, "psnr": report["psnr"]}


def prepare(cfg: DictConfig) -> tuple[dict, dict]:
    """The Trainer's config (the autoencoder as its model, sized for the dataset; no sample grids) and the loss's,
    everything checked before the data is loaded."""
    from diffuse.data import DATASETS, dataset_shape
    from diffuse.nets import meta_network

    dataset, ae = to_dict(cfg.dataset), dict(to_dict(cfg.autoencoder))
    if dataset.get("name") not in DATASETS:
        raise UserError(f"dataset={dataset.get('name')!r} is not allowed: choose one of {', '.join(sorted(DATASETS))}")
    if dataset["name"] == "gmm":
        raise UserError("dataset=gmm is not allowed: its draws are not images (an autoencoder learns 8-bit images)")
    if ae.get("arch") != "autoencoder":
        raise UserError(
            f"autoencoder.arch={ae.get('arch')!r} is not allowed: train-ae trains the KL autoencoder (arch: autoencoder)"
        )
    channels, resolution, _ = dataset_shape(dataset)
    keys = {**{k: f"autoencoder.{k}" for k in ae}, **KEYS}
    meta_network({**ae, "resolution": resolution, "in_channels": channels}, keys=keys)  # one line naming a bad key
    loss = to_dict(cfg.loss)
    check_ae_objective(loss, resolution)
    check_number("eval_n", cfg.eval_n, minimum=1, integer=True)
    check_number("grid_n", cfg.grid_n, minimum=0, integer=True)
    composed = _train_defaults()
    trainer = {**to_dict(cfg.trainer), "sample_n": 0}
    objective = {**to_dict(composed.objective), "p_uncond": 0.0, "mask_training": False}
    train_cfg = {
        "model": ae,
        "schedule": to_dict(composed.schedule),
        "objective": objective,
        "dataset": dataset,
        "trainer": trainer,
        "sampler": to_dict(composed.sampler),
        "runtime": to_dict(cfg.runtime),
    }
    return train_cfg, loss


def _train_defaults():
    """The train config's defaults (objective=simple, its schedule and sampler): what the Trainer checks and stores
    beside the autoencoder; none of them is used by its loss."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=["objective=simple"])
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return compose(config_name="train", overrides=["objective=simple"])


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images (an exact reconstruction: infinite)."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def held_out_psnr(trainer: Trainer, dataset: dict, n: int, grid_n: int, out: Path) -> dict:
    """The EMA autoencoder's reconstructions (z = the posterior mean) of held-out images: their mean PSNR, and
    reconstructions.png."""
    from diffuse.data import build_dataset, held_out
    from diffuse.images import grid_upscale, make_grid, save_png, to_uint8

    dcfg, what = held_out(dataset)
    ds = build_dataset(dcfg)
    n = min(n, len(ds))
    net = trainer.ema.eval()
    originals, recons = [], []
    for s in range(0, n, 128):
        x, _ = ds.batch(torch.arange(s, min(n, s + 128)))
        with torch.autocast(trainer.device.type, dtype=trainer.amp, enabled=trainer.amp is not None):
            xr = net.decode(net.encode(x.to(trainer.device))[0])
        originals.append(to_uint8(x))
        recons.append(to_uint8(xr.float().cpu()))
    orig, rec = torch.cat(originals), torch.cat(recons)
    values = psnr(orig, rec)
    k = min(grid_n, n)
    if k:
        save_png(
            make_grid(torch.cat([orig[:k], rec[:k]]), nrow=k),
            out / "reconstructions.png",
            upscale=grid_upscale(orig.shape[-1]),
        )
    res = orig.shape[-1]
    return {
        "held_out": f"dataset {dcfg['name']} ({what})",
        "n": n,
        "step": trainer.step,
        "psnr": float(values.clamp(max=99.0).mean()),
        "factor": net.factor,
        "latent_shape": [net.latent_channels, res // net.factor, res // net.factor],
    }


def check(cfg: DictConfig, out: Path) -> None:
    """What run() refuses before its first step (overrides.check_overrides runs it for every job of a -m sweep)."""
    train_cfg, _ = prepare(cfg)
    check_config(train_cfg)


# What the command writes into its run dir (rundir.outputs: checked before the work starts).
OUTPUTS = (*TRAINING_OUTPUTS, "ae.json", "reconstructions.png")


def check_targets(cfg: DictConfig, out: Path) -> None:
    check_checkpoint_dir(out)
