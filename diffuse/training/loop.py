"""The training loop, in named phases: resume, then step after step with log, checkpoint, sample and stop, then
the final checkpoint and grid. One host sync per log interval, none per step."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import TextColumn

from diffuse import distributed
from diffuse.checkpoint import ENVIRONMENT_ERRNOS, atomic_write, load_checkpoint, load_newest_valid, remove_stale_temps, resolve_ckpt_path
from diffuse.console import console, err_console, progress_bar
from diffuse.errors import RunStopped, UserError
from diffuse.training.trainer import Trainer


def resume(trainer: Trainer, value: Any) -> None:
    """Phase 1. resume=true continues this run dir from its newest checkpoint that verifies (passing over a damaged
    last.safetensors); resume=PATH starts this run from another run's checkpoint (a file or a run dir)."""
    if value in (False, None, "", "false"):
        return
    out = trainer.out
    in_place = value in (True, "true")
    if in_place or Path(str(value)).is_dir():
        root = out if in_place else Path(str(value))
        ckdir = root / "checkpoints" if (root / "checkpoints").is_dir() or in_place else root
        ckpt, src = load_newest_valid(ckdir, report=lambda line: err_console.print(line, markup=False))
    else:
        src = resolve_ckpt_path(value)
        ckpt = load_checkpoint(src)
    trainer.load(ckpt, src)
    if trainer.dist.main and in_place:
        for d in (out / "checkpoints", out / "samples", out):
            if d.is_dir():
                remove_stale_temps(d)  # writes a kill interrupted before their rename
        trim_metrics(out / "metrics.jsonl", trainer.step)
    console.print(f"resumed from {src} at step {trainer.step}")


def fit(trainer: Trainer) -> dict[str, Any]:
    """Phases 2 and 3: train to trainer.steps (or a stop signal), then save and draw the final grid."""
    t = trainer.tcfg
    if not trainer.dist.main:
        console.quiet = True  # one voice: rank 0 prints, logs and writes
    console.print(trainer.describe())
    stopped = False
    fields = (TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"))
    with StopRequest() as stop, progress_bar(True, *fields) as bar, MetricsLog(trainer) as log:
        task = bar.add_task("train", total=t["steps"], completed=trainer.step, loss=float("nan"), ips=0.0)
        while trainer.step < t["steps"]:
            log.add(trainer.train_step())
            step = trainer.step
            if step % t["log_every"] == 0 or step == t["steps"]:
                rec = log.write(step)
                bar.update(task, completed=step, loss=rec["loss"], ips=rec["images_per_s"])
            if step % t["ckpt_every"] == 0 and step != t["steps"]:
                trainer.save()
            if t["sample_every"] and step % t["sample_every"] == 0 and step != t["steps"]:
                trainer.sample_grid()
            if stop_agreed(trainer, stop, step):
                stopped = True
                break
        bar.update(task, completed=trainer.step)
    return finish(trainer, log.last_loss, stopped)


def stop_agreed(trainer: Trainer, stop: "StopRequest", step: int) -> bool:
    """Ranks must stop at the same step: with several, they agree on it at each log step."""
    if not trainer.dist.enabled:
        return stop.requested
    return step % trainer.tcfg["log_every"] == 0 and distributed.any_rank(stop.requested, trainer.dist, trainer.device)


def finish(trainer: Trainer, last_loss: float, stopped: bool) -> dict[str, Any]:
    ckpt = trainer.save()
    skipped = trainer.read_nonfinite()[0]
    if skipped:
        console.print(f"{skipped} step(s) skipped for a non-finite loss or gradient")
    if stopped:
        console.print(f"stopped by signal at step {trainer.step}; checkpoint {ckpt}")
        return {"step": trainer.step, "loss": last_loss, "stopped": True}
    grid = trainer.sample_grid()
    console.print(f"step {trainer.step}: loss {last_loss:.4f}; checkpoint {ckpt}" + (f"; samples {grid}" if grid else ""))
    return {"step": trainer.step, "loss": last_loss, "checkpoint": str(ckpt)}


class MetricsLog:
    """metrics.jsonl (rank 0): per log interval the mean loss of the steps not skipped, lr, images/s, and how many
    steps were skipped for a non-finite loss; stops the run (RunStopped) after trainer.max_nonfinite in a row."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.path = trainer.out / "metrics.jsonl"
        self.losses: list[torch.Tensor] = []
        self.last_loss = float("nan")
        self.skipped_logged = trainer.read_nonfinite()[0]
        self.t_last, self.step_last = time.perf_counter(), trainer.step

    def __enter__(self) -> "MetricsLog":
        self.file = open(self.path if self.trainer.dist.main else os.devnull, "a")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def write(self, step: int) -> dict:
        tr = self.trainer
        stacked = torch.stack(self.losses)  # the one host sync of the interval is the read below
        finite_mean = torch.where(torch.isfinite(stacked), stacked, float("nan")).nanmean()
        self.last_loss = float(distributed.mean(finite_mean, tr.dist))
        self.losses.clear()
        skipped, _, longest = tr.read_nonfinite()
        now = time.perf_counter()
        ips = (step - self.step_last) * tr.tcfg["batch_size"] / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        rec = {"step": step, "loss": self.last_loss, "lr": tr.lr_at(step - 1), "images_per_s": ips,
               "skipped": skipped - self.skipped_logged}
        self.skipped_logged = skipped
        try:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        except OSError as e:
            raise storage_stopped(e, self.path, tr) from None
        limit = tr.tcfg["max_nonfinite"]
        if longest >= limit:
            raise RunStopped(nonfinite_message(tr, step, longest, limit))
        if not console.is_terminal:  # logs (CI, clusters) get a plain line instead of a redrawn bar
            console.print(f"step {step}/{tr.tcfg['steps']} loss {self.last_loss:.4f} lr {rec['lr']:.3g} {ips:.0f} img/s")
        return rec


class StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the next step; a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def storage_stopped(e: OSError, path: Path, trainer: Trainer) -> Exception:
    """A full disk (or a storage error like it) while logging: one line, and the run's checkpoints are kept."""
    if e.errno not in ENVIRONMENT_ERRNOS:
        return e
    where = f"resume from {trainer.last_saved[0]}" if trainer.last_saved else "no checkpoint was written in this run"
    err = UserError(f"cannot write {path}: {e.strerror or os.strerror(e.errno)}; training stopped at step {trainer.step} ({where})")
    err.keep_outputs = True
    return err


def nonfinite_message(trainer: Trainer, step: int, longest: int, limit: int) -> str:
    where = (f"the last checkpoint, {trainer.last_saved[0]} (step {trainer.last_saved[1]}), holds weights from before them"
             if trainer.last_saved else "no checkpoint was written in this run")
    return (f"training stopped at step {step}: {longest} steps in a row had a non-finite loss or gradient "
            f"(trainer.max_nonfinite={limit}); they were skipped, {where}. A lower trainer.lr, trainer.grad_clip "
            f"or runtime.precision=fp32 may help")


def trim_metrics(path: Path, step: int) -> None:
    """After a resume at `step`, keep only the complete metrics lines up to it: a kill can leave a half-written
    last line, and the steps after the checkpoint are about to be run (and logged) again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and isinstance(rec, dict) and rec.get("step", step + 1) <= step:
            kept.append(line)
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))
