"""What the commands' jobs share: the run dir guard, the saved config, and the composed config turned into the
pipeline's arguments (runtime, model, sampling job)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffuse.console import console, err_console
from diffuse.errors import UserError, check_number
from diffuse.pipeline.job import SamplingJob, prepare_sampling
from diffuse.pipeline.model import Model, load_model
from diffuse.pipeline.runtime import Runtime, resolve_runtime


def to_dict(cfg: Any) -> Any:
    """A config node as plain Python (dicts, lists, values), resolved; plain values pass through."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def runtime_of(cfg: DictConfig, images: Optional[int] = None) -> Runtime:
    """The command's runtime group resolved (`images`: how many a sampling command draws, for compile=auto)."""
    return resolve_runtime(to_dict(cfg.runtime), images=images)


def model_of(cfg: DictConfig, runtime: Runtime) -> Model:
    """ckpt= or model=oracle (with its dataset and schedule) as a Model."""
    return load_model(ckpt=cfg.ckpt, model=to_dict(cfg.model), dataset=to_dict(cfg.dataset), schedule=to_dict(cfg.schedule),
                      use_ema=cfg.use_ema, runtime=runtime)


def sampling_job_of(cfg: DictConfig, model: Model, n: int) -> SamplingJob:
    """The sampler, guidance and labels of a sampling command (sample, eval), checked."""
    seed = check_number("seed", cfg.seed, integer=True)
    return prepare_sampling(model, sampler=to_dict(cfg.sampler), steps=cfg.steps, guidance=to_dict(cfg.guidance),
                            label=cfg.label, labels=to_dict(cfg.labels), n=n, seed=seed)


def dataset_config(name: str) -> dict:
    """The composed config of dataset=NAME (its defaults list applied), as training would build it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a command: compose with its search path
        return to_dict(compose(config_name="train", overrides=[f"dataset={name}"]).dataset)
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return to_dict(compose(config_name="train", overrides=[f"dataset={name}"]).dataset)


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


def write_json(path: Path, obj: Any) -> None:
    from diffuse.checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + os.linesep))
