"""The command line: thin Typer commands that hand every token after the subcommand to Hydra unchanged.

    diffuse train  [OVERRIDES]         key=value, group choices (model=small), --cfg job, -m/--multirun sweeps
    diffuse sample [OVERRIDES]

Overrides are checked by composing the config first, so a typo in a key or group option is one clear line
with exit code 2 rather than a Hydra stack trace.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List

import typer

from diffuse.errors import UserError
from typer.core import TyperCommand

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="diffuse",
    help="Train, sample, inpaint and evaluate denoising diffusion models.\n\n"
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
RUNTIME_KEYS = ("device", "precision", "channels_last", "attention", "compile", "compile_mode", "cuda_graphs", "ema_foreach", "data_on_device")
MOVED = {**{k: f"runtime.{k}" for k in RUNTIME_KEYS}, **{f"trainer.{k}": f"runtime.{k}" for k in RUNTIME_KEYS}}

# Hydra flags that take a value: the value is not an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def _overrides(args: List[str]) -> List[str]:
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


def check_overrides(config_name: str, args: List[str]) -> None:
    """Compose the config with the given overrides (each sweep value in turn) and turn any composition error
    into a UserError naming the offending override."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = _overrides(args)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as e:
        raise UserError(_one_line(e)) from None
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if key in MOVED:
            raise UserError(f"{key}= is now {MOVED[key]}= (the runtime group: device, precision and fast paths for every command)")
    base = [o.input_line for o in parsed if not o.is_sweep_override()]
    variants = [base]
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            for val in o.sweep_string_iterator():
                variants.append(base + [f"{key}={val}"])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="diffuse.conf", version_base=None):
            for ov in variants:
                try:
                    compose(config_name=config_name, overrides=ov)
                except (HydraException, OmegaConfBaseException) as e:
                    raise UserError(_one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()


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


def run_hydra(command: str, job: Callable, args: List[str]) -> None:
    import hydra

    from diffuse.tasks.common import guarded

    try:
        check_overrides(command, args)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2)

    @hydra.main(config_path="pkg://diffuse.conf", config_name=command, version_base=None)
    def _main(cfg):
        return guarded(job, cfg)

    old_argv = sys.argv
    sys.argv = [f"diffuse {command}", *args]
    try:
        _main()
    finally:
        sys.argv = old_argv


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def train(ctx: typer.Context) -> None:
    """Train a diffusion model.

    Examples:

      diffuse train experiment=quickstart

      diffuse train model=small objective=min_snr trainer.steps=20000 runtime.device=cuda:1

      diffuse train resume=true hydra.run.dir=outputs/train/2026-01-01_12-00-00

    Writes checkpoints/last.safetensors, metrics.jsonl and sample grids into its run dir.
    """
    from diffuse.tasks.train import run

    run_hydra("train", run, ctx.args)


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def sample(ctx: typer.Context) -> None:
    """Draw samples from a trained model (or the exact mixture oracle).

    Examples:

      diffuse sample ckpt=outputs/train/RUN n=64 steps=50 sampler=ddim seed=0

      diffuse sample model=oracle sampler=dpm_solver steps=10 n=256 save_npz=true

      diffuse sample -m ckpt=RUN sampler=ddim,ddpm steps=20,50

    Writes grid.png, images/NNNNNN.png and (save_npz=true) samples.npz into its run dir.
    """
    from diffuse.tasks.sample import run

    run_hydra("sample", run, ctx.args)


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def inpaint(
    ctx: typer.Context,
    image: str = typer.Option(..., "--image", help="an image file, or a folder of images"),
    mask: str = typer.Option(..., "--mask", help="a mask (white = generate, black = keep), or a folder of masks with matching names"),
) -> None:
    """Fill the masked region of images with a trained model (or the exact mixture oracle).

    repaint drives the ddpm or ddim step; replace and conditioned work with any sampler.

    Examples:

      diffuse inpaint --image photo.png --mask mask.png ckpt=outputs/train/RUN n=4

      diffuse inpaint --image imgs/ --mask mask.png model=oracle inpaint=replace sampler=dpm_solver

      diffuse inpaint --image photo.png --mask mask.png ckpt=RUN_TRAINED_WITH_MASKS inpaint=conditioned

    Writes NAME_NN.png results and NAME_strip.png (original | masked | results) into its run dir.
    """
    from diffuse.tasks.inpaint import run

    run_hydra("inpaint", run, [*ctx.args, f"image={_hydra_str(image)}", f"mask={_hydra_str(mask)}"])


@app.command(cls=ConfCommand, context_settings=CONTEXT)
def convert(
    ctx: typer.Context,
    src: str = typer.Argument(..., metavar="PATH_OR_DIR", help="a diffusers model or pipeline folder, or its config.json / safetensors file"),
    fmt: str = typer.Option(..., "--from", help="the format of PATH_OR_DIR: diffusers"),
) -> None:
    """Import pretrained weights as a diffuse checkpoint.

    diffuse convert --from diffusers PATH_OR_DIR out=FILE.safetensors

    Maps a diffusers UNet2DModel of Ho et al.'s DDPM architecture (e.g. google/ddpm-cifar10-32: config.json and
    diffusion_pytorch_model.safetensors; pickled .bin files are refused) onto diffuse's U-Net, with its linear
    schedule and eps prediction, so that `diffuse sample ckpt=FILE.safetensors` draws from it.
    """
    try:
        if fmt != "diffusers":
            raise UserError(f"--from {fmt!r} is not allowed: choose diffusers")
        # out=FILE may come before or after the path (Typer takes the first bare token as PATH_OR_DIR).
        tokens = [src, *ctx.args]
        outs = [a.partition("=")[2] for a in tokens if a.startswith("out=")]
        paths = [a for a in tokens if not a.startswith("out=")]
        if len(outs) != 1 or not outs[0]:
            raise UserError("out=FILE.safetensors is required, once: where to write the checkpoint")
        if not paths:
            raise UserError("PATH_OR_DIR is required: a diffusers model folder or its safetensors file")
        if len(paths) != 1:
            raise UserError(f"{paths[-1]!r} is not an argument of convert: give one PATH_OR_DIR and out=FILE.safetensors")
        src, out = paths[0], outs[0]
        from diffuse.convert import convert_diffusers

        path = convert_diffusers(src, out)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2)
    typer.echo(f"wrote {path}")
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
    from diffuse.tasks.tune_schedule import run

    run_hydra("tune_schedule", run, ctx.args)


@app.command(name="eval", cls=ConfCommand, context_settings=CONTEXT)
def evaluate(
    ctx: typer.Context,
    metric: List[str] = typer.Option([], "--metric", metavar="NAME", help="fid, kid, is, bpd or nll; repeat for several (default: fid)"),
    save_ref: str = typer.Option(None, "--save-ref", metavar="PATH", help="write the reference statistics to this .safetensors file"),
) -> None:
    """Score samples with FID, KID and the Inception Score against reference data, or a model's likelihood.

    Examples:

      diffuse eval --metric fid --metric kid ckpt=outputs/train/RUN ref=cifar10 n=50000

      diffuse eval -m --metric fid ckpt=RUN ref=cifar10 sampler=ddim,dpm_solver steps=10,20,50

      diffuse eval --metric bpd ckpt=RUN dataset=cifar10 likelihood.n=1000   (test split, bits/dim: bound and ODE)

    Writes metrics.json into its run dir; a sweep also writes summary.csv, summary.md and plots in its sweep dir.
    """
    from diffuse.tasks.evaluate import run

    extra = [f"metric=[{','.join(_hydra_str(m) for m in metric)}]"] if metric else []
    if save_ref:
        extra.append(f"save_ref={_hydra_str(save_ref)}")
    run_hydra("eval", run, [*ctx.args, *extra])


def _hydra_str(v: str) -> str:
    """A value quoted for a Hydra override: any path or name passes through unparsed."""
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main() -> None:
    # Hydra reads HYDRA_FULL_ERROR; keep tracebacks of internal errors readable.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    app()


if __name__ == "__main__":
    main()
