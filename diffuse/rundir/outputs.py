"""The paths a command writes, checked before the work starts: a directory where a file goes, or a file where a
directory goes, would otherwise fail only when the file is written, after the work. Each task module declares its
own OUTPUTS (a name ending in / is a directory, a glob names numbered files) and, where it writes elsewhere too, a
check_targets(cfg, out)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

from omegaconf import DictConfig

from diffuse.errors import UserError

# What every training command writes (train, distill, train-classifier, train-ae add their own files).
TRAINING_OUTPUTS = (
    "checkpoints/",
    "config.yaml",
    "metrics.jsonl",
    "checkpoints/last.safetensors",
    "checkpoints/step_*.safetensors",
)
# Hydra's record of a run, written by rundir.guard into every run dir.
RECORD_DIR = ".hydra"
RECORD = ("config.yaml", "hydra.yaml", "overrides.yaml")


def who(command: str) -> str:
    """How a message names the command (train_ae -> diffuse train-ae)."""
    return f"diffuse {command.replace('_', '-')}"


def check_outputs(command: str, task: ModuleType, cfg: DictConfig, out: Path) -> None:
    """One line if the run dir is not this run's to write (check_owner), or a path the command writes cannot be
    written: the wrong kind of entry is there, a directory it writes into is not writable, or one of the task's own
    targets (check_targets) is refused."""
    check_owner(command, out)
    check_paths(out, (*task.OUTPUTS, f"{RECORD_DIR}/", *(f"{RECORD_DIR}/{n}" for n in RECORD)), who(command))
    targets = getattr(task, "check_targets", None)
    if targets is not None:
        targets(cfg, out)
    check_fresh(command, task, cfg, out)


def made_by(out: Path) -> str | None:
    """The command whose run dir `out` is, as its Hydra record (.hydra/hydra.yaml) names it; None for a dir no
    diffuse command has run in (or whose record cannot be read: then its outputs alone speak for it)."""
    record = out / RECORD_DIR / "hydra.yaml"
    try:
        text = record.read_text() if record.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():  # config_name sits once, under hydra.job; no YAML parse of a file we only glance at
        if line.strip().startswith("config_name:"):
            name = line.split(":", 1)[1].strip().strip("'\"")
            return name or None
    return None


def check_owner(command: str, out: Path) -> None:
    """A run dir belongs to one run: another command's run dir is refused (a sample into a training run would
    replace its config.yaml and record, a train-ae its checkpoints)."""
    owner = made_by(out)
    if owner is not None and owner != command:
        raise UserError(
            f"{out} is the run dir of {who(owner)}: {who(command)} writes into a run dir of its own; "
            "choose another hydra.run.dir"
        )


def check_fresh(command: str, task: ModuleType, cfg: DictConfig, out: Path) -> None:
    """A fresh run (resume=false, or a command that cannot resume) into a dir that already holds this command's
    outputs is refused: it would replace them."""
    resume = cfg.get("resume")  # not every command resumes
    if resume is not False and resume is not None:
        return  # true / auto / a checkpoint: the task's own resume checks judge the dir
    kept = {"config.yaml"}  # rewritten by every run, as the record is
    for pattern in task.OUTPUTS:
        name = pattern.rstrip("/")
        for p in out.glob(name) if any(c in name for c in "*?[") else [out / name]:
            if p.name not in kept and (p.is_file() or (p.is_dir() and any(p.iterdir()))):
                again = " resume=true continues it, or" if resume is False else ""
                raise UserError(
                    f"{out} already holds the outputs of an earlier {who(command)} ({p.relative_to(out)}):{again} "
                    "choose another hydra.run.dir"
                )


def check_sweep_outputs(command: str, task: ModuleType, sweep_dir: Path) -> None:
    """What a -m sweep writes into its sweep dir: Hydra's multirun.yaml, and the task's SWEEP_OUTPUTS (eval's
    summary)."""
    check_paths(sweep_dir, ("multirun.yaml", *getattr(task, "SWEEP_OUTPUTS", ())), f"{who(command)} -m")


def check_paths(root: Path, patterns, who: str) -> None:
    for pattern in patterns:
        want_dir = pattern.endswith("/")
        name = pattern.rstrip("/")
        found = root.glob(name) if any(c in name for c in "*?[") else [root / name]
        for p in found:
            if want_dir and os.path.lexists(p) and not p.is_dir():
                raise UserError(
                    f"{p} is not a directory: {who} writes into a directory {p.name}/ there; move it away, or choose another run dir"
                )
            if want_dir and p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
                raise UserError(f"{p} is not writable: {who} writes into it")
            if not want_dir and p.is_dir():
                raise UserError(
                    f"{p} is a directory: {who} writes a file {p.name} there; move it away, or choose another run dir"
                )


def check_checkpoint_dir(out: Path) -> None:
    """A training command's checkpoints/: a file that is not a diffuse checkpoint where training writes (or prunes)
    checkpoints is one line; such a file is never overwritten."""
    ckdir = out / "checkpoints"
    for p in [ckdir / "last.safetensors", *sorted(ckdir.glob("step_*.safetensors"))]:
        if p.is_file() and not is_diffuse_checkpoint(p):
            raise UserError(
                f"{p} is not a diffuse checkpoint: training would overwrite it; move it away, or choose another hydra.run.dir"
            )


def check_dir_target(path: Path, label: str) -> None:
    """One line unless `path` is a writable directory or can be made one (what Hydra's mkdir of a run dir needs);
    `label` names it for the user (hydra.run.dir=PATH)."""
    p = Path(os.path.abspath(path))
    existing = p
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is not a directory" if existing == p else f"cannot be created: {existing} is not a directory"
        raise UserError(f"{label} {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == p else f"cannot be created: {existing} is not writable"
        raise UserError(f"{label} {what}")
    _probe(existing, p, label)


def _probe(existing: Path, p: Path, label: str) -> None:
    """Make and remove an entry in `existing`, as the command will: permission bits do not tell whether a file
    system takes new entries (/proc, /sys, a read-only mount say yes to access() as root)."""
    import tempfile

    try:
        if existing == p:
            fd, tmp = tempfile.mkstemp(dir=existing, prefix=".diffuse-probe-")
            os.close(fd)
            os.unlink(tmp)
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".diffuse-probe-"))
    except OSError as e:
        reason = e.strerror or type(e).__name__
        what = f"is not writable ({reason})" if existing == p else f"cannot be created in {existing} ({reason})"
        raise UserError(f"{label} {what}") from None


def check_file_target(path: Path, key: str) -> None:
    """One line unless a file can be written at `path`."""
    if path.is_dir():
        raise UserError(f"{key} {path} is a directory: give a file name")
    check_dir_target(path.parent, f"{key} {path}: its folder {path.parent}")


def is_diffuse_checkpoint(path: Path) -> bool:
    """Whether `path`'s safetensors header names it a diffuse checkpoint. Its tensors may still be damaged: resume
    passes over those, and training rewrites them; anything else is somebody else's file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100 << 20:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and any(str(k).startswith("diffuse.") for k in meta)
