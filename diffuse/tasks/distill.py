"""diffuse distill: a teacher (a checkpoint, or the exact mixture oracle) -> a few-step student, trained by the
Trainer with a distillation objective (diffuse/training/objectives.py) -> checkpoints that record their steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig

from diffuse import distributed
from diffuse.checkpoint import complete_config, load_checkpoint, resolve_ckpt_path, save_checkpoint
from diffuse.console import console
from diffuse.errors import UserError
from diffuse.io import save_resolved_config
from diffuse.pipeline.config import to_dict
from diffuse.rundir.outputs import TRAINING_OUTPUTS
from diffuse.signals import StopRequest
from diffuse.training.loop import fit, resume
from diffuse.training.trainer import Trainer
from diffuse.validate import check_choice, check_number

METHODS = ("progressive", "consistency", "ect")
# The keys of a method that become the student's objective config (a consistency student's f needs them to sample).
CONSISTENCY_KEYS = (
    "loss",
    "sigma_data",
    "curriculum",
    "levels_start",
    "levels_end",
    "p_mean",
    "p_std",
    "target_decay",
    "ect_delta",
)


class Setup(NamedTuple):
    train_cfg: dict  # what the Trainer is built from
    teacher: Callable | None  # the first teacher's denoiser (None for ect)
    init: dict | None  # the student's starting weights (a checkpoint teacher's)
    about: dict  # what the checkpoints record of the distillation


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    with StopRequest() as stop:
        setup = prepare(cfg)
        d = to_dict(cfg.distill)
        trainer = Trainer(
            setup.train_cfg, out, make_objective=lambda tr: objective(tr, d, setup.teacher), init_weights=setup.init
        )
        trainer.config["distill"] = setup.about
        try:
            resume(trainer, cfg.resume, cfg.verify)
            if trainer.dist.main:
                save_resolved_config(cfg, out)
            return fit(trainer, stop, command="distill")
        finally:
            distributed.teardown(trainer.dist)


def objective(trainer: Trainer, d: dict, teacher):
    from diffuse.training.objectives import ConsistencyObjective, ProgressiveObjective

    o, schedule, t = trainer.ocfg, trainer.schedule, trainer.tcfg
    if d["method"] == "progressive":
        return ProgressiveObjective(
            o,
            schedule,
            teacher,
            d,
            steps=t["steps"],
            device=trainer.device,
            ema=trainer.ema,
            on_round=lambda steps, sampling: save_student(trainer, steps, sampling),
        )
    return ConsistencyObjective(
        o,
        schedule,
        net=trainer.net,
        steps=t["steps"],
        seed=t["seed"],
        device=trainer.device,
        teacher=teacher if d["method"] == "consistency" else None,
        method="ect" if d["method"] == "ect" else "cd",
    )


def save_student(trainer: Trainer, steps: int, sampling: dict) -> None:
    """checkpoints/student_{N}steps.safetensors: a finished round's student, sampled at its N steps with no flag."""
    if not trainer.dist.main:
        return
    state = trainer.state()
    state.config = {**state.config, "sampling": sampling}
    path = save_checkpoint(trainer.out / "checkpoints" / f"student_{steps}steps.safetensors", state)
    console.print(f"round done: the {steps}-step student is {path}")


def prepare(cfg: DictConfig) -> Setup:
    """The Trainer's config, the teacher and the student's weights, everything checked before any work."""
    d = to_dict(cfg.distill)
    method = check_choice("distill.method", d["method"], METHODS)
    if cfg.teacher in (None, ""):
        raise UserError(
            "teacher= is required: a checkpoint (a file or a training run dir), or teacher=oracle (the exact "
            "mixture, dataset=gmm)"
        )
    if "guidance_scale" in d:  # method=ect has no teacher to guide
        check_number("distill.guidance_scale", d["guidance_scale"], minimum=0)
    teacher_of = oracle_teacher if str(cfg.teacher) == "oracle" else checkpoint_teacher
    model, schedule, objective, dataset, teacher, init, about = teacher_of(cfg, method, to_dict(cfg.student))
    if method != "progressive":
        picked = {k: d[k] for k in CONSISTENCY_KEYS if k in d}
        objective = {**to_dict(cfg.consistency_keys), **objective, "kind": "consistency", **picked}
    train_cfg = {
        "model": model,
        "schedule": schedule,
        "objective": objective,
        "dataset": dataset,
        "trainer": to_dict(cfg.trainer),
        "sampler": to_dict(cfg.sampler),
        "runtime": to_dict(cfg.runtime),
    }
    about = {**about, "method": method, **{k: v for k, v in d.items() if k != "method"}}
    return Setup(train_cfg, teacher, init, about)


def oracle_teacher(cfg: DictConfig, method: str, student_objective: dict):
    """teacher=oracle: the exact denoiser of the mixture (dataset=gmm), a fresh student network (model=NAME)."""
    from diffuse.pipeline.model import oracle_model

    model = to_dict(cfg.model)
    if not model or model["arch"] == "oracle":
        raise UserError("teacher=oracle needs model=NAME for the student's network (e.g. model=tiny)")
    dataset = to_dict(cfg.dataset if cfg.dataset is not None else cfg.oracle.dataset)
    if dataset["name"] != "gmm":
        raise UserError(
            f"teacher=oracle needs dataset=gmm: it is that mixture's exact denoiser (got dataset={dataset['name']!r})"
        )
    schedule = to_dict(cfg.schedule if cfg.schedule is not None else cfg.oracle.schedule)
    oracle = oracle_model(dataset, schedule)
    teacher = None if method == "ect" else oracle.denoiser
    objective = {**student_objective, "prediction": cfg.oracle.prediction, "kind": "diffusion"}
    return model, schedule, objective, dataset, teacher, None, {"teacher": "oracle"}


def checkpoint_teacher(cfg: DictConfig, method: str, student_objective: dict):
    """A diffuse checkpoint as the teacher, loaded as every command loads a model: its network, schedule, objective
    and data; the student starts as it."""
    from diffuse.checkpoint import content_hash
    from diffuse.data import dataset_shape
    from diffuse.pipeline.conditioning import Guidance, guide
    from diffuse.pipeline.model import load_model
    from diffuse.pipeline.runtime import resolve_runtime

    if cfg.model is not None:
        raise UserError(
            "model= cannot be given with a checkpoint teacher: the student is a copy of the teacher's network"
        )
    if cfg.schedule is not None:
        raise UserError("schedule= cannot be given with a checkpoint teacher: the student keeps the teacher's schedule")
    path = resolve_ckpt_path(cfg.teacher, key="teacher")
    # The student's record and weights; load_model below reads the file again (and says what its check found).
    ckpt = load_checkpoint(path, verify=cfg.verify, report=lambda line: None)
    conf = ckpt.config
    if conf.get("autoencoder") is not None:  # before load_model, which would load its autoencoder
        raise UserError(
            f"teacher={path} is a latent model (trained with autoencoder=): distillation takes a pixel-space "
            "teacher; its student would need the teacher's latents, which distill does not encode"
        )
    runtime = resolve_runtime(to_dict(cfg.runtime))
    tm = load_model(
        ckpt=path, model=None, dataset=None, schedule=None, use_ema=cfg.use_ema, runtime=runtime, verify=cfg.verify
    )
    o = refuse_teacher_objective(path, conf)
    dataset = to_dict(cfg.dataset) if cfg.dataset is not None else conf["dataset"]
    (c, r, _), (tc, tr) = dataset_shape(dataset), (tm.shape[0], tm.shape[-1])
    if (c, r) != (tc, tr):
        raise UserError(
            f"teacher={path} makes {tc}x{tr}x{tr} images, dataset={dataset['name']} is {c}x{r}x{r}: the student "
            "learns the teacher's images"
        )
    o = {**student_objective, **o, "kind": "diffusion"}  # checkpoints of diffuse convert carry fewer objective keys
    teacher = None
    if method != "ect":  # an unconditional teacher has nothing to guide: distill.guidance_scale leaves it as it is
        teacher = guide(tm, Guidance("cfg", float(cfg.distill.guidance_scale) if tm.num_classes else 1.0))
    model = {k: v for k, v in conf["model"].items() if k not in ("resolution", "in_channels")}
    init = {k: v.clone() for k, v in (ckpt.ema if (cfg.use_ema and ckpt.ema) else ckpt.model).items()}
    if o["learn_sigma"]:
        from diffuse.nets import drop_variance_outputs

        # The student matches the teacher's deterministic DDIM steps: it learns the mean alone, from the teacher's
        # weights without their variance outputs.
        init = drop_variance_outputs(conf["model"], init, tm.shape[0])
        model = {**model, "out_channels": None}
        o = {**o, "learn_sigma": False}
    about = {"teacher": {"path": str(path), "sha256": content_hash(init), "step": ckpt.step}}
    return model, conf["schedule"], o, dataset, teacher, init, about


def refuse_teacher_objective(path: Path, conf: dict) -> dict:
    """The objective of a checkpoint that can teach (as it records it): a plain diffusion model's, trained on data
    it records."""
    o = complete_config(conf)["objective"]  # load_model has refused an objective that is not a mapping
    if o["kind"] == "edm":
        # The student starts as a copy of the teacher and is trained as a plain network: it would misread F.
        raise UserError(
            f"teacher={path} is EDM-preconditioned (objective.kind=edm): distillation takes a plain diffusion "
            "model (objective.kind=diffusion) as its teacher"
        )
    if o["kind"] != "diffusion":
        raise UserError(f"teacher={path} is a consistency model: distil a diffusion model")
    if o["mask_training"]:
        raise UserError(
            f"teacher={path} was trained with masks (objective.mask_training): distil a plain diffusion model"
        )
    if "dataset" not in conf or "trainer" not in conf:
        raise UserError(f"teacher={path} records no training data (made by diffuse convert?): give dataset=NAME")
    return dict(conf.get("objective") or {})


def check(cfg: DictConfig, out: Path) -> None:
    """What run() refuses before its first step (overrides.check_overrides runs it for every job of a -m sweep): the
    teacher, the method and the student's training config."""
    from diffuse.training.config import check_config, check_consistency, check_progressive

    setup = prepare(cfg)
    check_config(setup.train_cfg)
    d = to_dict(cfg.distill)
    if d["method"] == "progressive":
        check_progressive(d, setup.train_cfg["trainer"]["steps"])
    else:
        check_consistency(setup.train_cfg["objective"], "ect" if d["method"] == "ect" else "cd")


# What the command writes into its run dir (rundir.outputs: checked before the work starts): what train writes, and
# each progressive round's student.
OUTPUTS = (
    *TRAINING_OUTPUTS,
    "samples/",
    "grid.png",
    "samples/step_*.png",
    "curves.png",
    "tensorboard/",
    "wandb/",
    "checkpoints/student_*steps.safetensors",
)
