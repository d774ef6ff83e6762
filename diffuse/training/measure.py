"""The commands that train a helper network on the Trainer and then measure it once (train-classifier's held-out
accuracy, train-ae's reconstruction PSNR)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from diffuse import distributed
from diffuse.console import console
from diffuse.io import save_resolved_config
from diffuse.signals import Stopped, StopRequest
from diffuse.training.loop import fit, resume
from diffuse.training.trainer import Trainer


def train_then_measure(
    cfg: DictConfig, out: Path, setup: Callable[[], tuple[dict, Callable, Callable]], command: str, what: str
) -> tuple[dict, dict | None]:
    """The commands that train a helper network on the Trainer (train-classifier, train-ae): setup() -> (the
    Trainer's config, its make_objective, measure(trainer) -> report); resume, fit, then the held-out report on rank
    0. Returns (fit's result, the report); the report is None when the run stopped (in training, or by a signal in
    the measurement, which has no safe point: the trained network is kept and `what` is named as not measured) or on
    other ranks."""
    with StopRequest() as stop:
        train_cfg, make_objective, measure = setup()
        trainer = Trainer(train_cfg, out, make_objective=make_objective)
        try:
            resume(trainer, cfg.resume, cfg.verify)
            if trainer.dist.main:
                save_resolved_config(cfg, out)
            result = fit(trainer, stop, command=command)
            if result.get("stopped") or not trainer.dist.main:
                return result, None
            try:
                with stop.immediately():
                    return result, measure(trainer)
            except Stopped:
                console.print(
                    stop.line(
                        f"training is complete (checkpoint {result.get('checkpoint')}); {what} was not measured",
                        command,
                        out.resolve(),
                    ),
                    markup=False,
                )
                return {**result, "stopped": True}, None
        finally:
            distributed.teardown(trainer.dist)
