"""What every importer shares: a diffusers folder's files found, JSON and safetensors read (a header alone, or every
tensor), --out checked before any work, a diffusers config.json checked key by key, diffusers' attention layers as
ours, mapped tensors held to the network they are for, and the converted checkpoint written. Only safetensors and
JSON are read: pickled weights (.bin, .pt, .ckpt) are refused, never opened, because loading them can run code."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch

from diffuse import nets
from diffuse.checkpoint import Checkpoint, check_weights, save_checkpoint
from diffuse.errors import UserError

WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def find_files(src: str | Path) -> tuple[Path, Path, Path | None]:
    """(config.json, weights, scheduler_config.json or None) for a model dir, a pipeline dir or one of the files."""
    p = Path(src).expanduser()
    if not p.exists():
        raise UserError(f"{src}: no such file or directory (give a diffusers model folder or its {WEIGHTS})")
    given = None  # a weights file named on the command line (e.g. a .fp16.safetensors variant)
    if p.is_file():
        if p.suffix in PICKLED:
            raise UserError(
                f"{p}: pickled weights are refused (loading them can run code): give the {WEIGHTS} file or its folder"
            )
        if p.name == "config.json" or p.suffix == ".safetensors":
            given = p if p.suffix == ".safetensors" else None
            p = p.parent
        else:
            raise UserError(f"{p}: not a diffusers model file: give a folder with config.json and {WEIGHTS}")
    model_dir = p if (p / "config.json").is_file() else p / "unet"
    if not (model_dir / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        model_dir = p / "vae"  # a pipeline folder holding only its autoencoder
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{p}: no config.json (nor unet/config.json): not a diffusers model or pipeline folder")
    weights = given if given is not None and given.parent == model_dir else model_dir / WEIGHTS
    if not weights.is_file():
        pickled = sorted(q.name for q in model_dir.iterdir() if q.suffix in PICKLED)
        if pickled:
            raise UserError(
                f"{model_dir}: only pickled weights ({pickled[0]}) are there and they are refused "
                "(loading them can run code): "
                f"save the model with safe_serialization to get {WEIGHTS}"
            )
        raise UserError(f"{model_dir}: no {WEIGHTS}")
    schedulers = (model_dir / "scheduler", model_dir.parent / "scheduler")
    sched = next((d / "scheduler_config.json" for d in schedulers if (d / "scheduler_config.json").is_file()), None)
    return model_dir / "config.json", weights, sched


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def conf_values(group: str, option: str, keys: Iterable[str] | None = None) -> dict:
    """The values conf/GROUP/OPTION.yaml sets (only `keys`, if given), read from the installed diffuse.conf: what a
    converted checkpoint records for what the other format does not say is what training with that option uses."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(str(files("diffuse.conf") / group / f"{option}.yaml")))
    return values if keys is None else {k: values[k] for k in keys}


def missing_parents(path: Path) -> tuple[list[Path], Path]:
    """The folders above `path` that do not exist yet, innermost first, and the nearest one that does."""
    missing, parent = [], path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing, parent


def check_out(out: Path, src: str | Path, force: bool = False) -> None:
    """--out FILE.safetensors, checked before any work: a file path whose folder exists or can be made, and can be
    written to; never the source itself nor a checkpoint of a run a live process holds, and an existing file only
    with --force (a converted checkpoint replaces it whole)."""
    from diffuse.rundir.lock import check_free

    if out.suffix != ".safetensors":
        raise UserError(f"--out={str(out)!r} is not allowed: the checkpoint is a .safetensors file")
    if out.is_dir():
        raise UserError(
            f"--out={str(out)!r} is a directory: give the checkpoint's file name, "
            f"e.g. --out {out / 'model.safetensors'}"
        )
    _, parent = missing_parents(out)
    if not parent.is_dir():
        raise UserError(f"--out={str(out)!r} cannot be written: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out={str(out)!r} cannot be written: {parent} is not writable")
    source = Path(src).expanduser()
    if out.exists() and any(
        out.resolve() == p.resolve() for p in (source, *source.glob("**/*.safetensors")) if p.exists()
    ):
        raise UserError(f"--out={str(out)!r} is the file being converted: write the checkpoint elsewhere")
    owner = out.parent.parent if out.parent.name == "checkpoints" else out.parent
    if owner.is_dir():
        try:
            check_free(owner)
        except UserError as e:
            raise UserError(f"--out={str(out)!r}: {e}") from None
    if out.exists() and not force:
        raise UserError(f"--out={str(out)!r} exists: give --force to replace it, or another file name")


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file declares, as meta tensors of their shapes: its header read, no data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a malformed header
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable safetensors file ({why})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or one line for a file that cannot be read as one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    return check_weights(tensors, str(path))


class DiffusersConfig:
    """A diffusers config.json with its class's constructor defaults filled in (what an absent key means). A key
    the converter does not know is refused, since it might change the network; each check refuses in one line that
    names the key and what `ours` (diffuse's network) needs instead."""

    def __init__(self, dcfg: dict, defaults: dict[str, Any], *, where: str, cls: str, ours: str, ignored=()):
        unknown = sorted(k for k in dcfg if not k.startswith("_") and k not in defaults and k not in ignored)
        if unknown:
            raise UserError(f"{where}: key {unknown[0]!r} is not {cls} setting this converter knows")
        self.values = {**defaults, **{k: v for k, v in dcfg.items() if not k.startswith("_")}}
        self.where, self.ours = where, ours

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def refuse(self, key: str, allowed: str) -> NoReturn:
        raise UserError(f"{self.where}: {key}={self[key]!r} cannot be converted: diffuse's {self.ours} needs {allowed}")

    def integer(self, key: str, lo: int, hi: int) -> int:
        if isinstance(self[key], bool) or not isinstance(self[key], int) or not lo <= self[key] <= hi:
            self.refuse(key, f"an integer from {lo} to {hi}")
        return self[key]

    def widths(self, key: str = "block_out_channels") -> list[int]:
        """Each level's width, in multiples of the first (ours are ch * ch_mult)."""
        chans = self[key]
        if (
            not isinstance(chans, list)
            or not 1 <= len(chans) <= nets.MAX_LEVELS
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= nets.MAX_WIDTH for x in chans)
        ):
            self.refuse(key, f"a list of 1 to {nets.MAX_LEVELS} integers, each from 1 to {nets.MAX_WIDTH}")
        if any(x % chans[0] for x in chans):
            self.refuse(key, f"multiples of its first entry {chans[0]}")
        return chans

    def side(self, key: str = "sample_size") -> Any:
        """The image side (None if not given): diffusers also writes a square size as [side, side]."""
        size = self.values.get(key)
        return size[0] if isinstance(size, list) and len(size) == 2 and size[0] == size[1] else size


def attn_weights(sd: dict, pre: str) -> dict[str, torch.Tensor]:
    """Diffusers' attention layer at `pre` as our AttnBlock's tensors, popped from `sd`; reads the current names
    (to_q, ...) and the ones of checkpoints saved before diffusers 0.15 (query, key, value, proj_attn). Diffusers
    keeps q, k, v as three linear layers, ours is one 1x1 conv producing [q; k; v]: the matrices are stacked."""

    def take(new: str, old: str, part: str) -> torch.Tensor:
        for name in (f"{pre}.{new}.{part}", f"{pre}.{old}.{part}"):
            if name in sd:
                return sd.pop(name)
        raise UserError(f"weights lack {pre}.{new}.{part}: they do not fit their config.json")

    out = {
        "norm.weight": take("group_norm", "group_norm", "weight"),
        "norm.bias": take("group_norm", "group_norm", "bias"),
    }
    qkv = [
        (take(f"to_{x}", old, "weight"), take(f"to_{x}", old, "bias"))
        for x, old in (("q", "query"), ("k", "key"), ("v", "value"))
    ]
    out["qkv.weight"] = torch.cat([w for w, _ in qkv])[:, :, None, None]
    out["qkv.bias"] = torch.cat([b for _, b in qkv])
    out["proj.weight"] = take("to_out.0", "proj_attn", "weight")[:, :, None, None]
    out["proj.bias"] = take("to_out.0", "proj_attn", "bias")
    return out


def refuse_extra(names: Iterable[str]) -> None:
    """Tensors of the file that the mapping left over: the config does not describe the network they are from."""
    extra = sorted(names)
    if extra:
        raise UserError(f"weights have {extra[0]} (and {len(extra) - 1} more) that their config.json does not describe")


def check_fit(mapped: dict[str, torch.Tensor], net) -> dict[str, torch.Tensor]:
    """`mapped` (under our names) against `net`: a tensor for each of its tensors, of its shape."""
    for name, t in net.state_dict().items():
        if name not in mapped:
            raise UserError(f"weights give nothing for {name}: they do not fit their config.json")
        if mapped[name].shape != t.shape:
            raise UserError(
                f"weights' tensor for {name} has shape {tuple(mapped[name].shape)}, "
                f"the config asks for {tuple(t.shape)}"
            )
    return mapped


def mapped_weights(
    weights_path: Path, model: dict, mapping: Callable, *, where: str, keys: dict
) -> dict[str, torch.Tensor]:
    """The float32 state dict of the network `model` describes from a safetensors file of another layout, by
    mapping(tensors, net) -> our names. The mapping runs first on the file's header against the network built on
    the meta device (shapes, no storage), so that weights that do not fit, or a config describing a network too
    large to build, are refused before a tensor is read or a parameter allocated."""
    mapping(header_tensors(weights_path), nets.meta_network(model, where=where, keys=keys))
    sd = read_tensors(weights_path)
    net = nets.build_network(model, where=where, keys=keys)
    return float32(mapping(sd, net))


def float32(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32).contiguous() for k, v in weights.items()}


def save_converted(out: Path, src: str | Path, model: dict, weights: dict, *, source: dict, **sections) -> Path:
    """The converted network as a diffuse checkpoint at `out`, with `sections` (schedule, objective) beside its
    model config and `source` (the format, what it records) beside the resolved path of `src`. Pretrained weights
    are what sampling uses: there is no separate EMA copy to carry (sampling falls back to them)."""
    config = {
        "model": model,
        **sections,
        "data": {"is_8bit": True, "num_classes": model.get("num_classes")},
        "source": {**source, "path": str(Path(src).expanduser().resolve())},
    }
    return save_checkpoint(out, Checkpoint(config=config, step=0, model=weights))
