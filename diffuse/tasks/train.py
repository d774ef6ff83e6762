"""diffuse train: dataset -> network -> objective(schedule) -> AdamW + EMA -> checkpoints, metrics, sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from diffuse import distributed
from diffuse.errors import UserError
from diffuse.io import save_resolved_config
from diffuse.pipeline.config import to_dict
from diffuse.rundir.outputs import TRAINING_OUTPUTS, check_checkpoint_dir
from diffuse.signals import StopRequest
from diffuse.training.config import check_config
from diffuse.training.loop import fit, resume
from diffuse.training.trainer import Trainer


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    # Signals are handled from the start: one while the network is built stops before the first step, with a
    # checkpoint of step 0 that resume=true continues.
    with StopRequest() as stop:
        check_model_arch(cfg)
        trainer = Trainer(to_dict(cfg), out)
        try:
            resume(trainer, cfg.resume, cfg.verify)
            if trainer.dist.main:
                save_resolved_config(cfg, out)
            return fit(trainer, stop)
        finally:
            distributed.teardown(trainer.dist)


def check(cfg: DictConfig, out: Path) -> None:
    """What run() refuses before its first step (overrides.check_overrides runs it for every job of a -m sweep)."""
    check_model_arch(cfg)
    check_config(to_dict(cfg))


def check_model_arch(cfg: DictConfig) -> None:
    if cfg.model.arch in ("autoencoder", "taesd"):
        raise UserError(
            f"model.arch={cfg.model.arch!r} is an autoencoder, not a denoiser: diffuse in its latent "
            "space with diffuse train autoencoder=FILE (diffuse train-ae trains a KL one)"
        )


# What the command writes into its run dir (rundir.outputs: checked before the work starts).
OUTPUTS = (*TRAINING_OUTPUTS, "samples/", "grid.png", "samples/step_*.png", "curves.png", "tensorboard/", "wandb/")


def check_targets(cfg: DictConfig, out: Path) -> None:
    check_checkpoint_dir(out)
