"""diffuse train-classifier: dataset -> x_t = q_sample(x_0, t) -> noise-aware classifier p(y | x_t, t) (the U-Net's
encoder half) -> checkpoints, metrics.jsonl (loss, accuracy) and the held-out accuracy at a few t (accuracy.json).

It runs on the Trainer and its loop (resume, checkpoints, EMA, signals, metrics.jsonl) with a classifier objective;
its checkpoints are what guidance=classifier guidance.classifier= and metrics.features=classifier read."""

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
from diffuse.training.classifier import classifier_objective
from diffuse.training.measure import train_then_measure
from diffuse.training.trainer import Trainer, check_config
from diffuse.validate import check_number

# The classifier's constructor arguments as the user names them here; resolution and channels are the dataset's.
KEYS = {"resolution": "dataset.resolution", "in_channels": "dataset.channels"}


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    def setup():
        train_cfg, held = prepare(cfg)
        return train_cfg, classifier_objective, lambda tr: held_out_accuracy(tr, train_cfg["dataset"], held)

    result, report = train_then_measure(cfg, out, setup, "train-classifier", "the held-out accuracy")
    if report is None:
        return result
    write_json(out / "accuracy.json", report)
    print_accuracy(report)
    return {**result, "accuracy": report["accuracy"]}


def prepare(cfg: DictConfig) -> tuple[dict, dict]:
    """The Trainer's config (the classifier as its model, sized for the dataset; no sample grids) and the held-out
    evaluation's settings, everything checked before the data is loaded."""
    from diffuse.data import DATASETS, dataset_shape
    from diffuse.nets import meta_network
    from diffuse.pipeline.model import schedule_from_config

    dataset, clf = to_dict(cfg.dataset), dict(to_dict(cfg.classifier))
    if dataset.get("name") not in DATASETS:
        raise UserError(f"dataset={dataset.get('name')!r} is not allowed: choose one of {', '.join(sorted(DATASETS))}")
    if clf.get("arch") != "classifier":
        raise UserError(
            f"classifier.arch={clf.get('arch')!r} is not allowed: train-classifier trains the classifier network (arch: classifier)"
        )
    channels, resolution, classes = dataset_shape(dataset)
    if not classes or classes < 2:
        raise UserError(
            f"dataset={dataset['name']} has {classes or 'no'} class labels: a classifier needs a labelled dataset "
            "of at least two classes (a folder dataset: one subfolder per class)"
        )
    if clf.get("num_classes") not in (None, classes):
        raise UserError(
            f"classifier.num_classes={clf['num_classes']!r} does not fit dataset={dataset['name']}, which has "
            f"{classes} classes (null takes the dataset's)"
        )
    clf["num_classes"] = classes
    keys = {**{k: f"classifier.{k}" for k in clf}, **KEYS}
    meta_network({**clf, "resolution": resolution, "in_channels": channels}, keys=keys)  # one line naming a bad key
    schedule = schedule_from_config(to_dict(cfg.schedule))
    ts = to_dict(cfg.accuracy_t)
    if (
        not isinstance(ts, list)
        or not ts
        or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < schedule.T for t in ts)
    ):
        raise UserError(
            f"accuracy_t={ts!r} is not allowed: give a list of timesteps, integers from 0 to {schedule.T - 1}"
        )
    n = check_number("accuracy_n", cfg.accuracy_n, minimum=1, integer=True)
    trainer = {**to_dict(cfg.trainer), "sample_n": 0}  # a classifier draws nothing
    composed = _train_defaults()
    objective = {
        **to_dict(composed.objective),
        "p_uncond": 0.0,
        "mask_training": False,
    }  # the Trainer's label dropout: off
    train_cfg = {
        "model": clf,
        "schedule": to_dict(cfg.schedule),
        "objective": objective,
        "dataset": dataset,
        "trainer": trainer,
        "sampler": to_dict(composed.sampler),
        "runtime": to_dict(cfg.runtime),
    }
    return train_cfg, {"t": ts, "n": n}


def _train_defaults():
    """The train config's objective=simple and default sampler: what the Trainer checks and stores beside the
    classifier (the loss is the classifier objective's; the sampler draws nothing)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=["objective=simple"])
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return compose(config_name="train", overrides=["objective=simple"])


@torch.no_grad()
def held_out_accuracy(trainer: Trainer, dataset: dict, held: dict) -> dict:
    """The EMA classifier's accuracy on held-out images noised to each timestep in held["t"] (the same noise at
    every t, from the trainer's seed: the figures are a function of the checkpoint)."""
    from diffuse.data import build_dataset, held_out
    from diffuse.diffusion.schedule import q_sample

    dcfg, what = held_out(dataset)
    ds = build_dataset(dcfg)
    n = min(held["n"], len(ds))
    x, y = ds.batch(torch.arange(n))
    g = torch.Generator().manual_seed(trainer.tcfg["seed"] + 7)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    net = trainer.ema.eval()
    acc = {}
    for t in held["t"]:
        correct = 0
        for s in range(0, n, 500):
            xb, nb = x[s : s + 500].to(trainer.device), noise[s : s + 500].to(trainer.device)
            tb = torch.full((len(xb),), t, dtype=torch.long, device=trainer.device)
            with torch.autocast(trainer.device.type, dtype=trainer.amp, enabled=trainer.amp is not None):
                logits = net(q_sample(trainer.schedule, xb, tb, nb), tb)
            correct += int((logits.argmax(1).cpu() == y[s : s + 500]).sum())
        acc[str(t)] = correct / n
    return {
        "held_out": f"dataset {dcfg['name']} ({what})",
        "n": n,
        "step": trainer.step,
        "num_classes": trainer.net.num_classes,
        "chance": float(torch.bincount(y).max()) / n,
        "accuracy": acc,
    }


def print_accuracy(report: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"held-out accuracy, {report['held_out']}, n={report['n']}, step {report['step']}", title_justify="left"
    )
    table.add_column("t", justify="right")
    table.add_column("accuracy", justify="right")
    for t, a in report["accuracy"].items():
        table.add_row(t, f"{a:.4f}")
    console.print(table)
    console.print(f"chance (the most frequent class): {report['chance']:.4f}", markup=False)


def check(cfg: DictConfig, out: Path) -> None:
    """What run() refuses before its first step (overrides.check_overrides runs it for every job of a -m sweep)."""
    train_cfg, _ = prepare(cfg)
    check_config(train_cfg)


# What the command writes into its run dir (rundir.outputs: checked before the work starts).
OUTPUTS = (*TRAINING_OUTPUTS, "accuracy.json", "curves.png")


def check_targets(cfg: DictConfig, out: Path) -> None:
    check_checkpoint_dir(out)
