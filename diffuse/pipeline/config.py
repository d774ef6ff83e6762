"""The composed config of a command turned into the pipeline's arguments: its runtime, its model (a checkpoint, the
mixture oracle or a cascade of checkpoints) and its sampling job."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

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
        verify=cfg.verify,
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
