"""What the commands' jobs share: the run dir guard, the saved config, and the composed config turned into the
pipeline's arguments (runtime, model, sampling job)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffuse.console import console
from diffuse.errors import UserError
from diffuse.pipeline.job import SamplingJob, prepare_sampling
from diffuse.pipeline.model import Model, load_model
from diffuse.pipeline.runtime import Runtime, resolve_runtime
from diffuse.validate import check_number


def to_dict(cfg: Any) -> Any:
    """A config node as plain Python (dicts, lists, values), resolved; plain values pass through."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def runtime_of(cfg: DictConfig, images: int | None = None) -> Runtime:
    """The command's runtime group resolved (`images`: how many a sampling command draws, for compile=auto)."""
    return resolve_runtime(to_dict(cfg.runtime), images=images)


def checking_runtime(rt: Runtime) -> Runtime:
    """`rt` for loading a model only to check a job's config (a task's check(), for every -m job before the first
    one starts): on the CPU, nothing compiled, so that the check places nothing on a GPU."""
    import dataclasses

    import torch

    return dataclasses.replace(
        rt, device=torch.device("cpu"), autocast=None, channels_last=False, compile=False, cuda_graphs=False
    )


def model_of(cfg: DictConfig, runtime: Runtime) -> Model:
    """ckpt= or model=oracle (with its dataset and schedule) as a Model."""
    return load_model(
        ckpt=cfg.ckpt,
        model=to_dict(cfg.model),
        dataset=to_dict(cfg.dataset),
        schedule=to_dict(cfg.schedule),
        use_ema=cfg.use_ema,
        runtime=runtime,
        verify=cfg.verify,
        autoencoder=cfg.get("autoencoder"),
    )


def sampling_job_of(cfg: DictConfig, model: Model, n: int) -> SamplingJob:
    """The sampler, guidance and labels of a sampling command (sample, eval), checked."""
    seed = check_number("seed", cfg.seed, integer=True)
    return prepare_sampling(
        model,
        sampler=to_dict(cfg.sampler),
        steps=cfg.steps,
        guidance=to_dict(cfg.guidance),
        label=cfg.label,
        labels=to_dict(cfg.labels),
        n=n,
        seed=seed,
        verify=cfg.get("verify", True),
    )


def job_of(cfg: DictConfig, runtime: Runtime, n: int):
    """The command's sampling job: sampling_job_of its model, or with cascade=[BASE, SR, ...] a pipeline.cascade.CascadeJob
    (the base stage with the command's sampler, guidance and labels; each super-resolution stage with the same sampler
    and steps, at condition.aug_level: null for each model's own, a number for all, or a list, one per stage)."""
    from diffuse.pipeline.cascade import CascadeJob, check_chain, load_cascade, plan_superres

    paths = to_dict(cfg.get("cascade"))
    if paths in (None, ""):
        return sampling_job_of(cfg, model_of(cfg, runtime), n)
    if cfg.ckpt not in (None, "") or cfg.model is not None:
        raise UserError(
            "cascade= and ckpt=/model= cannot both be given: the cascade's first checkpoint is its base model"
        )
    models = load_cascade(
        paths,
        lambda p, sr: load_model(
            ckpt=p,
            model=None,
            dataset=None,
            schedule=None,
            use_ema=cfg.use_ema,
            runtime=runtime,
            verify=cfg.verify,
            superres=sr,
            autoencoder=None if sr else cfg.get("autoencoder"),
        ),
    )
    cond = to_dict(cfg.get("condition")) or {}
    levels, truncs = (_per_stage(cond.get(k), len(models) - 1, f"condition.{k}") for k in ("aug_level", "truncated"))
    base = sampling_job_of(cfg, models[0], n)
    stages = tuple(
        plan_superres(m, to_dict(cfg.sampler), cfg.steps, lv, tr) for m, lv, tr in zip(models[1:], levels, truncs)
    )
    check_chain(models[0], stages)
    return CascadeJob(base, stages, base.denoiser)


def _per_stage(value: Any, stages: int, key: str) -> list:
    if isinstance(value, list):
        if len(value) != stages:
            raise UserError(
                f"{key}={value!r} is not allowed: give one value, or a list of {stages} (one per super-resolution stage)"
            )
        return value
    return [value] * stages


def dataset_config(name: str) -> dict:
    """The composed config of dataset=NAME (its defaults list applied), as training would build it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a command: compose with its search path
        return to_dict(compose(config_name="train", overrides=[f"dataset={name}"]).dataset)
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return to_dict(compose(config_name="train", overrides=[f"dataset={name}"]).dataset)


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def guarded(job: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> Any:
    """Run a command's job in its Hydra run dir, which it owns while the job runs (diffuse.runlock: a second
    process on the same dir is refused with one line and writes nothing). Before the job, the files it will write
    are checked (a directory where a file goes is one line, not an error after the work) and Hydra's record is
    written to .hydra/. A UserError leaves the run dir as it was (unless it asks to keep its outputs): no new
    file, and the record and config.yaml of an earlier run restored; one line, its exit code (2). Anything else
    is an internal error and keeps its traceback."""
    from hydra.core.hydra_config import HydraConfig

    from diffuse import runlock

    out = run_dir()
    command = HydraConfig.get().job.config_name
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 writes, locks and cleans up
    try:
        lock = runlock.own(out, f"diffuse {command.replace('_', '-')}")
    except UserError as e:
        _exit_with(e)  # the dir is another process's: nothing here is touched
    before = _listing(out)
    # The dir is this run's own if it held nothing but our lock (Hydra makes it just before the job).
    fresh = before <= {out, out / runlock.LOCK_NAME}
    kept = _snapshot(out) if main else {}
    try:
        check_outputs(command, cfg, out)
        if main:
            write_record(cfg, out)
        result = job(cfg, out)
    except UserError as e:
        if main and not e.keep_outputs:
            _remove_new(out, before)
            _restore(kept)
        lock.release()
        if main and fresh and not e.keep_outputs:
            _remove_fresh_dir(out)  # after the lock is gone: the dir is empty only then
        _exit_with(e)
    finally:
        lock.release()
    if main:
        console.print(f"run dir: {out.resolve()}", markup=False, soft_wrap=True)
    return result


def _exit_with(e: UserError) -> None:
    from diffuse.runlock import exit_with

    exit_with(e)


# Hydra's record of a run (its config, its own config, the overrides), written by guarded rather than by Hydra
# (conf/hydra/default.yaml: output_subdir null) so that it is written only by the process that owns the run dir,
# and restored when the command is refused.
RECORD_DIR = ".hydra"
RECORD = ("config.yaml", "hydra.yaml", "overrides.yaml")


def write_record(cfg: DictConfig, out: Path) -> None:
    """.hydra/{config,hydra,overrides}.yaml, as Hydra writes them: the job's config and Hydra's, unresolved."""
    from hydra.core.hydra_config import HydraConfig

    from diffuse.io import atomic_write

    hydra_cfg = HydraConfig.instance().cfg
    texts = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
    }
    for name, text in texts.items():
        atomic_write(out / RECORD_DIR / name, lambda tmp, text=text: tmp.write_text(text))


def _snapshot(out: Path) -> dict[Path, bytes]:
    """The bytes of what a refused command must give back: the record and the resolved config of an earlier run."""
    kept = {}
    for p in [out / RECORD_DIR / name for name in RECORD] + [out / "config.yaml"]:
        if p.is_file() and not p.is_symlink():
            kept[p] = p.read_bytes()
    return kept


def _restore(kept: dict[Path, bytes]) -> None:
    from diffuse.io import atomic_write

    for p, data in kept.items():
        if not p.is_file() or p.read_bytes() != data:
            atomic_write(p, lambda tmp, data=data: tmp.write_bytes(data))


# What each command writes into its run dir: a name ending in / is a directory, a glob names numbered files.
# Checked before the work starts (check_outputs): a directory where a file goes, or a file where a directory
# goes, would otherwise fail only when the file is written, after the work.
OUTPUTS = {
    "train": (
        "checkpoints/",
        "samples/",
        "config.yaml",
        "metrics.jsonl",
        "grid.png",
        "checkpoints/last.safetensors",
        "checkpoints/step_*.safetensors",
        "samples/step_*.png",
        "curves.png",
        "tensorboard/",
        "wandb/",
    ),
    "sample": ("images/", "config.yaml", "sample.json", "grid.png", "samples.npz", "images/*.png"),
    "inpaint": ("config.yaml", "inpaint.json", "*.png"),
    "edit": ("config.yaml", "edit.json", "grid.png", "samples.npz", "*.png"),
    "upsample": ("config.yaml", "upsample.json", "grid.png", "*.png"),
    "eval": ("features/", "config.yaml", "metrics.json"),
    "tune_schedule": ("config.yaml", "schedule.json", "levels.png", "tune_state.json", "reference.safetensors"),
}
OUTPUTS["distill"] = (*OUTPUTS["train"], "checkpoints/student_*steps.safetensors")
OUTPUTS["train_classifier"] = (
    "checkpoints/",
    "config.yaml",
    "metrics.jsonl",
    "accuracy.json",
    "checkpoints/last.safetensors",
    "checkpoints/step_*.safetensors",
    "curves.png",
)
OUTPUTS["train_ae"] = (
    "checkpoints/",
    "config.yaml",
    "metrics.jsonl",
    "ae.json",
    "reconstructions.png",
    "checkpoints/last.safetensors",
    "checkpoints/step_*.safetensors",
)
# What a -m sweep writes into its sweep dir: Hydra's multirun.yaml, and eval's summary (tasks/sweep_summary.py).
SWEEP_OUTPUTS = {"eval": ("summary.csv", "summary.md", "*_vs_nfe.png")}


def check_sweep_outputs(command: str, sweep_dir: Path) -> None:
    check_paths(
        sweep_dir, ("multirun.yaml", *SWEEP_OUTPUTS.get(command, ())), f"diffuse {command.replace('_', '-')} -m"
    )


def check_outputs(command: str, cfg: DictConfig, out: Path) -> None:
    """One line if a path the command writes cannot be written: the wrong kind of entry is there, a directory it
    writes into is not writable, or (train) a file that is not a diffuse checkpoint sits where training writes
    (or prunes) checkpoints; such a file is never overwritten."""
    check_paths(
        out,
        (*OUTPUTS.get(command, ()), f"{RECORD_DIR}/", *(f"{RECORD_DIR}/{n}" for n in RECORD)),
        f"diffuse {command.replace('_', '-')}",
    )
    if command in ("train", "train_classifier", "train_ae"):
        ckdir = out / "checkpoints"
        for p in [ckdir / "last.safetensors", *sorted(ckdir.glob("step_*.safetensors"))]:
            if p.is_file() and not is_diffuse_checkpoint(p):
                raise UserError(
                    f"{p} is not a diffuse checkpoint: training would overwrite it; move it away, or choose another hydra.run.dir"
                )
    if command == "eval" and cfg.get("save_ref") not in (None, ""):
        check_file_target(Path(str(cfg.save_ref)).expanduser(), "--save-ref")
    if command == "tune_schedule" and cfg.get("write_ckpt") and cfg.get("ckpt") not in (None, ""):
        # The schedule is written into the checkpoint at the end: its folder must take the write, and the run
        # that owns it must not be writing it meanwhile (its next save would drop the schedule).
        from diffuse.checkpoint import resolve_ckpt_path
        from diffuse.runlock import check_free

        ckpt = resolve_ckpt_path(cfg.ckpt).resolve()
        check_dir_target(
            ckpt.parent, f"ckpt={cfg.ckpt}: its folder {ckpt.parent} (write_ckpt=true writes the schedule into it)"
        )
        owner = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        if owner != out.resolve():
            try:
                check_free(owner)
            except UserError as e:
                raise UserError(f"ckpt={cfg.ckpt}: {e} (write_ckpt=false leaves the checkpoint alone)") from None


def check_paths(root: Path, patterns, who: str) -> None:
    for pattern in patterns:
        want_dir = pattern.endswith("/")
        name = pattern.rstrip("/")
        found = root.glob(name) if any(c in name for c in "*?[") else [root / name]
        for p in found:
            if want_dir and os.path.lexists(p) and not p.is_dir():
                raise UserError(
                    f"{p} is not a directory: {who} writes into a directory {p.name}/ there; move it away, or choose another run dir"
                )
            if want_dir and p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
                raise UserError(f"{p} is not writable: {who} writes into it")
            if not want_dir and p.is_dir():
                raise UserError(
                    f"{p} is a directory: {who} writes a file {p.name} there; move it away, or choose another run dir"
                )


def check_dir_target(path: Path, label: str) -> None:
    """One line unless `path` is a writable directory or can be made one (what Hydra's mkdir of a run dir needs);
    `label` names it for the user (hydra.run.dir=PATH)."""
    p = Path(os.path.abspath(path))
    existing = p
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is not a directory" if existing == p else f"cannot be created: {existing} is not a directory"
        raise UserError(f"{label} {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == p else f"cannot be created: {existing} is not writable"
        raise UserError(f"{label} {what}")


def check_file_target(path: Path, key: str) -> None:
    """One line unless a file can be written at `path`."""
    if path.is_dir():
        raise UserError(f"{key} {path} is a directory: give a file name")
    check_dir_target(path.parent, f"{key} {path}: its folder {path.parent}")


def is_diffuse_checkpoint(path: Path) -> bool:
    """Whether `path`'s safetensors header names it a diffuse checkpoint. Its tensors may still be damaged: resume
    passes over those, and training rewrites them; anything else is somebody else's file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100 << 20:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and any(str(k).startswith("diffuse.") for k in meta)


def _listing(root: Path) -> set[Path]:
    if not root.exists():
        return set()
    return {p for p in root.rglob("*")} | {root}


def _remove_new(root: Path, before: set[Path]) -> None:
    """Delete what this job (and Hydra, for it) created; leave anything that was there before."""
    if not root.exists():
        return
    for p in sorted(_listing(root) - before, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _remove_fresh_dir(root: Path) -> None:
    """Remove the run dir this refused run made, and the parents Hydra made for it under ./outputs
    (outputs/sample/...) if now empty; a directory the user named (hydra.run.dir=...) is never climbed out of."""
    outputs = (Path.cwd() / "outputs").resolve()
    p = root.resolve()
    try:
        p.rmdir()
    except OSError:
        return
    while outputs in p.parents:
        p = p.parent
        try:
            p.rmdir()
        except OSError:
            break


def save_resolved_config(cfg: DictConfig, out: Path) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes
        return
    from diffuse.io import atomic_write

    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))


def train_then_measure(
    cfg: DictConfig, out: Path, setup: Callable[[], tuple[dict, Callable, Callable]], command: str, what: str
) -> tuple[dict, dict | None]:
    """The commands that train a helper network on the Trainer (train-classifier, train-ae): setup() -> (the
    Trainer's config, its make_objective, measure(trainer) -> report); resume, fit, then the held-out report on rank
    0. Returns (fit's result, the report); the report is None when the run stopped (in training, or by a signal in
    the measurement, which has no safe point: the trained network is kept and `what` is named as not measured) or on
    other ranks."""
    from diffuse import distributed
    from diffuse.signals import Stopped, StopRequest
    from diffuse.training.loop import fit, resume
    from diffuse.training.trainer import Trainer

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
