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
from typing import Annotated

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


class OwnCommand(TyperCommand):
    """convert and export: a usage error (an unknown or missing option, a value of the wrong type) is one line and
    exit code 2, as each of their own refusals is, instead of click's usage block."""

    def parse_args(self, ctx, args):
        try:  # the click Typer parses with: a copy of its own in newer Typers, the click package in older ones
            from typer._click.exceptions import UsageError
        except ImportError:
            from click.exceptions import UsageError

        # key=value was their syntax before they had options: a refusal says what replaced it
        old = any("=" in a and not a.startswith("-") for a in args)
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:
            hint = "its options are --NAME VALUE, not NAME=VALUE: " if old else ""
            typer.echo(f"error: {e.format_message()} ({hint}see diffuse {self.name} --help)", err=True)
            raise SystemExit(2) from None


# convert's arguments. The ADM options (--from improved-diffusion / guided-diffusion only) are what those weights
# cannot tell (diffuse/interop/adm.py).
_ADM = "ADM: "
_Source = Annotated[
    str,
    typer.Argument(
        metavar="PATH_OR_DIR",
        help="a diffusers model or pipeline folder, or its config.json / safetensors file; "
        "an improved/guided-diffusion .safetensors file",
    ),
]
_From = Annotated[
    str, typer.Option("--from", help="the format of PATH_OR_DIR: diffusers | improved-diffusion | guided-diffusion")
]
_Checkpoint = Annotated[str, typer.Option("--out", metavar="FILE.safetensors", help="the checkpoint to write")]
_Resolution = Annotated[
    int | None, typer.Option("--resolution", help=f"{_ADM}image_size, the side it was trained at (required)")
]
_Schedule = Annotated[
    str | None, typer.Option("--schedule", metavar="linear|cosine", help=f"{_ADM}noise_schedule (required)")
]
_T = Annotated[int | None, typer.Option("--T", help=f"{_ADM}diffusion_steps  [default: 1000]")]
_Heads = Annotated[int | None, typer.Option("--heads", help=f"{_ADM}num_heads  [default: 4]")]
_HeadChannels = Annotated[
    int | None,
    typer.Option(
        "--head-channels",
        help=f"{_ADM}num_head_channels, instead of --heads (every attention layer must then get the same number "
        "of heads: ours has one per network)",
    ),
]
_AttentionOrder = Annotated[
    str | None,
    typer.Option(
        "--attention-order",
        metavar="legacy|new",
        help=f"{_ADM}the qkv layout: legacy (head by head: improved-diffusion's, and guided-diffusion's unless "
        "use_new_attention_order) or new  [default: legacy]",
    ),
]
_Rescale = Annotated[
    bool | None,
    typer.Option(
        "--rescale-timesteps/--no-rescale-timesteps",
        help=f"{_ADM}the network saw t * 1000 / T  [default: on for improved-diffusion, off for guided-diffusion]",
        show_default=False,
    ),
]
_Prediction = Annotated[
    str | None,
    typer.Option("--prediction", metavar="eps|x0", help=f"{_ADM}eps, or x0 for predict_xstart  [default: eps]"),
]


def convert(
    src: _Source,
    fmt: _From,
    out: _Checkpoint,
    resolution: _Resolution = None,
    schedule: _Schedule = None,
    T: _T = None,
    heads: _Heads = None,
    head_channels: _HeadChannels = None,
    attention_order: _AttentionOrder = None,
    rescale_timesteps: _Rescale = None,
    prediction: _Prediction = None,
) -> None:
    options = {
        "resolution": resolution,
        "schedule": schedule,
        "T": T,
        "heads": heads,
        "head_channels": head_channels,
        "attention_order": attention_order,
        "rescale_timesteps": rescale_timesteps,
        "prediction": prediction,
    }

    def write() -> Path:
        from diffuse.interop.convert import convert as convert_weights

        return convert_weights(fmt, src, out, options)

    _write(write, out)


def export(
    fmt: Annotated[str, typer.Option("--to", help="the format to write: diffusers")],
    ckpt: Annotated[
        str, typer.Option("--ckpt", metavar="FILE|RUN_DIR", help="a checkpoint file, or a training run dir")
    ],
    out: Annotated[str, typer.Option("--out", metavar="DIR", help="the pipeline folder to write: new, or empty")],
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="export the EMA weights, or the trained ones")] = True,
) -> None:
    def write() -> Path:
        if fmt != "diffusers":
            raise UserError(f"--to {fmt!r} is not allowed: choose diffusers")
        from diffuse.interop.export import export_diffusers

        return export_diffusers(ckpt, out, use_ema=ema)

    _write(write, out)


def _write(write: Callable[[], Path], out: str) -> None:
    """Run convert's or export's writer: a refusal is one line and exit code 2, a signal stops it (_until_signal)."""
    try:
        path = _until_signal(write, out)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    typer.echo(f"wrote {path}")


def _until_signal(write: Callable, target: str):
    """export and convert have no safe point to stop at: a signal stops them where they are (their writes are
    atomic and clean up after themselves), with one line and exit code 0, instead of a traceback or a process
    killed with its temp files left beside the output. `target` is --out's value."""
    from diffuse.signals import Stopped, StopRequest

    out = Path(target).expanduser()

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
        typer.echo(f"stopped by signal ({stop.name}): nothing written to --out={target}; run the command again")
        raise SystemExit(0) from None


# convert and export parse no Hydra overrides: every argument of theirs is one of their options.
OWN = {"convert": convert, "export": export}
for _spec in COMMANDS:
    if _spec.config is None:
        app.command(
            name=_spec.name, help=_spec.help, cls=OwnCommand, context_settings={"help_option_names": ["-h", "--help"]}
        )(OWN[_spec.name])
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
