"""diffuse train: dataset -> network -> objective(schedule) -> AdamW + EMA -> checkpoints, metrics, sample grids."""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from diffuse import distributed
from diffuse.checkpoint import (
    Checkpoint,
    atomic_write,
    load_checkpoint,
    load_newest_valid,
    numbered_checkpoints,
    numbered_step,
    remove_stale_temps,
    resolve_ckpt_path,
    save_checkpoint,
)
from diffuse.data import build_dataset
from diffuse.diffusion.inpainting import MaskConditioned, mask_context
from diffuse.diffusion.masks import check_mask_kinds, draw_masks
from diffuse.diffusion.objectives import WEIGHTINGS, diffusion_loss
from diffuse.diffusion.prediction import PREDICTIONS, NetworkDenoiser
from diffuse.errors import RunStopped, UserError
from diffuse.fastpath import check_attention, check_compile_mode, compile_network, set_attention, switch
from diffuse.images import grid_upscale, make_grid, save_png, to_uint8
from diffuse.nets import build_network
from diffuse.tasks.common import (
    autocast_dtype,
    build_schedule,
    check_number,
    console,
    err_console,
    pick_device,
    save_resolved_config,
    to_dict,
)
from diffuse.tasks.sample import generate, resolve_steps, sampler_call


def validate_trainer(t: dict) -> None:
    check_number("trainer.steps", t["steps"], minimum=1, integer=True)
    check_number("trainer.batch_size", t["batch_size"], minimum=1, integer=True)
    check_number("trainer.lr", t["lr"], minimum=0, exclusive_min=True)
    check_number("trainer.weight_decay", t["weight_decay"], minimum=0)
    check_number("trainer.warmup", t["warmup"], minimum=0, integer=True)
    check_number("trainer.grad_clip", t["grad_clip"], minimum=0)
    check_number("trainer.ema_decay", t["ema_decay"], minimum=0, maximum=1)
    for key in ("log_every", "ckpt_every"):
        check_number(f"trainer.{key}", t[key], minimum=1, integer=True)
    for key in ("sample_every", "sample_n", "keep"):
        check_number(f"trainer.{key}", t[key], minimum=0, integer=True)
    check_number("trainer.sample_steps", t["sample_steps"], minimum=1, integer=True)
    check_number("trainer.seed", t["seed"], integer=True)
    check_number("trainer.max_nonfinite", t.get("max_nonfinite", 10), minimum=1, integer=True)


def validate_objective(o: dict) -> None:
    if o.get("prediction") not in PREDICTIONS:
        raise UserError(f"objective.prediction={o.get('prediction')!r} is not allowed: choose one of {', '.join(PREDICTIONS)}")
    if o.get("weighting") not in WEIGHTINGS:
        raise UserError(f"objective.weighting={o.get('weighting')!r} is not allowed: choose one of {', '.join(WEIGHTINGS)}")
    check_number("objective.min_snr_gamma", o.get("min_snr_gamma", 5.0), minimum=0, exclusive_min=True)
    check_number("objective.p_uncond", o.get("p_uncond", 0.1), minimum=0, maximum=1)
    if o.get("mask_training", False) not in (True, False):
        raise UserError(f"objective.mask_training={o.get('mask_training')!r} is not allowed: it must be true or false")
    if o.get("mask_training"):
        check_mask_kinds(o.get("mask_kinds"))


def _objective_key(o) -> dict:
    """An objective config as resume compares it: checkpoints from before mask training lack its keys, and
    mask_kinds only matter when mask_training is on."""
    o = dict(o or {})
    if not o.get("mask_training"):
        o["mask_training"] = False
        o.pop("mask_kinds", None)
    return o


def fast_paths(t: dict, device: torch.device) -> dict:
    """The trainer's fast-path switches (see diffuse.fastpath), resolved for `device`."""
    cuda = device.type == "cuda"
    return {
        "channels_last": switch("trainer.channels_last", t.get("channels_last", "auto"), cuda),
        "attention": check_attention("trainer.attention", t.get("attention", "sdpa")),
        "compile": switch("trainer.compile", t.get("compile", "auto"), cuda),
        "compile_mode": check_compile_mode("trainer.compile_mode", t.get("compile_mode", "default")),
        "ema_foreach": switch("trainer.ema_foreach", t.get("ema_foreach", True), True),
        "data_on_device": switch("trainer.data_on_device", t.get("data_on_device", "auto"), cuda),
    }


class Trainer:
    """Holds the state of one training run; every piece of it goes into the checkpoint."""

    def __init__(self, cfg: DictConfig, out: Path):
        self.out = out
        self.tcfg = to_dict(cfg.trainer)
        validate_trainer(self.tcfg)
        self.ocfg = to_dict(cfg.objective)
        validate_objective(self.ocfg)
        self.device = pick_device(self.tcfg.get("device", "auto"))
        self.dist = distributed.setup(self.device.type)
        if self.tcfg["batch_size"] % self.dist.world:
            raise UserError(f"trainer.batch_size={self.tcfg['batch_size']} does not split over {self.dist.world} processes: "
                            "it is the global batch and must be a multiple of the world size")
        self.amp = autocast_dtype(self.tcfg.get("precision", "auto"), self.device)
        self.schedule = build_schedule(cfg.schedule)
        self.sampler_cfg = to_dict(cfg.sampler)
        self.dataset_cfg = to_dict(cfg.dataset)

        model_cfg = to_dict(cfg.model)
        if model_cfg.get("arch") == "oracle":
            raise UserError("model=oracle is the exact mixture denoiser: there is nothing to train (use it with diffuse sample)")
        self.data = build_dataset(cfg.dataset)
        self.model_cfg = {**model_cfg, "resolution": self.data.resolution, "in_channels": self.data.channels}
        # Mask training: the network also reads the masked image (C) and the mask (1); it still predicts C channels.
        self.mask_probs = check_mask_kinds(self.ocfg["mask_kinds"]) if self.ocfg.get("mask_training") else None
        if self.mask_probs is not None:
            self.model_cfg.update(in_channels=2 * self.data.channels + 1, out_channels=self.data.channels)
        k = model_cfg.get("num_classes")
        if k and (not self.data.num_classes or self.data.num_classes > k):
            raise UserError(f"model.num_classes={k} does not fit dataset={self.data.name!r}, which has {self.data.num_classes or 'no'} classes")
        seed = self.tcfg["seed"]
        torch.manual_seed(seed)  # the initial weights follow from the seed alone
        fast = fast_paths(self.tcfg, self.device)
        self.channels_last, self.ema_foreach = fast["channels_last"], fast["ema_foreach"]
        self.net = set_attention(build_network(self.model_cfg), fast["attention"]).to(self.device)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        # The module that runs the forward pass: DDP averages gradients over ranks; the bare net holds the state.
        self.model = self.net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if fast["compile"]:
            self.model = compile_network(self.model, fast["compile_mode"])
        self.data = self.data.to(self.device) if fast["data_on_device"] else self.data
        # Fused on every device: its found_inf input lets a non-finite step be skipped on the device itself.
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=self.tcfg["lr"], weight_decay=self.tcfg["weight_decay"], fused=True,
        )
        # Two streams: the data order, and the diffusion noise (t, eps). Both are saved for exact resume.
        self.data_gen = torch.Generator().manual_seed(seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        torch.manual_seed(seed + 2)  # dropout
        self.step = 0
        # Non-finite steps: [skipped in all, current run in a row, longest run since last read]. Kept on the
        # device and read at log steps, so the guard adds no per-step host sync.
        self.nonfinite = torch.zeros(3, dtype=torch.long, device=self.device)
        self.last_saved: Optional[tuple[Path, int]] = None
        self.config = {
            "model": self.model_cfg,
            "schedule": to_dict(cfg.schedule),
            "objective": self.ocfg,
            "dataset": self.dataset_cfg,
            "trainer": self.tcfg,
            "data": {"is_8bit": self.data.is_8bit, "num_classes": self.data.num_classes},
        }

    # -- checkpoint state ----------------------------------------------------------------------------------
    def state(self) -> Checkpoint:
        rng = {"data": self.data_gen.get_state(), "noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        skipped, run, _ = self.nonfinite.tolist()
        return Checkpoint(
            config=self.config, step=self.step, model=self.net.state_dict(), ema=self.ema.state_dict(),
            optim=self.opt.state_dict(), rng=rng, extra={"skipped": skipped, "nonfinite_run": run},
        )

    def load(self, ckpt: Checkpoint, path: Path) -> None:
        if not ckpt.rng or any(k not in ckpt.rng for k in ("data", "noise", "torch")) or ckpt.optim is None:
            raise UserError(f"cannot resume from {path}: it holds weights only (no optimizer or RNG state, e.g. made by "
                            "diffuse convert), so the run it came from cannot be continued exactly; sample from it instead")
        if ckpt.config.get("model") != self.model_cfg:
            raise UserError(f"cannot resume from {path}: it was trained with model {ckpt.config.get('model')}, this run has {self.model_cfg}")
        if ckpt.config.get("schedule") != self.config["schedule"] or _objective_key(ckpt.config.get("objective")) != _objective_key(self.ocfg):
            raise UserError(f"cannot resume from {path}: its schedule or objective differs from this run's")
        self.net.load_state_dict(ckpt.model)
        self.ema.load_state_dict(ckpt.ema)
        if ckpt.optim is not None:
            self.opt.load_state_dict(ckpt.optim)
        self.data_gen.set_state(ckpt.rng["data"])
        try:
            self.noise_gen.set_state(ckpt.rng["noise"])
        except RuntimeError:  # a CPU generator's state does not fit a CUDA generator: resume on a new stream
            console.print("warning: checkpoint's noise generator is of another device; reseeding it")
            self.noise_gen.manual_seed(self.tcfg["seed"] + 1 + ckpt.step)
        torch.set_rng_state(ckpt.rng["torch"])
        if "cuda" in ckpt.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.rng["cuda"], self.device)
        self.step = ckpt.step
        run = int(ckpt.extra.get("nonfinite_run", 0))
        self.nonfinite = torch.tensor([int(ckpt.extra.get("skipped", 0)), run, run], device=self.device)

    def save(self) -> Optional[Path]:
        """checkpoints/step_NNNNNNN.safetensors (unless keep=0) and last.safetensors, the same state in both;
        then the numbered ones beyond the newest `keep` (the one just written always among them) go."""
        if not self.dist.main:  # only rank 0 writes
            return None
        ckdir = self.out / "checkpoints"
        state = self.state()
        keep = self.tcfg["keep"]
        try:
            path = save_checkpoint(ckdir / f"step_{self.step:07d}.safetensors", state) if keep > 0 else None
            last = save_checkpoint(ckdir / "last.safetensors", state)
        except UserError as e:  # e.g. the disk is full: what was written before stays (the writes are atomic)
            if self.last_saved is None:
                raise
            err = UserError(f"{e}; the last checkpoint written, {self.last_saved[0]} (step {self.last_saved[1]}), is kept")
            err.keep_outputs = True
            raise err from None
        self.last_saved = (last, self.step)
        if keep > 0:
            # Oldest first; files of a step beyond this one are left from a timeline a resume abandoned (a
            # damaged checkpoint passed over) and go before any older valid one.
            others = sorted((p for p in numbered_checkpoints(ckdir) if p != path),
                            key=lambda p: (numbered_step(p) <= self.step, numbered_step(p)))
            for old in others[: max(0, len(others) - (keep - 1))]:
                old.unlink(missing_ok=True)
        return path or last

    def read_nonfinite(self) -> tuple[int, int, int]:
        """(skipped in all, current run in a row, longest run since the last read): one host sync."""
        skipped, run, longest = self.nonfinite.tolist()
        self.nonfinite[2] = run
        return skipped, run, longest

    # -- one optimisation step ----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        warm = self.tcfg["warmup"]
        return self.tcfg["lr"] * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)

    def train_step(self) -> torch.Tensor:
        # Every rank draws the whole global batch's randomness (indices, flips, label drops, t, eps) from the same
        # generators and keeps its own slice: the run is the same whatever the world size, and so is a resume.
        bs = self.tcfg["batch_size"]
        local = bs // self.dist.world
        sl = slice(self.dist.rank * local, (self.dist.rank + 1) * local)
        idx = torch.randint(0, len(self.data), (bs,), generator=self.data_gen)
        x0, y = self.data.batch(idx, generator=self.data_gen)
        x0, y = x0[sl].to(self.device, non_blocking=True), y[sl]
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device) if self.net.num_classes else None
        model = self.model
        if self.mask_probs is not None:  # from the checkpointed data stream, whole global batch, like the flips
            h, w = x0.shape[-2:]
            generate = draw_masks(bs, h, w, self.mask_probs, self.data_gen, device=self.device)[sl]
            model = MaskConditioned(self.model, mask_context(x0, 1 - generate))
        p_uncond = self.ocfg.get("p_uncond", 0.1)
        gdev = self.noise_gen.device
        if y is not None and p_uncond > 0:  # label dropout to the null label: learns eps_null for guidance
            drop = (torch.rand((bs,), generator=self.noise_gen, device=gdev) < p_uncond)[sl].to(y.device)
            y = torch.where(drop, torch.full_like(y, self.net.num_classes), y)
        t = torch.randint(0, self.schedule.T, (bs,), generator=self.noise_gen, device=gdev)[sl].to(self.device)
        noise = torch.randn((bs, *x0.shape[1:]), generator=self.noise_gen, device=gdev, dtype=x0.dtype)[sl].to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.net.train()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            # The loss covers every pixel, known ones included (see README: mask-conditioned training).
            loss = diffusion_loss(
                model, x0, self.schedule, prediction=self.ocfg["prediction"], weighting=self.ocfg["weighting"],
                min_snr_gamma=self.ocfg.get("min_snr_gamma", 5.0), y=y, t=t, noise=noise,
            ).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        finite = self.finite_step(loss)
        # A non-finite loss or gradient skips the update on the device (as under a GradScaler): the fused
        # optimizer leaves weights and moments alone when found_inf is 1, and the EMA moves by 0. The batch and
        # noise were drawn all the same, so the random streams (and a resume) stay where they would be.
        self.opt.found_inf = (~finite).float()
        self.opt.step()
        self.update_ema(finite)
        self.step += 1
        return loss.detach()

    def finite_step(self, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device: are the loss and the gradients finite? Clips the gradients when grad_clip
        is set (the clip's total norm is the check). Counts the non-finite steps."""
        params = [p for p in self.net.parameters() if p.grad is not None]
        clip = self.tcfg["grad_clip"]
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = torch.isfinite(norm)
        if not self.dist.enabled:
            # Under DDP the all-reduced gradients alone decide, so that every rank skips the same steps.
            finite = finite & torch.isfinite(loss.detach())
        bad = (~finite).long()
        run = (self.nonfinite[1] + 1) * bad
        self.nonfinite = torch.stack([self.nonfinite[0] + bad, run, torch.maximum(self.nonfinite[2], run)])
        return finite

    @torch.no_grad()
    def update_ema(self, finite: Optional[torch.Tensor] = None) -> None:
        decay = self.tcfg["ema_decay"]
        if self.tcfg.get("ema_warmup", True):
            decay = min(decay, (1 + self.step) / (10 + self.step))
        ema_p = list(self.ema.parameters())
        weight = 1.0 - decay
        if finite is None and not self.ema_foreach:
            for e, p in zip(ema_p, self.net.parameters()):
                e.lerp_(p.detach(), weight)
        elif finite is None:  # one multi-tensor kernel instead of one launch per parameter
            torch._foreach_lerp_(ema_p, [p.detach() for p in self.net.parameters()], weight)
        else:  # weight 0 on a skipped step, decided on the device
            w = finite.to(ema_p[0].dtype) * weight
            torch._foreach_lerp_(ema_p, [p.detach() for p in self.net.parameters()], [w] * len(ema_p))
        for b_ema, b in zip(self.ema.buffers(), self.net.buffers()):
            b_ema.copy_(b)

    # -- periodic outputs ---------------------------------------------------------------------------------
    def sample_grid(self) -> Optional[Path]:
        n = self.tcfg["sample_n"]
        if n == 0 or not self.dist.main:
            return None
        net = MaskConditioned(self.ema) if self.mask_probs is not None else self.ema  # nothing known: plain sampling
        den = NetworkDenoiser(net, self.ocfg["prediction"], self.schedule, autocast_dtype=self.amp)
        shape = (self.data.channels, self.data.resolution, self.data.resolution)
        labels = (torch.arange(n) % self.data.num_classes) if self.net.num_classes else None
        x = generate(
            den, n=n, shape=shape, schedule=self.schedule, sampler_cfg=self.sampler_cfg, steps=self.tcfg["sample_steps"],
            seed=self.tcfg["seed"], device=self.device, batch_size=min(n, 256), clip_default=self.data.is_8bit,
            labels=labels, progress=False,
        )
        grid = make_grid(to_uint8(x))
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        save_png(grid, path, upscale=grid_upscale(self.data.resolution))
        save_png(grid, self.out / "grid.png", upscale=grid_upscale(self.data.resolution))
        return path


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


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    trainer = Trainer(cfg, out)
    try:
        return _train(trainer, cfg, out)
    finally:
        distributed.teardown(trainer.dist)


def _train(trainer: Trainer, cfg: DictConfig, out: Path) -> dict[str, Any]:
    main = trainer.dist.main
    if not main:
        console.quiet = True  # one voice: rank 0 prints, logs and writes
    steps_total = trainer.tcfg["steps"]
    sampler_call(trainer.sampler_cfg, resolve_steps(trainer.sampler_cfg, trainer.tcfg["sample_steps"], trainer.schedule.T), trainer.schedule, True)

    resume = cfg.get("resume", False)
    if resume not in (False, None, "", "false"):
        if resume in (True, "true") or Path(str(resume)).is_dir():
            # A run dir: the newest checkpoint that verifies, passing over a damaged last.safetensors.
            root = out if resume in (True, "true") else Path(str(resume))
            ckdir = root / "checkpoints" if (root / "checkpoints").is_dir() or resume in (True, "true") else root
            ckpt, src = load_newest_valid(ckdir, report=lambda line: err_console.print(line, markup=False))
        else:
            src = resolve_ckpt_path(resume)
            ckpt = load_checkpoint(src)
        trainer.load(ckpt, src)
        if main and resume in (True, "true"):
            for d in (out / "checkpoints", out / "samples", out):
                if d.is_dir():
                    remove_stale_temps(d)  # writes a kill interrupted before their rename
            trim_metrics(out / "metrics.jsonl", trainer.step)
        console.print(f"resumed from {src} at step {trainer.step}")

    if main:
        save_resolved_config(cfg, out)
    n_params = sum(p.numel() for p in trainer.net.parameters())
    console.print(
        f"training {trainer.model_cfg['arch']} ({n_params / 1e6:.2f}M parameters) on {trainer.data.name} "
        f"({len(trainer.data)} images, {trainer.data.resolution}x{trainer.data.resolution}) on {trainer.device}"
        + (f" x {trainer.dist.world} processes" if trainer.dist.enabled else "")
    )
    metrics_path = out / "metrics.jsonl"
    log_every, ckpt_every, sample_every = trainer.tcfg["log_every"], trainer.tcfg["ckpt_every"], trainer.tcfg["sample_every"]
    bs = trainer.tcfg["batch_size"]
    last_loss = float("nan")
    stopped = False
    max_nonfinite = trainer.tcfg.get("max_nonfinite", 10)
    skipped_logged = trainer.read_nonfinite()[0]
    progress = Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[ips]:.0f} img/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console,
    )
    with StopRequest() as stop, progress, open(metrics_path if main else os.devnull, "a") as metrics:
        task = progress.add_task("train", total=steps_total, completed=trainer.step, loss=float("nan"), ips=0.0)
        losses: list[torch.Tensor] = []
        t_last, step_last = time.perf_counter(), trainer.step
        while trainer.step < steps_total:
            losses.append(trainer.train_step())
            step = trainer.step
            if step % log_every == 0 or step == steps_total:
                # One host sync per log interval, not per step.
                # The mean over the steps that were not skipped (NaN if all were).
                stacked = torch.stack(losses)
                finite_mean = torch.where(torch.isfinite(stacked), stacked, float("nan")).nanmean()
                last_loss = float(distributed.mean(finite_mean, trainer.dist))
                losses.clear()
                skipped, _, longest = trainer.read_nonfinite()
                now = time.perf_counter()
                ips = (step - step_last) * bs / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                rec = {"step": step, "loss": last_loss, "lr": trainer.lr_at(step - 1), "images_per_s": ips,
                       "skipped": skipped - skipped_logged}
                skipped_logged = skipped
                try:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                except OSError as e:
                    raise storage_stopped(e, metrics_path, trainer) from None
                if longest >= max_nonfinite:
                    raise RunStopped(nonfinite_message(trainer, step, longest, max_nonfinite))
                progress.update(task, completed=step, loss=last_loss, ips=ips)
                if not console.is_terminal:  # logs (CI, clusters) get a plain line instead of a redrawn bar
                    console.print(f"step {step}/{steps_total} loss {last_loss:.4f} lr {rec['lr']:.3g} {ips:.0f} img/s")
            if step % ckpt_every == 0 and step != steps_total:
                trainer.save()
            if sample_every and step % sample_every == 0 and step != steps_total:
                trainer.sample_grid()
            # Ranks must stop at the same step: with several, they agree on it at each log step.
            if trainer.dist.enabled:
                if step % log_every == 0 and distributed.any_rank(stop.requested, trainer.dist, trainer.device):
                    stopped = True
                    break
            elif stop.requested:
                stopped = True
                break
        progress.update(task, completed=trainer.step)
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


def storage_stopped(e: OSError, path: Path, trainer: Trainer) -> Exception:
    """A full disk (or a storage error like it) while logging: one line, and the run's checkpoints are kept."""
    from diffuse.checkpoint import _ENVIRONMENT_ERRNOS

    if e.errno not in _ENVIRONMENT_ERRNOS:
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
            f"or precision=fp32 may help")


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
