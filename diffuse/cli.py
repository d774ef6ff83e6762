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
from importlib import import_module
from types import ModuleType

import typer
from typer.core import TyperCommand

from diffuse.commands import COMMANDS, Command
from diffuse.errors import UserError
from diffuse.interop.cli import OwnCommand, convert, export

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


# convert and export parse no Hydra overrides: every argument of theirs is one of their options.
OWN = {"convert": convert, "export": export}  # diffuse/interop/cli.py
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
    if len(sys.argv) > 1 and sys.argv[1] in {c.name for c in COMMANDS}:
        # Before torch and Hydra load: a signal from here on is a stop request the job honours at its first safe
        # point (training: step 0, with a checkpoint), not an exit that leaves nothing to resume.
        from diffuse.signals import handle_early

        handle_early()
    app()


if __name__ == "__main__":
    main()
