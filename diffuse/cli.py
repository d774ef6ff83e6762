"""The command line: thin Typer commands that hand every token after the subcommand to Hydra unchanged.

    diffuse train  [OVERRIDES]         key=value, group choices (model=small), --cfg job, -m/--multirun sweeps
    diffuse sample [OVERRIDES]

Overrides are checked by composing the config first, so a typo in a key or group option is one clear line
with exit code 2 rather than a Hydra stack trace.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from types import ModuleType

import typer
from typer.core import TyperCommand

from diffuse.commands import COMMANDS, Command
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


def _check_launcher(args: list[str]) -> None:
    """The SLURM launcher where there is no SLURM: one line, before Hydra makes the sweep dir and submitit raises
    (check_overrides composes such a sweep anywhere, so that it can be checked before it is submitted)."""
    import shutil

    from diffuse.overrides import PRINT_FLAGS

    launching = {"-m", "--multirun"} & set(args) and not PRINT_FLAGS & set(args)
    if "hydra/launcher=submitit_slurm" in args and launching and shutil.which("srun") is None:
        raise UserError(
            "hydra/launcher=submitit_slurm needs SLURM (no srun on PATH): submit from a cluster's login node, "
            "or leave the launcher out to run the jobs here"
        )


def run_hydra(command: str, task: ModuleType, args: list[str]) -> None:
    """Hand `args` to Hydra, which runs `task.run` in the run dir (each -m job in its own); everything that can
    refuse them first (overrides.check_overrides, with the task's `check` for every -m job)."""
    import hydra

    from diffuse.overrides import LATENT_COMMANDS, check_overrides, latent_alias
    from diffuse.rundir import lock
    from diffuse.rundir.guard import guarded

    if command in LATENT_COMMANDS:
        args = [latent_alias(a) for a in args]
    try:
        check_overrides(command, args, task)
        _check_launcher(args)
    except UserError as e:
        lock.exit_with(e)  # under torchrun: printed once, every rank exits 2

    @hydra.main(config_path="pkg://diffuse.conf", config_name=command, version_base=None)
    def _main(cfg):
        return guarded(task, cfg)

    old_argv = sys.argv
    sys.argv = [f"diffuse {command}", *args]
    try:
        _main()
    finally:
        sys.argv = old_argv
        lock.release_all()


def register(spec: Command) -> None:
    """A row of the command table as a Typer command: its options become overrides after the user's own."""

    def command(ctx: typer.Context, **options) -> None:
        extra = [o.override(options[o.key]) for o in spec.options]
        run_hydra(spec.config, import_module(f"diffuse.tasks.{spec.task}"), [*ctx.args, *(e for e in extra if e)])

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for o in spec.options:
        kind = list[str] if o.repeat else (str if o.required else str | None)
        default = typer.Option(
            [] if o.repeat else (... if o.required else None), o.flag, help=o.help, metavar=o.metavar
        )
        params.append(inspect.Parameter(o.key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind))
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    app.command(name=spec.name, help=spec.help, cls=ConfCommand, context_settings=CONTEXT)(command)


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
        raise SystemExit(2) from None
    typer.echo(f"wrote {path}")


def export(
    ctx: typer.Context,
    fmt: str = typer.Option(..., "--to", help="the format to write: diffusers"),
) -> None:
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
        raise SystemExit(2) from None
    typer.echo(f"wrote {path}")


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
        raise SystemExit(0) from None


# convert and export parse no Hydra overrides: their keys are the --help text's key=value flags.
OWN = {"convert": convert, "export": export}
for _spec in COMMANDS:
    if _spec.config is None:
        app.command(name=_spec.name, help=_spec.help, context_settings=CONTEXT)(OWN[_spec.name])
    else:
        register(_spec)


def main() -> None:
    # Hydra reads HYDRA_FULL_ERROR; keep tracebacks of internal errors readable.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if len(sys.argv) > 1 and sys.argv[1] in {*(c.name for c in COMMANDS), "export", "convert"}:
        # Before torch and Hydra load: a signal from here on is a stop request the job honours at its first safe
        # point (training: step 0, with a checkpoint), not an exit that leaves nothing to resume.
        from diffuse.signals import handle_early

        handle_early()
    app()


if __name__ == "__main__":
    main()
