"""A command's job run in the Hydra run dir it owns: the dir locked, the outputs checked, Hydra's record written;
a refused command (UserError) leaves the dir as it found it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffuse.console import console
from diffuse.errors import UserError
from diffuse.io import atomic_write
from diffuse.rundir import lock
from diffuse.rundir.outputs import RECORD, RECORD_DIR, check_outputs, who


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def guarded(task: ModuleType, cfg: DictConfig) -> Any:
    """Run `task.run(cfg, out)` in its Hydra run dir, which it owns while the job runs (rundir.lock: a second
    process on the same dir is refused with one line and writes nothing). Before the job, the files it will write
    are checked (a directory where a file goes is one line, not an error after the work) and Hydra's record is
    written to .hydra/. A UserError leaves the run dir as it was (unless it asks to keep its outputs): no new
    file, and the record and config.yaml of an earlier run restored; one line, its exit code (2). Anything else
    is an internal error and keeps its traceback."""
    from hydra.core.hydra_config import HydraConfig

    out = run_dir()
    command = HydraConfig.get().job.config_name
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 writes, locks and cleans up
    try:
        held = lock.own(out, who(command))
    except UserError as e:
        lock.exit_with(e)  # the dir is another process's: nothing here is touched
    before = _listing(out)
    # The dir is this run's own if it held nothing but our lock (Hydra makes it just before the job).
    fresh = before <= {out, out / lock.LOCK_NAME}
    kept = _snapshot(out) if main else {}
    try:
        check_outputs(command, task, cfg, out)
        if main:
            write_record(cfg, out)
        result = task.run(cfg, out)
    except UserError as e:
        if main and not e.keep_outputs:
            _remove_new(out, before)
            _restore(kept)
        held.release()
        if main and fresh and not e.keep_outputs:
            _remove_fresh_dir(out)  # after the lock is gone: the dir is empty only then
        lock.exit_with(e)
    finally:
        held.release()
    if main:
        console.print(f"run dir: {out.resolve()}", markup=False, soft_wrap=True)
    return result


# Hydra's record of a run (its config, its own config, the overrides) is written here rather than by Hydra
# (conf/hydra/default.yaml: output_subdir null) so that it is written only by the process that owns the run dir,
# and restored when the command is refused.
def write_record(cfg: DictConfig, out: Path) -> None:
    """.hydra/{config,hydra,overrides}.yaml, as Hydra writes them: the job's config and Hydra's, unresolved."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.instance().cfg
    texts = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
    }
    for name, text in texts.items():
        atomic_write(out / RECORD_DIR / name, lambda tmp, text=text: tmp.write_text(text))


def _snapshot(out: Path) -> dict[Path, bytes]:
    """The bytes of what a refused command must give back: the record and the resolved config of an earlier run."""
    kept = {}
    for p in [out / RECORD_DIR / name for name in RECORD] + [out / "config.yaml"]:
        if p.is_file() and not p.is_symlink():
            kept[p] = p.read_bytes()
    return kept


def _restore(kept: dict[Path, bytes]) -> None:
    for p, data in kept.items():
        if not p.is_file() or p.read_bytes() != data:
            atomic_write(p, lambda tmp, data=data: tmp.write_bytes(data))


def _listing(root: Path) -> set[Path]:
    if not root.exists():
        return set()
    return {p for p in root.rglob("*")} | {root}


def _remove_new(root: Path, before: set[Path]) -> None:
    """Delete what this job (and Hydra, for it) created; leave anything that was there before."""
    if not root.exists():
        return
    for p in sorted(_listing(root) - before, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _remove_fresh_dir(root: Path) -> None:
    """Remove the run dir this refused run made, and the parents Hydra made for it under ./outputs
    (outputs/sample/...) if now empty; a directory the user named (hydra.run.dir=...) is never climbed out of."""
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
