"""What every command's job shares: the run dir guard, devices, schedules and denoisers from configs."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from diffuse.errors import UserError

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def to_dict(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def guarded(job: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> Any:
    """Run a command's job in its Hydra run dir. A UserError leaves no new file behind (unless it asks to keep
    them) and exits with its code (2) and one line; anything else is an internal error and keeps its traceback."""
    out = run_dir()
    before = _listing(out)
    try:
        result = job(cfg, out)
    except UserError as e:
        if not e.keep_outputs:
            _remove_new(out, before)
        err_console.print(f"error: {e}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"run dir: {out.resolve()}", markup=False, soft_wrap=True)
    return result


def _listing(root: Path) -> set[Path]:
    if not root.exists():
        return set()
    return {p for p in root.rglob("*")} | {root}


def _remove_new(root: Path, before: set[Path]) -> None:
    """Delete what this job (and Hydra, for it) created; leave anything that was there before."""
    if not root.exists():
        return
    hydra_dir = root / ".hydra"
    # Hydra makes the run dir and its .hydra/ record before the job starts: the dir is this run's own if
    # nothing else was in it.
    created_root = all(p == root or p == hydra_dir or hydra_dir in p.parents for p in before)
    for p in sorted(_listing(root) - before, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if created_root and hydra_dir.exists():
        shutil.rmtree(hydra_dir, ignore_errors=True)
    if created_root:
        # Remove the run dir, and the parents Hydra made for it under ./outputs (outputs/sample/...) if now
        # empty; a directory the user named (hydra.run.dir=...) is never climbed out of.
        outputs = (Path.cwd() / "outputs").resolve()
        p = root.resolve()
        try:
            p.rmdir()
        except OSError:
            return
        while outputs in p.parents:
            p = p.parent
            try:
                p.rmdir()
            except OSError:
                break


def save_resolved_config(cfg: DictConfig, out: Path) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes
        return
    from diffuse.checkpoint import atomic_write

    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))


def pick_device(name: str) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device={name!r} is not allowed: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} asked for, but no CUDA device is available: use device=cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r} is not allowed: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun each rank owns GPU LOCAL_RANK: chosen here, before any network or tensor is placed, so
        # that nothing lands on GPU 0 of every rank.
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast on CUDA by default; the CPU runs float32 (its bf16 convs are slower, not faster)."""
    if precision in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    raise UserError(f"precision={precision!r} is not allowed: choose one of auto, fp32, bf16")


def build_schedule(cfg: Any):
    from diffuse.diffusion.schedule import make_schedule

    cfg = dict(to_dict(cfg) or {})
    kind = cfg.pop("kind", "linear")
    allowed = {"T", "beta_start", "beta_end", "cosine_s", "sigmoid_start", "sigmoid_end", "sigmoid_tau", "max_beta"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise UserError(f"schedule.{unknown[0]} is not a schedule option: allowed are kind, {', '.join(sorted(allowed))}")
    for key, val in cfg.items():
        if key != "T" and (isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val)):
            raise UserError(f"schedule.{key}={val!r} is not allowed: it must be a finite number")
    return make_schedule(kind, **cfg)


def check_number(name: str, value: Any, *, minimum=None, maximum=None, integer=False, exclusive_min=False) -> Any:
    """One clear line for a value of the wrong type or out of range."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)) or (not integer and not math.isfinite(value)):
        raise UserError(f"{name}={value!r} is not allowed: it must be {kind}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        raise UserError(f"{name}={value!r} is not allowed: it must be {'>' if exclusive_min else '>='} {minimum}")
    if maximum is not None and value > maximum:
        raise UserError(f"{name}={value!r} is not allowed: it must be <= {maximum}")
    return value


def write_json(path: Path, obj: Any) -> None:
    from diffuse.checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + os.linesep))
