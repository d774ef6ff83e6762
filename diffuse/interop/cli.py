"""diffuse convert and diffuse export, the interop wing's two commands: they run no Hydra job, so their arguments
are Typer options of their own (registered by cli.py from its command table)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from diffuse.errors import UserError


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
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing --out file (never the source, nor a live run's)")
    ] = False,
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

        return convert_weights(fmt, src, out, options, force=force)

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
