"""diffuse distill: a teacher (a checkpoint, or the exact mixture oracle) -> a few-step student, trained by the
Trainer with a distillation objective (diffuse/training/objectives.py) -> checkpoints that record their steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig

from diffuse import distributed
from diffuse.checkpoint import load_checkpoint, resolve_ckpt_path, save_checkpoint
from diffuse.console import console
from diffuse.errors import UserError
from diffuse.rundir.outputs import TRAINING_OUTPUTS
from diffuse.signals import StopRequest
from diffuse.tasks.common import dataset_config, save_resolved_config, to_dict
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

    if d["method"] == "progressive":
        return ProgressiveObjective(
            trainer, teacher, d, on_round=lambda steps, sampling: save_student(trainer, steps, sampling)
        )
    return ConsistencyObjective(
        trainer, teacher if d["method"] == "consistency" else None, method="ect" if d["method"] == "ect" else "cd"
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
            "teacher= is required: a checkpoint (a file or a training run dir), or teacher=oracle (the exact mixture, dataset=gmm)"
        )
    for key in ("guidance_scale",):
        if key in d:
            check_number(f"distill.{key}", d[key], minimum=0)
    trainer_cfg, runtime, sampler = to_dict(cfg.trainer), to_dict(cfg.runtime), to_dict(cfg.sampler)
    if str(cfg.teacher) == "oracle":
        base = oracle_teacher(cfg, method)
    else:
        base = checkpoint_teacher(cfg, method)
    model, schedule, objective, dataset, teacher, init, about = base
    if method != "progressive":
        objective = {**objective, "kind": "consistency", **{k: d[k] for k in CONSISTENCY_KEYS if k in d}}
        objective.setdefault("curriculum", "cd")
        objective.setdefault("levels_start", 2)
        objective.setdefault("levels_end", 150)
        objective.setdefault("ect_delta", 0.5)
    train_cfg = {
        "model": model,
        "schedule": schedule,
        "objective": objective,
        "dataset": dataset,
        "trainer": trainer_cfg,
        "sampler": sampler,
        "runtime": runtime,
    }
    about = {**about, "method": method, **{k: v for k, v in d.items() if k != "method"}}
    return Setup(train_cfg, teacher, init, about)


class Guided:
    """The teacher, with classifier-free guidance folded in when a class-conditional teacher is distilled at a scale
    other than 1 (the student then learns the guided model, as Meng et al. 2023 do)."""

    def __init__(self, den, scale: float, num_classes: int | None, schedule):
        self.den, self.scale, self.k, self.schedule = den, scale, num_classes, schedule
        self.fn = den
        if num_classes and scale != 1.0:
            from diffuse.diffusion.guidance import cfg_denoiser

            self.fn = cfg_denoiser(den, scale, null_label=num_classes, schedule=schedule)

    def __call__(self, x_t, t, y=None):
        return self.fn(x_t, t, y)


def oracle_teacher(cfg: DictConfig, method: str):
    """teacher=oracle: the exact denoiser of the mixture (dataset=gmm), a fresh student network (model=NAME)."""
    from diffuse.data import build_mixture
    from diffuse.diffusion.oracle import GMMDenoiser
    from diffuse.pipeline.model import schedule_from_config

    model = to_dict(cfg.model)
    if not model or model.get("arch") == "oracle":
        raise UserError("teacher=oracle needs model=NAME for the student's network (e.g. model=tiny)")
    dataset = to_dict(cfg.dataset) if cfg.dataset is not None else dataset_config("gmm")
    if dataset["name"] != "gmm":
        raise UserError(
            f"teacher=oracle needs dataset=gmm: it is that mixture's exact denoiser (got dataset={dataset['name']!r})"
        )
    schedule = (
        to_dict(cfg.schedule)
        if cfg.schedule is not None
        else {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02, "scale_with_T": True}
    )
    sched = schedule_from_config(schedule)
    mixture = build_mixture(dataset)
    teacher = None if method == "ect" else Guided(GMMDenoiser(mixture, sched), 1.0, None, sched)
    objective = student_objective()
    return model, schedule, objective, dataset, teacher, None, {"teacher": "oracle"}


def student_objective() -> dict:
    """The objective of a fresh student (teacher=oracle): v-prediction, which progressive distillation recommends
    (eps is ill-posed at the noisiest level), with the simple objective's other keys."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        o = to_dict(compose(config_name="train", overrides=["objective=simple"]).objective)
    else:
        with initialize_config_module(config_module="diffuse.conf", version_base=None):
            o = to_dict(compose(config_name="train", overrides=["objective=simple"]).objective)
    return {**o, "prediction": "v"}


def checkpoint_teacher(cfg: DictConfig, method: str):
    """A diffuse checkpoint as the teacher: its network, schedule, objective and data; the student starts as it."""
    from diffuse.checkpoint import content_hash
    from diffuse.pipeline.model import denoiser_of, network_from_checkpoint
    from diffuse.pipeline.runtime import inference_network, resolve_runtime

    if cfg.model is not None:
        raise UserError(
            "model= cannot be given with a checkpoint teacher: the student is a copy of the teacher's network"
        )
    if cfg.schedule is not None:
        raise UserError("schedule= cannot be given with a checkpoint teacher: the student keeps the teacher's schedule")
    path = resolve_ckpt_path(cfg.teacher, key="teacher")
    ckpt = load_checkpoint(path, verify=cfg.verify)
    tn = network_from_checkpoint(ckpt, use_ema=cfg.use_ema, where=str(path))
    conf = tn.config
    if conf.get("autoencoder") is not None:
        raise UserError(
            f"teacher={path} is a latent model (trained with autoencoder=): distillation takes a pixel-space "
            "teacher; its student would need the teacher's latents, which distill does not encode"
        )
    o = dict(conf.get("objective") or {})
    if o.get("kind", "diffusion") == "edm":
        # The student starts as a copy of the teacher and is trained as a plain network: it would misread F.
        raise UserError(
            f"teacher={path} is EDM-preconditioned (objective.kind=edm): distillation takes a plain diffusion "
            "model (objective.kind=diffusion) as its teacher"
        )
    if o.get("kind", "diffusion") != "diffusion":
        raise UserError(f"teacher={path} is a consistency model: distil a diffusion model")
    if o.get("mask_training"):
        raise UserError(
            f"teacher={path} was trained with masks (objective.mask_training): distil a plain diffusion model"
        )
    if "dataset" not in conf or "trainer" not in conf:
        raise UserError(f"teacher={path} records no training data (made by diffuse convert?): give dataset=NAME")
    dataset = to_dict(cfg.dataset) if cfg.dataset is not None else conf["dataset"]
    from diffuse.data import dataset_shape

    c, r, _ = dataset_shape(dataset)
    if (c, r) != (tn.net.in_channels, tn.net.resolution):
        raise UserError(
            f"teacher={path} makes {tn.net.in_channels}x{tn.net.resolution}x{tn.net.resolution} images, dataset="
            f"{dataset['name']} is {c}x{r}x{r}: the student learns the teacher's images"
        )
    o = {**o, "kind": "diffusion"}
    for key, default in (
        ("weighting", "simple"),
        ("min_snr_gamma", 5.0),
        ("p_uncond", 0.1),
        ("mask_training", False),
        ("mask_kinds", {"boxes": 0.3, "strokes": 0.3, "half": 0.2, "none": 0.2}),
        ("learn_sigma", False),
        ("vlb_weight", 0.001),
    ):
        o.setdefault(key, default)  # checkpoints of diffuse convert carry fewer objective keys
    rt = resolve_runtime(to_dict(cfg.runtime))
    teacher_net = inference_network(tn.net, rt)
    scale = float(to_dict(cfg.distill).get("guidance_scale", 1.0))
    teacher = None if method == "ect" else Guided(denoiser_of(teacher_net, tn), scale, tn.net.num_classes, tn.schedule)
    model = {k: v for k, v in conf["model"].items() if k not in ("resolution", "in_channels")}
    init = {k: v.clone() for k, v in (ckpt.ema if (cfg.use_ema and ckpt.ema) else ckpt.model).items()}
    if o["learn_sigma"]:
        from diffuse.nets import drop_variance_outputs

        # The student matches the teacher's deterministic DDIM steps: it learns the mean alone, from the teacher's
        # weights without their variance outputs.
        init = drop_variance_outputs(conf["model"], init, tn.image_channels)
        model = {**model, "out_channels": None}
        o = {**o, "learn_sigma": False}
    about = {"teacher": {"path": str(path), "sha256": content_hash(init), "step": ckpt.step}}
    return model, conf["schedule"], o, dataset, teacher, init, about


def check(cfg: DictConfig, out: Path) -> None:
    """What run() refuses before its first step (cli.check_overrides runs it for every job of a -m sweep): the
    teacher, the method and the student's training config."""
    from diffuse.training.objectives import check_consistency, check_progressive
    from diffuse.training.trainer import check_config

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
