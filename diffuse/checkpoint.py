"""safetensors checkpoints that describe themselves, written atomically, verified on load.

One file holds tensors named
    model.<param>      the trained weights
    ema.<param>        their exponential moving average (what sampling uses by default)
    optim.<i>.<key>    optimizer state of parameter i (AdamW's step, exp_avg, exp_avg_sq)
    rng.<name>         generator states (uint8), for exact resume
and string metadata
    diffuse.format     format version
    diffuse.config     the resolved config as JSON: enough to rebuild the network, schedule and objective
    diffuse.step       training step
    diffuse.optim      optimizer param_groups (hyper-parameters) as JSON
    diffuse.extra      any other JSON state (e.g. counters)
    diffuse.tuned      noise-level schedules diffuse tune-schedule found for these weights, "sampler/steps" -> levels
    diffuse.sha256     hash of every tensor's name, dtype, shape and bytes: a truncated or altered file is refused

Only safetensors and JSON are read: loading a checkpoint never runs code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from diffuse.errors import UserError

FORMAT = "1"


@dataclass
class Checkpoint:
    config: dict
    step: int = 0
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    optim: Optional[dict] = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    tuned: dict = field(default_factory=dict)


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _flatten_optim(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for idx, pstate in state["state"].items():
        for key, val in pstate.items():
            tensors[f"optim.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return tensors, state["param_groups"]


def _unflatten_optim(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": groups}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # safetensors wants contiguous, unshared CPU storage.
    return t.detach().to("cpu").contiguous().clone()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, sd in (("model", ckpt.model), ("ema", ckpt.ema), ("rng", ckpt.rng)):
        for k, v in sd.items():
            tensors[f"{prefix}.{k}"] = _cpu(v)
    groups: list = []
    if ckpt.optim is not None:
        flat, groups = _flatten_optim(ckpt.optim)
        tensors.update({k: _cpu(v) for k, v in flat.items()})
    meta = {
        "diffuse.format": FORMAT,
        "diffuse.config": json.dumps(ckpt.config, sort_keys=True),
        "diffuse.step": str(int(ckpt.step)),
        "diffuse.optim": json.dumps(groups),
        "diffuse.extra": json.dumps(ckpt.extra, sort_keys=True),
        "diffuse.tuned": json.dumps(ckpt.tuned, sort_keys=True),
        "diffuse.sha256": content_hash(tensors),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then fsync and rename over `path`: readers see the old file or the new one, never half.
    A full disk or a read-only or forbidden directory is the user's to fix: one line naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        _raise_if_environment(e, path)
        raise
    os.close(fd)
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes it 0600; the file gets the mode a plain open() would give
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            _raise_if_environment(e, path)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# errno values that say the storage, not the program, is at fault.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def _raise_if_environment(e: OSError, path: Path) -> None:
    if e.errno in ENVIRONMENT_ERRNOS:
        raise UserError(f"cannot write {path}: {e.strerror or os.strerror(e.errno)}") from None


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files of writes that were killed before their rename (.NAME.XXXX.tmp); they are never
    read, only in the way. Returns what was removed."""
    gone = []
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a malformed header
        raise UserError(f"{path}: not a readable safetensors file ({_short(e)})") from None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    meta = read_metadata(path)
    if "diffuse.config" not in meta:
        raise UserError(f"{path} is a safetensors file but not a diffuse checkpoint (no diffuse.config metadata)")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise UserError(f"{path}: checkpoint is truncated or corrupted ({_short(e)})") from None
    if verify and meta.get("diffuse.sha256") and content_hash(tensors) != meta["diffuse.sha256"]:
        raise UserError(f"{path}: checkpoint is corrupted (content hash mismatch)")
    try:
        config = json.loads(meta["diffuse.config"])
        groups = json.loads(meta.get("diffuse.optim", "[]"))
        extra = json.loads(meta.get("diffuse.extra", "{}"))
        tuned = json.loads(meta.get("diffuse.tuned", "{}"))
        step = int(meta.get("diffuse.step", "0"))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: checkpoint metadata is not valid JSON ({_short(e)})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "rng": {}, "optim": {}}
    for name, t in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix in parts:
            parts[prefix][rest if prefix != "optim" else name] = t
    optim = _unflatten_optim(parts["optim"], groups) if groups else None
    return Checkpoint(config=config, step=step, model=parts["model"], ema=parts["ema"], optim=optim, rng=parts["rng"], extra=extra, tuned=tuned)


def numbered_step(path: Path) -> Optional[int]:
    """The step of a numbered checkpoint (step_NNNNNNN.safetensors, any number of digits), else None."""
    m = re.fullmatch(r"step_(\d+)\.safetensors", Path(path).name)
    return int(m.group(1)) if m else None


def numbered_checkpoints(ckdir: Path) -> list[Path]:
    """The numbered checkpoints of a checkpoints/ dir, oldest step first (by number, not by name)."""
    found = [p for p in Path(ckdir).glob("step_*.safetensors") if numbered_step(p) is not None]
    return sorted(found, key=numbered_step)


def load_newest_valid(ckdir: Path, report=None) -> tuple[Checkpoint, Path]:
    """The checkpoint of the highest step in `ckdir` that loads and verifies: last.safetensors, or a numbered
    one when last.safetensors is damaged (or older, after a kill between the two writes). Each damaged file
    passed over is reported in one line through `report`; if none is valid, one UserError lists them."""
    ckdir = Path(ckdir)
    last = ckdir / "last.safetensors"
    candidates: list[tuple[int, int, Path]] = []  # (step, last first at equal steps, path)
    bad: list[str] = []
    if last.is_file():
        try:
            candidates.append((int(read_metadata(last).get("diffuse.step", "-1")), 1, last))
        except (UserError, ValueError) as e:
            bad.append(str(e))
    candidates += [(numbered_step(p), 0, p) for p in numbered_checkpoints(ckdir)]
    if not candidates and not bad:
        raise UserError(f"resume=true but {ckdir} holds no checkpoint: give hydra.run.dir=THE_RUN_DIR or resume=PATH")
    for _, _, path in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        try:
            ckpt = load_checkpoint(path)
        except UserError as e:
            bad.append(str(e))
            continue
        for line in bad:
            (report or print)(f"warning: {line}; resuming from the newest valid checkpoint, {path.name}")
        return ckpt, path
    raise UserError(f"no valid checkpoint to resume from in {ckdir}: " + "; ".join(bad))


def resolve_ckpt_path(value: Any) -> Path:
    """`ckpt=` takes a checkpoint file or a training run dir (its checkpoints/last.safetensors)."""
    if value is None or value == "":
        raise UserError("ckpt= is required: a .safetensors checkpoint or a training run dir")
    p = Path(str(value)).expanduser()
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.safetensors", p / "last.safetensors"):
            if cand.is_file():
                return cand
        raise UserError(f"ckpt={str(value)!r} is a directory without checkpoints/last.safetensors")
    if not p.exists():
        raise UserError(f"ckpt={str(value)!r} does not exist")
    return p


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
