"""diffuse train: dataset -> network -> objective(schedule) -> AdamW + EMA -> checkpoints, metrics, sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from diffuse import distributed
from diffuse.tasks.common import save_resolved_config, to_dict
from diffuse.training.loop import fit, resume
from diffuse.training.trainer import Trainer


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    trainer = Trainer(to_dict(cfg), out)
    try:
        resume(trainer, cfg.resume)
        if trainer.dist.main:
            save_resolved_config(cfg, out)
        return fit(trainer)
    finally:
        distributed.teardown(trainer.dist)
