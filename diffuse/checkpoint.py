"""safetensors checkpoints that describe themselves, written atomically, verified on load.

One file holds tensors named
    model.<param>      the trained weights
    ema.<param>        their exponential moving average (what sampling uses by default)
    optim.<i>.<key>    optimizer state of parameter i (AdamW's step, exp_avg, exp_avg_sq)
    rng.<name>         generator states (uint8), for exact resume
    aux.<part>.<param> a training objective's own networks: the teacher of a distillation round, a target network
and string metadata
    diffuse.format     format version
    diffuse.config     the resolved config as JSON: enough to rebuild the network, schedule and objective
    diffuse.step       training step
    diffuse.optim      optimizer param_groups (hyper-parameters) as JSON
    diffuse.extra      any other JSON state (e.g. counters)
    diffuse.tuned      noise-level schedules diffuse tune-schedule found for these weights, "sampler/steps" -> levels
    diffuse.sha256     hash of the whole file's content: every other metadata entry (key and value) and every
                       tensor's name, dtype, shape and bytes; a truncated or altered file is refused

Format 1 (before the hash covered the metadata) hashed the tensors alone: such a file still loads, with a warning
that its metadata is unverified. A file with no hash loads only when the caller passes verify=False (the user's
`verify=false`), again with a warning. Only safetensors and JSON are read: loading a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffuse.errors import UserError
from diffuse.io import atomic_write

FORMAT = "2"
HASH_KEY = "diffuse.sha256"


@dataclass
class Checkpoint:
    config: dict
    step: int = 0
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    optim: dict | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    tuned: dict = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # a training objective's own networks (teacher., target.)
    # What the stored hash vouched for when it was loaded: "all" (format 2: metadata and tensors), "tensors"
    # (format 1: the metadata is unverified) or "none" (no hash, loaded with verify=False).
    verified: str = "all"


def _bytes(t: torch.Tensor):
    # A flat uint8 view that hashlib reads in place, without a copy of the tensor's bytes.
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of tensors alone (names, dtypes, shapes, bytes): format 1's checkpoint hash, and the identity of a
    set of weights (e.g. a feature network's)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def checkpoint_hash(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 of a whole checkpoint: every metadata entry but the hash itself, then every tensor. Each field is
    length-prefixed, so no two different contents encode to the same byte stream."""
    h = hashlib.sha256(b"diffuse checkpoint 2\n")

    def put(data) -> None:
        data = data.encode() if isinstance(data, str) else data
        h.update(len(memoryview(data).cast("B")).to_bytes(8, "little"))
        h.update(data)

    for key in sorted(meta):
        if key != HASH_KEY:
            put("meta"), put(key), put(meta[key])
    for name in sorted(tensors):
        t = tensors[name]
        put("tensor"), put(name), put(str(t.dtype)), put(json.dumps(list(t.shape))), put(_bytes(t))
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
    for prefix, sd in (("model", ckpt.model), ("ema", ckpt.ema), ("rng", ckpt.rng), ("aux", ckpt.aux)):
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
    }
    meta[HASH_KEY] = checkpoint_hash(tensors, meta)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a malformed header
        raise UserError(f"{path}: not a readable safetensors file ({_short(e)})") from None


def load_checkpoint(
    path: str | Path, *, verify: bool = True, report: Callable[[str], None] | None = None
) -> Checkpoint:
    """The checkpoint at `path`, its hash checked: a file whose hash does not match is refused whatever `verify`
    says; verify=False only lets a file that carries no hash load (said in one line through `report`, as is a
    format-1 file whose hash covers its tensors only)."""
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
    verified = check_hash(path, meta, tensors, verify, report)
    try:
        config = json.loads(meta["diffuse.config"])
        groups = json.loads(meta.get("diffuse.optim", "[]"))
        extra = json.loads(meta.get("diffuse.extra", "{}"))
        tuned = json.loads(meta.get("diffuse.tuned", "{}"))
        step = int(meta.get("diffuse.step", "0"))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: checkpoint metadata is not valid JSON ({_short(e)})") from None
    if step < 0:
        raise UserError(f"{path}: checkpoint metadata diffuse.step={step} is not allowed: a step count is >= 0")
    for name, val, kind in (
        ("diffuse.config", config, dict),
        ("diffuse.optim", groups, list),
        ("diffuse.extra", extra, dict),
        ("diffuse.tuned", tuned, dict),
    ):
        if not isinstance(val, kind):
            raise UserError(f"{path}: checkpoint metadata {name} is not a JSON {'object' if kind is dict else 'list'}")
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "rng": {}, "optim": {}, "aux": {}}
    for name, t in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix in parts:
            parts[prefix][rest if prefix != "optim" else name] = t
    optim = _unflatten_optim(parts["optim"], groups) if groups else None
    return Checkpoint(
        config=config,
        step=step,
        model=parts["model"],
        ema=parts["ema"],
        optim=optim,
        rng=parts["rng"],
        extra=extra,
        tuned=tuned,
        aux=parts["aux"],
        verified=verified,
    )


def check_hash(
    path: Path,
    meta: dict[str, str],
    tensors: dict[str, torch.Tensor],
    verify: bool,
    report: Callable[[str], None] | None,
) -> str:
    """What the stored hash vouches for ("all", "tensors" or "none"), or a UserError for a file it does not fit."""
    say = report or _warn
    stored = meta.get(HASH_KEY)
    if not stored:
        if verify:
            raise UserError(
                f"{path} carries no content hash ({HASH_KEY}), so it cannot be verified: pass verify=false "
                "to load it anyway if you trust where it came from"
            )
        say(f"warning: {path} carries no content hash: loaded unverified (verify=false)")
        return "none"
    if checkpoint_hash(tensors, meta) == stored:
        return "all"
    # Format 1 hashed the tensors alone. Only a file that says it is format 1 is held to that weaker rule: one
    # that says 2 and fits only the old hash has been altered (its metadata, or the hash itself).
    if meta.get("diffuse.format", "1") == "1" and content_hash(tensors) == stored:
        say(
            f"warning: {path} was written by an older diffuse (checkpoint format 1): its hash covers the tensors only, "
            "so its metadata (config, step) is unverified"
        )
        return "tensors"
    raise UserError(
        f"{path}: checkpoint is corrupted (content hash mismatch: its metadata or tensors were changed "
        "after it was written)"
    )


def _warn(line: str) -> None:
    from diffuse.console import err_console

    err_console.print(line, markup=False, soft_wrap=True)


def numbered_step(path: Path) -> int | None:
    """The step of a numbered checkpoint (step_NNNNNNN.safetensors, any number of digits), else None."""
    m = re.fullmatch(r"step_(\d+)\.safetensors", Path(path).name)
    return int(m.group(1)) if m else None


def numbered_checkpoints(ckdir: Path) -> list[Path]:
    """The numbered checkpoints of a checkpoints/ dir, oldest step first (by number, not by name)."""
    found = [p for p in Path(ckdir).glob("step_*.safetensors") if numbered_step(p) is not None]
    return sorted(found, key=numbered_step)


def load_newest_valid(
    ckdir: Path, report=None, *, verify: bool = True, asked: str = "resume=true"
) -> tuple[Checkpoint, Path]:
    """The checkpoint of the highest step in `ckdir` that loads and verifies: last.safetensors, or a numbered
    one when last.safetensors is damaged (or older, after a kill between the two writes). Each damaged file
    passed over is reported in one line through `report`; if none is valid, one UserError lists them. `asked`
    is what the user typed to get here (resume=true, resume=PATH), for the message when there is nothing."""
    ckdir = Path(ckdir)
    last = ckdir / "last.safetensors"
    candidates: list[tuple[int, int, Path]] = []  # (step, last first at equal steps, path)
    bad: list[str] = []
    if last.is_file():
        try:
            meta = read_metadata(last)
            if "diffuse.config" not in meta:  # somebody else's file: passed over in a warning line, like a damaged one
                raise UserError(
                    f"{last} is a safetensors file but not a diffuse checkpoint (no diffuse.config metadata)"
                )
            candidates.append((int(meta.get("diffuse.step", "-1")), 1, last))
        except (UserError, ValueError) as e:
            bad.append(str(e))
    candidates += [(numbered_step(p), 0, p) for p in numbered_checkpoints(ckdir)]
    if not candidates and not bad:
        hint = (
            "give hydra.run.dir=THE_RUN_DIR or resume=PATH"
            if asked == "resume=true"
            else "give a checkpoint file, or a run dir with checkpoints/"
        )
        raise UserError(
            f"{asked} but {ckdir} holds no checkpoint (no last.safetensors, no step_NNNNNNN.safetensors): {hint}"
        )
    for _, _, path in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        try:
            ckpt = load_checkpoint(path, verify=verify, report=report)
        except UserError as e:
            bad.append(str(e))
            continue
        for line in bad:
            (report or print)(f"warning: {line}; resuming from the newest valid checkpoint, {path.name}")
        return ckpt, path
    raise UserError(f"no valid checkpoint to resume from in {ckdir}: " + "; ".join(bad))


def resolve_ckpt_path(value: Any, key: str = "ckpt") -> Path:
    """`ckpt=` takes a checkpoint file or a training run dir (its checkpoints/last.safetensors); `key` is the
    option the user gave it as (ckpt, resume), for the messages."""
    if value is None or value == "":
        raise UserError(f"{key}= is required: a .safetensors checkpoint or a training run dir")
    p = Path(str(value)).expanduser()
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.safetensors", p / "last.safetensors"):
            if cand.is_file():
                return cand
        raise UserError(f"{key}={str(value)!r} is a directory without checkpoints/last.safetensors")
    if not p.exists():
        raise UserError(f"{key}={str(value)!r} does not exist")
    return p


def check_verify(value: Any) -> bool:
    """The `verify` key: true (a checkpoint must carry a hash that fits it) or false (one without a hash loads)."""
    if not isinstance(value, bool):
        raise UserError(f"verify={value!r} is not allowed: true, or false to load a checkpoint that carries no hash")
    return value


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


# The objective YAML of each kind: what a checkpoint written before a key existed (or by diffuse convert, which
# records only what the source tells) is read as having. Training writes every key, so its checkpoints are unchanged.
OBJECTIVE_FILES = {"diffusion": "simple.yaml", "edm": "edm.yaml", "consistency": "consistency.yaml"}


def objective_defaults(kind: str) -> dict:
    """conf/objective/<kind's file>, over simple.yaml (the defaults list those files start from)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    folder = files("diffuse.conf") / "objective"
    merged = {}
    for name in dict.fromkeys(("simple.yaml", OBJECTIVE_FILES[kind])):
        part = OmegaConf.to_container(OmegaConf.create((folder / name).read_text()), resolve=True)
        part.pop("defaults", None)
        merged.update(part)
    return merged


def complete_config(config: dict) -> dict:
    """A checkpoint's config with what older and converted checkpoints lack filled in, once, where it is read: the
    objective's keys from the YAML of its kind (kind itself: diffusion), data.is_8bit (true). A value that is there
    is kept as it is, for the readers' checks to judge; a config whose objective or data is not a mapping, or whose
    kind is unknown, is left to them too."""
    config = dict(config)
    objective = config.get("objective")
    if objective is None or isinstance(objective, dict):
        objective = {"kind": "diffusion", **(objective or {})}
        if objective["kind"] in OBJECTIVE_FILES:
            objective = {**objective_defaults(objective["kind"]), **objective}
        config["objective"] = objective
    data = config.get("data")
    if data is None or isinstance(data, dict):
        config["data"] = {"is_8bit": True, **(data or {})}
    return config


def check_weights(tensors: dict[str, torch.Tensor], where: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """One line for weights a network cannot hold: a tensor that is not floating point (int64, bool: a file
    written by something else) or has a NaN or infinite value (a run that diverged, or a damaged file whose hash
    was written after the damage). Checked once per tensor, where weights are read, before anything samples from
    them. `prefix` names the part of the file (ema., model.) in the message."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise UserError(
                f"{where}: tensor {prefix}{name} is {str(t.dtype).removeprefix('torch.')}: weights are floating point"
            )
        if not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise UserError(
                f"{where}: tensor {prefix}{name} holds {bad} values: these weights cannot be sampled from "
                "(a diverged run, or a damaged file): use an earlier checkpoint"
            )
    return tensors
