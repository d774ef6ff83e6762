"""The training loop, in named phases: resume, then step after step with log, checkpoint, sample and stop, then
the final checkpoint and grid. One host sync per log interval, none per step."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.progress import TextColumn

from diffuse import distributed
from diffuse.checkpoint import check_verify, load_checkpoint, load_newest_valid, resolve_ckpt_path
from diffuse.console import console, err_console, progress_bar
from diffuse.errors import RunStopped, UserError
from diffuse.io import ENVIRONMENT_ERRNOS, atomic_write, remove_stale_temps
from diffuse.signals import StopRequest
from diffuse.training.curves import complete_lines, read_records, write_curves
from diffuse.training.evaluation import build_eval
from diffuse.training.tracking import build_tracker
from diffuse.training.trainer import Trainer


def resume(trainer: Trainer, value: Any, verify: Any = True) -> None:
    """Phase 1. resume=true continues this run dir from its newest checkpoint that verifies (passing over a damaged
    last.safetensors); resume=auto does when there is one, and starts afresh when not; resume=PATH starts this run
    from another run's checkpoint (a file or a run dir).
    verify=false lets a checkpoint without a hash load (said in one line); a damaged one never does."""
    verify = check_verify(verify)
    out = trainer.out
    if (
        value == "auto"
    ):  # a job that may be a restart (torchrun --max-restarts, a requeued cluster job): go on if it can
        value = any((out / "checkpoints").glob("*.safetensors")) if (out / "checkpoints").is_dir() else False
    if value in (False, None, "", "false"):
        return
    in_place = value in (True, "true")
    if in_place or Path(str(value)).is_dir():
        root = out if in_place else Path(str(value))
        ckdir = root / "checkpoints" if (root / "checkpoints").is_dir() or in_place else root
        ckpt, src = load_newest_valid(
            ckdir,
            report=lambda line: err_console.print(line, markup=False),
            verify=verify,
            asked="resume=true" if in_place else f"resume={value}",
        )
    else:
        if not Path(str(value)).expanduser().exists():  # a typo of a mode reads as a path: name the modes too
            raise UserError(
                f"resume={str(value)!r} does not exist: give true, false, auto, or a checkpoint file or run dir"
            )
        src = resolve_ckpt_path(value, key="resume")
        ckpt = load_checkpoint(src, verify=verify)
    trainer.load(ckpt, src)
    if trainer.dist.main and in_place:
        for d in (out / "checkpoints", out / "samples", out):
            if d.is_dir():
                remove_stale_temps(d)  # writes a kill interrupted before their rename
        trim_metrics(out / "metrics.jsonl", trainer.step)
    console.print(f"resumed from {src} at step {trainer.step}")


def fit(trainer: Trainer, stop: StopRequest | None = None, command: str = "train") -> dict[str, Any]:
    """Phases 2 and 3: train to trainer.steps (or a stop signal), then save and draw the final grid. `stop`: the
    request the task installed as it started (a signal while the network was built stops here, at the resumed
    step, with a checkpoint); None installs one now. `command`: the one a stopped run's line says to resume with."""
    t = trainer.tcfg
    if not trainer.dist.main:
        console.quiet = True  # one voice: rank 0 prints, logs and writes
    console.print(trainer.describe())
    evaluate = build_eval(trainer, trainer.metrics_cfg)  # before the first step: a refusal costs no training
    fields = (TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"))
    with (
        nullcontext(stop) if stop is not None else StopRequest() as stop,
        progress_bar(True, *fields) as bar,
        MetricsLog(trainer) as log,
    ):
        task = bar.add_task("train", total=t["steps"], completed=trainer.step, loss=float("nan"), ips=0.0)
        stopped = distributed.any_rank(stop.requested, trainer.dist, trainer.device)
        while not stopped and trainer.step < t["steps"]:
            log.add(trainer.train_step())
            step = trainer.step
            if step % t["log_every"] == 0 or step == t["steps"]:
                rec, stage = log.write(step)  # the interval's status: a second read would find it spent
                bar.update(
                    task,
                    completed=step,
                    loss=rec["loss"],
                    ips=rec["images_per_s"],
                    description=f"train ({stage})" if stage else "train",
                )
            # Before the checkpoint of the same step: a run resumed from it has its evaluation logged already.
            if evaluate is not None and step % t["eval_every"] == 0:
                log.write_eval(step, evaluate())
            if step % t["ckpt_every"] == 0 and step != t["steps"]:
                save(trainer, log)
            if t["sample_every"] and step % t["sample_every"] == 0 and step != t["steps"]:
                if trainer.sample_grid() is not None:
                    log.image(step)
            stopped = stop_agreed(trainer, stop, step)
        bar.update(task, completed=trainer.step)
        # The final checkpoint and grid stay inside the stop handling: a signal there is a request like any other.
        return finish(trainer, log, stop, stopped, command)


def stop_agreed(trainer: Trainer, stop: StopRequest, step: int) -> bool:
    """Ranks must stop at the same step: with several, they agree on it at each log step."""
    if not trainer.dist.enabled:
        return stop.requested
    return step % trainer.tcfg["log_every"] == 0 and distributed.any_rank(stop.requested, trainer.dist, trainer.device)


def save(trainer: Trainer, log: MetricsLog) -> Path | None:
    """A checkpoint that also carries the open metrics interval: a run resumed from it logs the records a run
    never stopped logs (every rank calls this at the same step)."""
    trainer.interval = log.pending()
    return trainer.save()


def finish(
    trainer: Trainer, log: MetricsLog, stop: StopRequest, stopped: bool, command: str = "train"
) -> dict[str, Any]:
    t = trainer.tcfg
    if not stopped and trainer.step == t["steps"] and log.losses:
        log.write(trainer.step)  # resumed at the last step from a checkpoint whose interval was still open
    log.draw_curves()  # a record a redraw passed over (a stopped run's last) is drawn now
    ckpt = save(trainer, log)
    skipped = trainer.read_nonfinite()[0]
    if skipped:
        console.print(f"{skipped} step(s) skipped for a non-finite loss or gradient")
    if stopped or stop.requested:
        # A request during the final checkpoint leaves the grid undrawn: a resume of the finished run draws it.
        what = f"step {trainer.step} of {t['steps']}, checkpoint {ckpt}"
        if trainer.step == t["steps"]:
            what += " (training is complete; the final grid was not drawn)"
        console.print(stop.line(what, command, trainer.out.resolve()), markup=False)
        return {"step": trainer.step, "loss": log.last_loss, "stopped": True}
    grid = trainer.sample_grid()  # one request during it: the grid is finished, and so is the run
    if grid is not None:
        log.image(trainer.step)
    loss = f": loss {log.last_loss:.4f}" if math.isfinite(log.last_loss) else ""  # nan: no step was left to take
    console.print(f"step {trainer.step}{loss}; checkpoint {ckpt}" + (f"; samples {grid}" if grid else ""))
    return {"step": trainer.step, "loss": log.last_loss, "checkpoint": str(ckpt)}


class MetricsLog:
    """metrics.jsonl (rank 0): per log interval the mean loss of the steps not skipped, lr, images/s, and how many
    steps were skipped for a non-finite loss; stops the run (RunStopped) after trainer.max_nonfinite in a row.
    Each record also goes to curves.png (redrawn from all of them) and to the logger (logger=...)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.path = trainer.out / "metrics.jsonl"
        self.losses: list[torch.Tensor] = []
        self.last_loss = float("nan")
        self.skipped_logged = trainer.read_nonfinite()[0]
        self.t_last, self.step_last = time.perf_counter(), trainer.step
        opened = _checked_interval(trainer.interval.get("interval"))
        if opened:  # resumed inside a log interval: its first steps were taken before the checkpoint
            # Losses are float32 (diffusion_loss's dtype) and JSON keeps a float32 value exactly.
            self.losses = [
                torch.tensor(float("nan") if v is None else v, dtype=torch.float32, device=trainer.device)
                for v in opened["losses"]
            ]
            self.skipped_logged = int(opened["skipped"])
            trainer.nonfinite[2] = max(int(trainer.nonfinite[2]), int(opened["longest"]))

    def pending(self) -> dict:
        """The interval opened since the last record, for a checkpoint: each step's loss (averaged over ranks:
        after a resume every rank holds the same values, whatever the world size), the skipped count at the
        last record and the longest non-finite run since it. Empty at a log step."""
        if not self.losses:
            return {}
        tr = self.trainer
        per_step = distributed.mean(torch.stack(self.losses).float(), tr.dist).tolist()
        return {
            "interval": {
                "losses": [v if math.isfinite(v) else None for v in per_step],
                "skipped": self.skipped_logged,
                "longest": int(tr.nonfinite[2]),
            }
        }

    def __enter__(self) -> MetricsLog:
        tr = self.trainer
        self.file = open(self.path if tr.dist.main else os.devnull, "a")
        # A resumed run's curves go on from its earlier records (resume has cut them at its step).
        self.records = read_records(self.path) if tr.dist.main else []
        self.curves_failed, self.curves_at, self.curves_cost, self.curves_pending = False, -math.inf, 0.0, False
        try:
            self.tracker = build_tracker(tr.logger_cfg, tr.out, tr.config, tr.dist.main, start=tr.step)
        except BaseException:
            self.file.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        self.tracker.close()

    def _append(self, rec: dict, force: bool = False) -> None:
        try:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        except OSError as e:
            raise storage_stopped(e, self.path, self.trainer) from None
        if not self.trainer.dist.main:
            return
        self.records.append(rec)
        self.curves_pending = True
        # Redrawn at each record, except when the last redraw was less than 20 of its own durations ago: a long,
        # fast run (thousands of records, a log step every second or two) spends at most ~5% of its time drawing.
        if force or time.perf_counter() - self.curves_at >= 20 * self.curves_cost:
            self.draw_curves()

    def draw_curves(self) -> None:
        if not (self.trainer.dist.main and self.curves_pending):
            return
        start = time.perf_counter()
        try:
            write_curves(self.records, self.trainer.out / "curves.png")
        except (
            OSError,
            UserError,
        ) as e:  # a picture is not worth stopping a run for: said once, then drawn when it can be
            if not self.curves_failed:
                err_console.print(f"warning: curves.png not written: {e}", markup=False)
            self.curves_failed = True
        self.curves_at = time.perf_counter()
        self.curves_cost, self.curves_pending = self.curves_at - start, False

    def write_eval(self, step: int, result: dict) -> None:
        """One {"step", "eval": {...}} record of the in-training evaluation; its time is not the interval's."""
        self.t_last += result.get("seconds", 0.0)
        self._append({"step": step, "eval": result}, force=True)
        self.tracker.scalars(step, {f"eval/{k}": v for k, v in result.items() if k in ("fid", "nfe", "seconds")})
        console.print(
            f"step {step}: FID {result['fid']:.4g} ({result['n']} EMA samples, {result['features']} features, "
            f"{result['seconds']:.1f} s)",
            markup=False,
        )

    def image(self, step: int) -> None:
        grid = getattr(self.trainer, "last_grid", None)
        if grid is not None:
            self.tracker.image(step, "samples", grid)

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def write(self, step: int) -> tuple[dict, str]:
        """The record of the interval that ends at `step`, and the objective's status text."""
        tr = self.trainer
        stacked = torch.stack(self.losses)  # the one host sync of the interval is the read below
        finite_mean = torch.where(torch.isfinite(stacked), stacked, float("nan")).nanmean()
        self.last_loss = float(distributed.mean(finite_mean, tr.dist))
        self.losses.clear()
        skipped, _, longest = tr.read_nonfinite()
        now = time.perf_counter()
        ips = (step - self.step_last) * tr.tcfg["batch_size"] / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        status = tr.objective.status(step)
        rec = {
            "step": step,
            "loss": self.last_loss,
            "lr": tr.lr_at(step - 1),
            "images_per_s": ips,
            "skipped": skipped - self.skipped_logged,
            **status.fields,
        }
        self.skipped_logged = skipped
        self._append(rec, force=step == tr.tcfg["steps"])
        self.tracker.scalars(
            step, {f"train/{k}": v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}
        )
        limit = tr.tcfg["max_nonfinite"]
        if longest >= limit:
            raise RunStopped(nonfinite_message(tr, step, longest, limit))
        if not console.is_terminal:  # logs (CI, clusters) get a plain line instead of a redrawn bar
            console.print(
                f"step {step}/{tr.tcfg['steps']} loss {self.last_loss:.4f} lr {rec['lr']:.3g} {ips:.0f} img/s"
                + (f" {status.text}" if status.text else "")
            )
        return rec, status.text


def _checked_interval(value: Any) -> dict | None:
    """A checkpoint's open interval as MetricsLog reads it; a checkpoint is user input, so its shape is checked."""
    if value is None:
        return None
    losses = value.get("losses") if isinstance(value, dict) else None
    ints = isinstance(value, dict) and all(
        isinstance(value.get(k), int) and value[k] >= 0 for k in ("skipped", "longest")
    )
    if not (isinstance(losses, list) and ints and all(v is None or isinstance(v, (int, float)) for v in losses)):
        raise UserError("cannot resume: the checkpoint's metrics interval (diffuse.extra 'interval') is malformed")
    return value


def storage_stopped(e: OSError, path: Path, trainer: Trainer) -> Exception:
    """A full disk (or a storage error like it) while logging: one line, and the run's checkpoints are kept."""
    if e.errno not in ENVIRONMENT_ERRNOS:
        return e
    where = f"resume from {trainer.last_saved[0]}" if trainer.last_saved else "no checkpoint was written in this run"
    err = UserError(
        f"cannot write {path}: {e.strerror or os.strerror(e.errno)}; training stopped at step {trainer.step} ({where})"
    )
    err.keep_outputs = True
    return err


def nonfinite_message(trainer: Trainer, step: int, longest: int, limit: int) -> str:
    where = (
        f"the last checkpoint, {trainer.last_saved[0]} (step {trainer.last_saved[1]}), holds weights from before them"
        if trainer.last_saved
        else "no checkpoint was written in this run"
    )
    return (
        f"training stopped at step {step}: {longest} steps in a row had a non-finite loss or gradient "
        f"(trainer.max_nonfinite={limit}); they were skipped, {where}. A lower trainer.lr, trainer.grad_clip "
        f"or runtime.precision=fp32 may help"
    )


def trim_metrics(path: Path, step: int) -> None:
    """After a resume at `step`, keep only the complete metrics lines up to it: a kill can leave a half-written
    last line, and the steps after the checkpoint are about to be run (and logged) again."""
    if not path.is_file():
        return
    kept = [line for line, rec in complete_lines(path) if rec.get("step", step + 1) <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))
