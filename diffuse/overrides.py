"""A command's overrides checked before Hydra starts, so that a refused command writes nothing: parsed (a typo, a
moved key or a sweep without -m is one line), expanded into the jobs Hydra will run (under -m each job of the
sweep's product), and each job checked (composed, resolved, its run dir usable; under -m its output paths, its run
dir free and the task's own up-front checks, so that one bad value refuses the whole sweep before its first job)."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from diffuse.errors import UserError
from diffuse.rundir import lock
from diffuse.rundir.outputs import check_dir_target, check_outputs, check_sweep_outputs

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
FLAGS_WITH_VALUE = {
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
# Every flag Hydra's command line takes; any other --NAME is a Typer-style spelling of an override.
HYDRA_FLAGS = {
    *FLAGS_WITH_VALUE,
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--resolve",
    "--run",
    "-r",
    "--multirun",
    "-m",
    "--shell-completion",
    "-sc",
    "-i",
}
# Hydra flags after which nothing runs: the config or Hydra's help is printed.
PRINT_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


@dataclass
class Parsed:
    flags: set[str]
    multirun: bool
    only_print: bool  # --cfg, --info, --help: nothing runs, nothing is written
    hydra: list[str]  # the hydra.* overrides, the same for every job
    jobs: list[list[str]]  # each job's own overrides (one job without -m)
    swept: set[str]  # the keys a -m sweep varies, to name a job by

    def where(self, num: int, job: list[str]) -> str:
        """How a message names a -m job: its number and the swept values, as typed."""
        if not self.multirun:
            return ""
        shown = [ov.replace("\\", "") for ov in job if ov.split("=", 1)[0] in self.swept]
        return f"-m job #{num}" + (f" ({' '.join(shown)})" if shown else "") + ": "


def check_overrides(config_name: str, args: list[str], task: ModuleType | None = None) -> None:
    """Everything that can refuse the command before Hydra starts. `task` is the command's module (its OUTPUTS,
    SWEEP_OUTPUTS, check_targets and check(cfg, run_dir), run for every -m job). A failure is a UserError naming
    the override (and the -m job)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    parsed = parse(args)
    dirs: dict[str, int] = {}  # each -m job's run dir, and the job's number
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="diffuse.conf", version_base=None):
            for num, job in enumerate(parsed.jobs):
                try:
                    check_job(config_name, task, parsed, num, job, dirs)
                except UserError as e:
                    raise UserError(f"{parsed.where(num, job)}{e}") from None
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()


def parse(args: list[str]) -> Parsed:
    """The command line as Hydra will read it, with what it refuses (or would only fail on later) as one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    _refuse_foreign_flags(args)
    flags = {a for a in args if a.startswith("-")}
    multirun = bool(flags & {"-m", "--multirun"})
    if multirun and flags & {"--cfg", "-c", "--info", "-i"}:  # else Hydra's ValueError traceback
        raise UserError(
            "-m cannot be combined with --cfg or --info: print one job's config without -m (each job is composed the same way)"
        )
    try:
        parsed = OverridesParser.create().parse_overrides(overrides_of(args))
    except HydraException as e:
        raise UserError(one_line(e)) from None
    for o in parsed:
        _refuse(o, multirun)
    task = [o for o in parsed if not o.is_hydra_override()]
    return Parsed(
        flags=flags,
        multirun=multirun,
        only_print=bool(flags & PRINT_FLAGS),
        hydra=[o.input_line for o in parsed if o.is_hydra_override()],
        jobs=expand(task, multirun),
        swept={o.get_key_element() for o in task if o.is_sweep_override()},
    )


def _refuse_foreign_flags(args: list[str]) -> None:
    """`--n 4` or `--steps=20`: a key spelled as an option. Hydra would take the value for an override of its own
    (a lexer error) and the flag for its usage text; one line gives the override instead."""
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        name, eq, value = a.partition("=")
        if a in FLAGS_WITH_VALUE:
            skip = True
            continue
        if not a.startswith("-") or name in HYDRA_FLAGS:
            continue
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
            value = args[i + 1]
        key = name.lstrip("-").replace("-", "_")
        shown = a if eq or not value else f"{a} {value}"
        raise UserError(
            f"{shown} is not an option of this command: its keys are overrides, {key}={value or 'VALUE'} (see --help)"
        )


def overrides_of(args: list[str]) -> list[str]:
    """The overrides among the arguments: not Hydra's flags, nor the values of those that take one."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in FLAGS_WITH_VALUE:
            skip = True
            continue
        if a.startswith("-"):
            continue
        out.append(a)
    return out


def _refuse(o, multirun: bool) -> None:
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


def expand(task_overrides: list, multirun: bool) -> list[list[str]]:
    """The jobs Hydra's basic sweeper will run: the product of the sweeps under -m, else the one job."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException

    if not multirun:
        return [[o.input_line for o in task_overrides]]
    try:
        return BasicSweeper.split_arguments(task_overrides, None)[0]
    except HydraException as e:
        raise UserError(one_line(e)) from None


def check_job(
    config_name: str, task: ModuleType | None, parsed: Parsed, num: int, job: list[str], dirs: dict[str, int]
) -> None:
    """One job composed as Hydra will run it and resolved; its run dir usable (and under -m its own); under -m also
    its outputs, its run dir and the sweep dir free, and the task's check."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    cfg = _compose(config_name, [*parsed.hydra, *job], parsed.multirun, num)
    if parsed.only_print:  # --cfg job --resolve resolves what it prints
        if "--resolve" in parsed.flags:
            HydraConfig.instance().set_config(cfg)
            resolve(cfg, lambda: OmegaConf.to_container(job_config(cfg), resolve=True))
        return
    sweep_dir = resolve(cfg, lambda: str(cfg.hydra.sweep.dir)) if parsed.multirun else None
    run = _run_dir(cfg, num, sweep_dir, dirs)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = os.path.abspath(run)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the job's config resolves as in the job
    job_cfg = job_config(cfg)
    resolve(job_cfg, lambda: OmegaConf.to_container(job_cfg, resolve=True))
    if not parsed.multirun or task is None:
        return
    if num == 0:
        check_sweep_outputs(config_name, task, Path(sweep_dir))
        lock.check_free(Path(sweep_dir))
    check_outputs(config_name, task, job_cfg, Path(run))
    lock.check_free(Path(run))
    task.check(job_cfg, Path(run))


def _compose(config_name: str, overrides: list[str], multirun: bool, num: int):
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(one_line(e)) from None
    with open_dict(cfg):
        cfg.hydra.job.name = "cli"  # as Hydra names the job of a function in diffuse/cli.py
        if multirun:
            cfg.hydra.job.num = cfg.hydra.job.id = num
    return cfg


def _run_dir(cfg, num: int, sweep_dir: str | None, dirs: dict[str, int]) -> str:
    """The job's run dir, refused unless it can be made (and, under -m, unless it is its own)."""
    if sweep_dir is None:
        run = resolve(cfg, lambda: str(cfg.hydra.run.dir))
        check_dir_target(Path(run), f"hydra.run.dir={run}")
        return run
    if num == 0:
        check_dir_target(Path(sweep_dir), f"hydra.sweep.dir={sweep_dir}")
    run = os.path.join(sweep_dir, resolve(cfg, lambda: str(cfg.hydra.sweep.subdir)))
    check_dir_target(Path(run), f"its run dir {run}")
    if os.path.abspath(run) == os.path.abspath(sweep_dir):  # the sweep itself holds that dir
        raise UserError(f"it would run in the sweep dir {sweep_dir} itself: hydra.sweep.subdir must name a subdir")
    other = dirs.setdefault(os.path.abspath(run), num)
    if other != num:  # the later job would write over the earlier one's outputs
        raise UserError(
            f"it would run in {run}, as job #{other} does: hydra.sweep.subdir must differ "
            "from job to job (the default is ${hydra.job.num})"
        )
    return run


def job_config(cfg):
    """What Hydra hands the job: its config without the hydra node."""
    from omegaconf import open_dict, read_write

    job_cfg = copy.deepcopy(cfg)
    with read_write(job_cfg), open_dict(job_cfg):
        del job_cfg["hydra"]
    return job_cfg


def resolve(cfg, get):
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


def one_line(e: Exception) -> str:
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
