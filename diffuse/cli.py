"""The command line: thin Typer commands that hand every token after the subcommand to Hydra unchanged.

    diffuse train  [OVERRIDES]         key=value, group choices (model=small), --cfg job, -m/--multirun sweeps
    diffuse sample [OVERRIDES]

Overrides are checked by composing the config first, so a typo in a key or group option is one clear line
with exit code 2 rather than a Hydra stack trace.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from typer.core import TyperCommand

from diffuse.errors import UserError

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="diffuse",
    help="Train, sample, inpaint, edit and evaluate denoising diffusion models.\n\n"
    "Every argument after the command is a Hydra override: key=value, group=option, -m for sweeps, "
    "--cfg job to print the composed config.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


class ConfCommand(TyperCommand):
    """A command whose --help adds, after its docstring, its keys and config groups read from conf/."""

    def format_help_text(self, ctx, formatter) -> None:
        from diffuse.conf_help import help_text

        super().format_help_text(ctx, formatter)
        formatter.write_paragraph()
        for line in help_text(self.name.replace("-", "_")).splitlines():
            formatter.write(f"  {line}\n" if line else "\n")


# Keys that moved into the runtime group (the same keys for every command): a stale one gets a pointer there.
RUNTIME_KEYS = (
    "device",
    "precision",
    "channels_last",
    "attention",
    "compile",
    "compile_mode",
    "cuda_graphs",
    "ema_foreach",
    "data_on_device",
)
MOVED = {**{k: f"runtime.{k}" for k in RUNTIME_KEYS}, **{f"trainer.{k}": f"runtime.{k}" for k in RUNTIME_KEYS}}

# Hydra flags that take a value: the value is not an override.
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def _overrides(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in _FLAGS_WITH_VALUE:
            skip = True
            continue
        if a.startswith("-"):
            continue
        out.append(a)
    return out


def check_overrides(config_name: str, args: list[str], check: Callable | None = None) -> None:
    """Everything that can refuse the command before Hydra starts (so that a refused command writes nothing):
    the overrides parsed, every job's config composed (under -m each job of the sweep's product, as Hydra will
    run it) and resolved (a broken interpolation is one line), its run dir usable, and under -m each job's output
    paths, its run dir free and the task's own up-front checks `check(cfg)`, so that one bad value refuses the
    whole sweep before its first job starts. A failure is a UserError naming the override (and the -m job)."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from diffuse import runlock
    from diffuse.tasks.common import check_dir_target, check_outputs, check_sweep_outputs

    flags = {a for a in args if a.startswith("-")}
    multirun = bool(flags & {"-m", "--multirun"})
    only_print = bool(flags & _PRINT_FLAGS)  # --cfg, --info, --help: nothing runs, nothing is written
    if multirun and flags & {"--cfg", "-c", "--info", "-i"}:  # else Hydra's ValueError traceback
        raise UserError(
            "-m cannot be combined with --cfg or --info: print one job's config without -m (each job is composed the same way)"
        )
    overrides = _overrides(args)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as e:
        raise UserError(_one_line(e)) from None
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if key in MOVED:
            raise UserError(
                f"{key}= is now {MOVED[key]}= (the runtime group: device, precision and fast paths for every command)"
            )
        if key == "hydra.output_subdir":
            raise UserError(
                "hydra.output_subdir= cannot be changed: diffuse writes Hydra's record into the run dir's .hydra/ itself, once it holds the run dir"
            )
        if o.is_sweep_override() and not multirun:
            raise UserError(
                f"{o.input_line} is a sweep: add -m to run one job per value (a list is key=[a,b], a string with a comma key='a,b')"
            )
    hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override()]
    task = [o for o in parsed if not o.is_hydra_override()]
    try:
        jobs = BasicSweeper.split_arguments(task, None)[0] if multirun else [[o.input_line for o in task]]
    except HydraException as e:
        raise UserError(_one_line(e)) from None
    swept = {o.get_key_element() for o in task if o.is_sweep_override()}

    dirs: dict[str, int] = {}  # each -m job's run dir, and the job's number
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="diffuse.conf", version_base=None):
            for num, job in enumerate(jobs):
                where = ""
                if multirun:
                    shown = [ov.replace("\\", "") for ov in job if ov.split("=", 1)[0] in swept]  # as typed, unescaped
                    where = f"-m job #{num}" + (f" ({' '.join(shown)})" if shown else "") + ": "
                try:
                    try:
                        cfg = compose(
                            config_name=config_name, overrides=[*hydra_overrides, *job], return_hydra_config=True
                        )
                    except (HydraException, OmegaConfBaseException) as e:
                        raise UserError(_one_line(e)) from None
                    with open_dict(cfg):
                        cfg.hydra.job.name = Path(__file__).stem  # as Hydra names the job of a function in this file
                        if multirun:
                            cfg.hydra.job.num = cfg.hydra.job.id = num
                    if only_print:  # --cfg job --resolve resolves what it prints
                        if "--resolve" in flags:
                            HydraConfig.instance().set_config(cfg)
                            _resolve(cfg, lambda: OmegaConf.to_container(_job_config(cfg), resolve=True))
                        continue
                    if multirun:
                        sweep_dir = _resolve(cfg, lambda: str(cfg.hydra.sweep.dir))
                        if num == 0:
                            check_dir_target(Path(sweep_dir), f"hydra.sweep.dir={sweep_dir}")
                        run = os.path.join(sweep_dir, _resolve(cfg, lambda: str(cfg.hydra.sweep.subdir)))
                        check_dir_target(Path(run), f"its run dir {run}")
                        if os.path.abspath(run) == os.path.abspath(sweep_dir):  # the sweep itself holds that dir
                            raise UserError(
                                f"it would run in the sweep dir {sweep_dir} itself: hydra.sweep.subdir must name a subdir"
                            )
                        other = dirs.setdefault(os.path.abspath(run), num)
                        if other != num:  # the later job would write over the earlier one's outputs
                            raise UserError(
                                f"it would run in {run}, as job #{other} does: hydra.sweep.subdir must differ "
                                "from job to job (the default is ${hydra.job.num})"
                            )
                    else:
                        run = _resolve(cfg, lambda: str(cfg.hydra.run.dir))
                        check_dir_target(Path(run), f"hydra.run.dir={run}")
                    with open_dict(cfg):
                        cfg.hydra.runtime.output_dir = os.path.abspath(run)
                    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the job's config resolves as in the job
                    job_cfg = _job_config(cfg)
                    _resolve(job_cfg, lambda: OmegaConf.to_container(job_cfg, resolve=True))
                    if multirun:
                        if num == 0:
                            check_sweep_outputs(config_name, Path(sweep_dir))
                            runlock.check_free(Path(sweep_dir))
                        check_outputs(config_name, job_cfg, Path(run))
                        runlock.check_free(Path(run))
                        if check is not None:
                            check(job_cfg, Path(run))
                except UserError as e:
                    raise UserError(f"{where}{e}") from None
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()


def _job_config(cfg):
    """What Hydra hands the job: its config without the hydra node."""
    from omegaconf import open_dict, read_write

    job_cfg = copy.deepcopy(cfg)
    with read_write(job_cfg), open_dict(job_cfg):
        del job_cfg["hydra"]
    return job_cfg


# Hydra flags after which nothing runs: the config or Hydra's help is printed.
_PRINT_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


def _resolve(cfg, get):
    """get() with an interpolation that cannot be resolved (${oc.env:UNSET}, ${no.such.key}) as one line naming
    the key and its value as written."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return get()
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        reason = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
        for prefix in (
            "KeyError raised while resolving interpolation: ",
            "MissingMandatoryValue while resolving interpolation: ",
        ):
            reason = reason.removeprefix(prefix)
        raw = None
        try:
            raw = OmegaConf.to_container(
                OmegaConf.select(cfg, key.rpartition(".")[0]) if "." in key else cfg, resolve=False
            )
            raw = raw.get(key.rpartition(".")[2]) if isinstance(raw, dict) else None
        except Exception:
            raw = None
        shown = f"{key}={raw}" if raw is not None else (key or "the config")
        raise UserError(f"{shown} cannot be resolved: {reason.strip(chr(34))}") from None


def _one_line(e: Exception) -> str:
    msg = str(e).strip()
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    # Hydra lists the options of a group on the following lines: keep them on the one line.
    if "Available options" in msg:
        opts = [ln for ln in lines if not ln.startswith(("Available", "Config search path", "In "))]
        opts = [o for o in opts if " " not in o][:20]
        if opts:
            first += " (available: " + ", ".join(opts) + ")"
    if first.startswith("Could not override") and len(lines) > 1:
        first = lines[1] if "Key" in lines[1] else first + " " + lines[1]
    return first


# Commands that take a latent model's autoencoder as autoencoder=PATH. conf/autoencoder/ is a config group (train-ae's
# architectures), and Hydra reads autoencoder=X as a choice in that group wherever the group exists; so the value is
# passed on as autoencoder_ckpt=X, which those configs copy into their autoencoder key.
LATENT_COMMANDS = ("train", "sample", "inpaint", "eval")


def latent_alias(arg: str) -> str:
    return "autoencoder_ckpt=" + arg[len("autoencoder=") :] if arg.startswith("autoencoder=") else arg


def _check_launcher(args: list[str]) -> None:
    """The SLURM launcher where there is no SLURM: one line, before Hydra makes the sweep dir and submitit raises
    (check_overrides composes such a sweep anywhere, so that it can be checked before it is submitted)."""
    import shutil

    launching = {"-m", "--multirun"} & set(args) and not _PRINT_FLAGS & set(args)
    if "hydra/launcher=submitit_slurm" in args and launching and shutil.which("srun") is None:
        raise UserError(
            "hydra/launcher=submitit_slurm needs SLURM (no srun on PATH): submit from a cluster's login node, "
            "or leave the launcher out to run the jobs here"
        )


def run_hydra(command: str, job: Callable, args: list[str], check: Callable | None = None) -> None:
    """Hand `args` to Hydra, which runs `job` in the run dir (each -m job in its own); everything that can refuse
    them first (check_overrides, with the task's `check` for every -m job)."""
    import hydra

    from diffuse import runlock
    from diffuse.tasks.common import guarded

    if command in LATENT_COMMANDS:
        args = [latent_alias(a) for a in args]
    try:
        check_overrides(command, args, check)
        _check_launcher(args)
    except UserError as e:
        runlock.exit_with(e)  # under torchrun: printed once, every rank exits 2

    @hydra.main(config_path="pkg://diffuse.conf", config_name=command, version_base=None)
    def _main(cfg):
        return guarded(job, cfg)

    old_argv = sys.argv
    sys.argv = [f"diffuse {command}", *args]
    try:
        _main()
    finally:
        sys.argv = old_argv
        runlock.release_all()


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def train(ctx: typer.Context) -> None:
    """Train a diffusion model.

    Examples:

      diffuse train experiment=quickstart

      diffuse train model=small objective=min_snr trainer.steps=20000 runtime.device=cuda:1

      diffuse train resume=true hydra.run.dir=outputs/train/2026-01-01_12-00-00

    Writes checkpoints/last.safetensors, metrics.jsonl and sample grids into its run dir.
    """
    from diffuse.tasks.train import check, run

    run_hydra("train", run, ctx.args, check)


@app.command(name="train-classifier", cls=ConfCommand, context_settings=CONTEXT)
def train_classifier(ctx: typer.Context) -> None:
    """Train a noise-aware classifier p(y | x_t, t), for classifier guidance and as a feature extractor.

    Examples:

      diffuse train-classifier dataset=fashion_mnist dataset.resolution=32 dataset.fit=pad trainer.steps=3000

      diffuse sample ckpt=RUN guidance=classifier guidance.classifier=CLASSIFIER_RUN guidance.scale=2 label=3

      diffuse eval --metric fid ckpt=RUN metrics.features=classifier metrics.features_ckpt=CLASSIFIER_RUN

    Writes checkpoints/last.safetensors, metrics.jsonl (loss, accuracy) and accuracy.json (held-out accuracy at
    accuracy_t) into its run dir; resume=true hydra.run.dir=RUN continues it.
    """
    from diffuse.tasks.train_classifier import check, run

    run_hydra("train_classifier", run, ctx.args, check)


@app.command(name="train-ae", cls=ConfCommand, context_settings=CONTEXT)
def train_ae(ctx: typer.Context) -> None:
    """Train a KL autoencoder, whose latent space `diffuse train autoencoder=RUN` diffuses in (latent diffusion).

    Examples:

      diffuse train-ae dataset=shapes dataset.resolution=32 trainer.steps=1500

      diffuse train-ae dataset=folder dataset.path=imgs/ dataset.resolution=256 autoencoder=kl_f8 runtime.device=cuda

      diffuse train autoencoder=outputs/train_ae/RUN dataset=shapes dataset.resolution=32 model=dit_s

    Writes checkpoints/last.safetensors, metrics.jsonl (loss, recon), ae.json (held-out reconstruction PSNR) and
    reconstructions.png into its run dir; resume=true hydra.run.dir=RUN continues it.
    """
    from diffuse.tasks.train_ae import check, run

    run_hydra("train_ae", run, ctx.args, check)


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def sample(ctx: typer.Context) -> None:
    """Draw samples from a trained model (or the exact mixture oracle).

    Examples:

      diffuse sample ckpt=outputs/train/RUN n=64 steps=50 sampler=ddim seed=0

      diffuse sample model=oracle sampler=dpm_solver steps=10 n=256 save_npz=true

      diffuse sample -m ckpt=RUN sampler=ddim,ddpm steps=20,50

    Writes grid.png, images/NNNNNN.png and (save_npz=true) samples.npz into its run dir.
    """
    from diffuse.tasks.sample import check, run

    run_hydra("sample", run, ctx.args, check)


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def inpaint(
    ctx: typer.Context,
    image: str = typer.Option(..., "--image", help="an image file, or a folder of images"),
    mask: str = typer.Option(
        ..., "--mask", help="a mask (white = generate, black = keep), or a folder of masks with matching names"
    ),
) -> None:
    """Fill the masked region of images with a trained model (or the exact mixture oracle).

    repaint drives the ddpm or ddim step; replace and conditioned work with any sampler.

    Examples:

      diffuse inpaint --image photo.png --mask mask.png ckpt=outputs/train/RUN n=4

      diffuse inpaint --image imgs/ --mask mask.png model=oracle inpaint=replace sampler=dpm_solver

      diffuse inpaint --image photo.png --mask mask.png ckpt=RUN_TRAINED_WITH_MASKS inpaint=conditioned

    Writes NAME_NN.png results and NAME_strip.png (original | masked | results) into its run dir.
    """
    from diffuse.tasks.inpaint import check, run

    run_hydra("inpaint", run, [*ctx.args, f"image={_hydra_str(image)}", f"mask={_hydra_str(mask)}"], check)


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def edit(
    ctx: typer.Context,
    image: str = typer.Option(..., "--image", help="an image file, or a folder of images"),
    mask: str | None = typer.Option(
        None,
        "--mask",
        help="optional: the region to edit (white = edit, black = keep), or a folder of masks with matching names",
    ),
) -> None:
    """Edit images with a trained model (or the exact mixture oracle): SDEdit, or DDIM inversion and regeneration.

    sdedit noises each image to t0 = edit.strength * T and runs any sampler from there; invert finds its DDIM
    latent at t0 and regenerates it with label= or guidance.scale= (deterministic samplers).

    Examples:

      diffuse edit --image photo.png ckpt=outputs/train/RUN edit.strength=0.5 n=4

      diffuse edit --image imgs/ ckpt=RUN edit=invert label=2 guidance.scale=3

      diffuse edit --image photo.png --mask region.png ckpt=RUN sampler=ddpm steps=200

    Writes NAME_NN.png edits, grid.png (input | edits, one row per image) and edit.json (with the NFE) into its
    run dir; samples.npz with save_npz=true.
    """
    from diffuse.tasks.edit import check, run

    extra = [f"image={_hydra_str(image)}"] + ([f"mask={_hydra_str(mask)}"] if mask else [])
    run_hydra("edit", run, [*ctx.args, *extra], check)


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def upsample(
    ctx: typer.Context,
    image: str = typer.Option(
        ..., "--image", help="an image file, or a folder of images, at the model's low resolution"
    ),
) -> None:
    """Super-resolve images with a model trained with condition=lowres (a cascade's super-resolution stage).

    Examples:

      diffuse upsample ckpt=outputs/train/SR_RUN --image small.png n=4

      diffuse upsample ckpt=SR_RUN --image imgs/ condition.aug_level=0.2 sampler=dpm_solver steps=20

    Writes NAME_NN.png results, grid.png (each input enlarged, then its results) and upsample.json into its run dir.
    """
    from diffuse.tasks.upsample import check, run

    run_hydra("upsample", run, [*ctx.args, f"image={_hydra_str(image)}"], check)


@app.command(context_settings=CONTEXT)  # no conf/convert.yaml: its keys are the docstring's key=value flags
def convert(
    ctx: typer.Context,
    src: str = typer.Argument(
        ...,
        metavar="PATH_OR_DIR",
        help="a diffusers model or pipeline folder, or its config.json / safetensors file; an improved/guided-diffusion .safetensors file",
    ),
    fmt: str = typer.Option(
        ..., "--from", help="the format of PATH_OR_DIR: diffusers | improved-diffusion | guided-diffusion"
    ),
) -> None:
    """Import pretrained weights as a diffuse checkpoint.

    diffuse convert --from diffusers PATH_OR_DIR out=FILE.safetensors

    Maps a diffusers UNet2DModel of Ho et al.'s DDPM architecture (e.g. google/ddpm-cifar10-32: config.json and
    diffusion_pytorch_model.safetensors; pickled .bin files are refused) onto diffuse's U-Net, with its linear
    schedule and eps prediction, so that `diffuse sample ckpt=FILE.safetensors` draws from it. An AutoencoderKL
    folder (the Stable Diffusion VAE family, or a pipeline folder holding only vae/) or an AutoencoderTiny one
    (TAESD) becomes an autoencoder checkpoint for `diffuse train autoencoder=FILE.safetensors`.

    diffuse convert --from improved-diffusion MODEL.safetensors out=FILE.safetensors resolution=32 schedule=cosine
    [T=4000] [heads=4 | head_channels=64] [attention_order=legacy|new] [rescale_timesteps=true|false] [prediction=eps|x0]

    Maps Nichol & Dhariwal's U-Net (improved-diffusion, or guided-diffusion's with --from guided-diffusion), learned
    variances included, from a safetensors state dict (their .pt pickles are refused: save the state dict with
    safetensors first); the flags the weights cannot tell are given as key=value.
    """
    try:
        from diffuse.convert_adm import FORMATS

        if fmt != "diffusers" and fmt not in FORMATS:
            raise UserError(f"--from {fmt!r} is not allowed: choose diffusers, {', '.join(FORMATS)}")
        # out=FILE may come before or after the path (Typer takes the first bare token as PATH_OR_DIR).
        tokens = [src, *ctx.args]
        outs = [a.partition("=")[2] for a in tokens if a.startswith("out=")]
        if fmt in FORMATS:
            options = [a for a in tokens if "=" in a and not a.startswith("out=")]
            paths = [a for a in tokens if "=" not in a]
        else:
            options, paths = [], [a for a in tokens if not a.startswith("out=")]
        if len(outs) != 1 or not outs[0]:
            raise UserError("out=FILE.safetensors is required, once: where to write the checkpoint")
        if not paths:
            raise UserError("PATH_OR_DIR is required: a diffusers model folder or its safetensors file")
        if len(paths) != 1:
            raise UserError(
                f"{paths[-1]!r} is not an argument of convert: give one PATH_OR_DIR and out=FILE.safetensors"
            )
        src, out = paths[0], outs[0]
        if fmt in FORMATS:
            from diffuse.convert_adm import convert_adm

            path = _until_signal(lambda: convert_adm(src, out, options, fmt), f"out={out}")
        else:
            from diffuse.convert import convert_diffusers

            path = _until_signal(lambda: convert_diffusers(src, out), f"out={out}")
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2)
    typer.echo(f"wrote {path}")


@app.command(context_settings=CONTEXT)
def export(
    ctx: typer.Context,
    fmt: str = typer.Option(..., "--to", help="the format to write: diffusers"),
) -> None:
    """Export a checkpoint for another toolkit.

    diffuse export --to diffusers ckpt=FILE|RUN_DIR out=DIR [use_ema=false]

    Writes a diffusers pipeline folder (model_index.json, unet/ as a UNet2DModel in safetensors, scheduler/ with
    the model's betas and prediction type) that DDPMPipeline.from_pretrained(DIR) loads. A network diffusers
    cannot express (DiT, EDM or consistency parameterisation, conditioning inputs, latent models) is refused;
    learned variances export as variance_type="learned_range".
    """
    try:
        if fmt != "diffusers":
            raise UserError(f"--to {fmt!r} is not allowed: choose diffusers")
        args: dict[str, str] = {}
        for a in ctx.args:
            key, eq, value = a.partition("=")
            if not eq or key not in ("ckpt", "out", "use_ema"):
                raise UserError(
                    f"{a!r} is not an argument of export: give ckpt=FILE|RUN_DIR out=DIR [use_ema=true|false]"
                )
            if key in args:
                raise UserError(f"{key}= is given twice")
            args[key] = value
        for key, what in (("ckpt", "the checkpoint file or training run dir"), ("out", "the pipeline folder to write")):
            if not args.get(key):
                raise UserError(f"{key}= is required: {what}")
        use_ema = args.get("use_ema", "true").lower()
        if use_ema not in ("true", "false"):
            raise UserError(f"use_ema={args['use_ema']!r} is not allowed: true or false")
        from diffuse.export import export_diffusers

        path = _until_signal(
            lambda: export_diffusers(args["ckpt"], args["out"], use_ema=use_ema == "true"), f"out={args['out']}"
        )
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2)
    typer.echo(f"wrote {path}")


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def distill(ctx: typer.Context) -> None:
    """Distil a teacher into a few-step student: progressive distillation, consistency distillation or tuning.

    Examples:

      diffuse distill teacher=outputs/train/RUN method=progressive distill.start_steps=64 distill.target_steps=4

      diffuse distill teacher=oracle model=tiny method=consistency trainer.steps=4000

    Writes checkpoints (each progressive round's student as checkpoints/student_Nsteps.safetensors) that record
    their method, teacher and steps: diffuse sample ckpt=RUN (progressive: DDIM at the student's steps;
    consistency, ect: sampler=consistency steps=1|2|4).
    """
    from diffuse.tasks.distill import check, run

    run_hydra("distill", run, ctx.args, check)


@app.command(name="tune-schedule", cls=ConfCommand, context_settings=CONTEXT)
def tune_schedule(ctx: typer.Context) -> None:
    """Choose the N noise levels of a solver for one model: closest to a high-NFE reference from the same x_T.

    Examples:

      diffuse tune-schedule ckpt=outputs/train/RUN sampler=dpm_solver_3m steps=10

      diffuse tune-schedule model=oracle sampler=unipc steps=8 n=512

    Writes schedule.json and levels.png into its run dir and the schedule into the checkpoint's metadata; then
    diffuse sample ckpt=RUN sampler=SAME steps=N sampler.schedule=tuned uses it (model=oracle:
    sampler.schedule=RUN_DIR/schedule.json).
    """
    from diffuse.tasks.tune_schedule import check, run

    run_hydra("tune_schedule", run, ctx.args, check)


@app.command(name="eval", cls=ConfCommand, context_settings=CONTEXT)
def evaluate(
    ctx: typer.Context,
    metric: list[str] = typer.Option(
        [], "--metric", metavar="NAME", help="fid, kid, is, fd, pr, dc, bpd or nll; repeat for several (default: fid)"
    ),
    save_ref: str = typer.Option(
        None, "--save-ref", metavar="PATH", help="write the reference statistics to this .safetensors file"
    ),
) -> None:
    """Score samples with FID, KID and the Inception Score against reference data, or a model's likelihood.

    Examples:

      diffuse eval --metric fid --metric kid ckpt=outputs/train/RUN ref=cifar10 n=50000

      diffuse eval -m --metric fid ckpt=RUN ref=cifar10 sampler=ddim,dpm_solver steps=10,20,50

      diffuse eval --metric bpd ckpt=RUN dataset=cifar10 likelihood.n=1000   (test split, bits/dim: bound and ODE)

    Writes metrics.json into its run dir; a sweep also writes summary.csv, summary.md and plots in its sweep dir.
    """
    from diffuse.tasks.evaluate import check, run

    extra = [f"metric=[{','.join(_hydra_str(m) for m in metric)}]"] if metric else []
    if save_ref:
        extra.append(f"save_ref={_hydra_str(save_ref)}")
    run_hydra("eval", run, [*ctx.args, *extra], check)


def _until_signal(write: Callable, target: str):
    """export and convert have no safe point to stop at: a signal stops them where they are (their writes are
    atomic and clean up after themselves), with one line and exit code 0, instead of a traceback or a process
    killed with its temp files left beside the output. `target` is out=PATH."""
    from diffuse.signals import Stopped, StopRequest

    out = Path(target.partition("=")[2]).expanduser()

    def state():  # the rename is the last write: a new inode or mtime at out says it happened
        try:
            st = out.stat()
            return st.st_ino, st.st_mtime_ns
        except OSError:
            return None

    before, stop = state(), StopRequest()
    try:
        with stop, stop.immediately():
            return write()
    except Stopped:
        if state() not in (None, before):
            return out
        typer.echo(f"stopped by signal ({stop.name}): nothing written to {target}; run the command again")
        raise SystemExit(0)


def _hydra_str(v: str) -> str:
    """A value quoted for a Hydra override: any path or name passes through unparsed."""
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main() -> None:
    # Hydra reads HYDRA_FULL_ERROR; keep tracebacks of internal errors readable.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if len(sys.argv) > 1 and sys.argv[1] in (
        "train",
        "train-classifier",
        "train-ae",
        "sample",
        "inpaint",
        "edit",
        "eval",
        "tune-schedule",
        "distill",
        "upsample",
        "export",
        "convert",
    ):
        # Before torch and Hydra load: a signal from here on is a stop request the job honours at its first safe
        # point (training: step 0, with a checkpoint), not an exit that leaves nothing to resume.
        from diffuse.signals import handle_early

        handle_early()
    app()


if __name__ == "__main__":
    main()
