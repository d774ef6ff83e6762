"""The state of one training run (network, EMA, optimizer, random streams, counters) and its optimisation step.
Every piece of it goes into the checkpoint, so that a resumed run is the run it continues, bit for bit."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import distributed
from diffuse.checkpoint import Checkpoint, numbered_checkpoints, numbered_step, save_checkpoint
from diffuse.console import console
from diffuse.data import build_dataset
from diffuse.diffusion.inpainting import MaskConditioned, mask_context
from diffuse.diffusion.masks import check_mask_kinds, draw_masks
from diffuse.errors import UserError
from diffuse.fastpath import compile_network, set_attention
from diffuse.images import grid_upscale, make_grid, save_png, to_uint8
from diffuse.nets import build_network
from diffuse.pipeline.sampling import generate, plan_sampler
from diffuse.training.config import (
    check_classes,
    check_config,
    check_resumable,
    learning_rate,
    network_config,
    superres_of,
)
from diffuse.training.objectives import Batch


class Trainer:
    """One training run, built from the composed train config (model, dataset, schedule, objective, trainer,
    sampler, runtime)."""

    def __init__(self, cfg: dict | DictConfig, out: Path, make_objective=None, init_weights: dict | None = None):
        """make_objective(trainer) -> the objective (default: by objective.kind, diffusion or consistency training);
        init_weights: the network's starting weights (a distillation student starts as its teacher)."""
        cfg = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
        self.out = out
        self.tcfg, self.ocfg = cfg["trainer"], cfg["objective"]
        # training.tracking and training.evaluation: groups of diffuse train alone
        self.logger_cfg, self.metrics_cfg = cfg.get("logger"), cfg.get("metrics")
        self.runtime, self.schedule = check_config(cfg)
        self.device, self.amp = self.runtime.device, self.runtime.autocast
        self.dist = distributed.setup(self.device.type)
        if self.tcfg["batch_size"] % self.dist.world:
            raise UserError(
                f"trainer.batch_size={self.tcfg['batch_size']} does not split over {self.dist.world} processes: "
                "it is the global batch and must be a multiple of the world size"
            )
        self.data, self.latent = self._training_data(cfg)
        self.sampler_cfg = cfg["sampler"]
        self.plan = plan_sampler(cfg["sampler"], self.tcfg["sample_steps"], self.schedule, self.data.is_8bit)
        # Mask training: the network also reads the masked image (C) and the mask (1); it still predicts C channels.
        self.mask_probs = check_mask_kinds(self.ocfg["mask_kinds"]) if self.ocfg["mask_training"] else None
        # Super-resolution: the network also reads the upsampled low-resolution image and embeds its augmentation level.
        self.lowres = superres_of(cfg, self.data.resolution)
        d = self.data
        self.model_cfg = network_config(cfg["model"], self.ocfg, d.channels, d.resolution, self.lowres is not None)
        check_classes(cfg["model"], d.name, d.num_classes)
        seed = self.tcfg["seed"]
        torch.manual_seed(seed)  # the initial weights follow from the seed alone
        self._build_networks(init_weights)
        self.data = self.data.to(self.device) if self.runtime.data_on_device else self.data
        self.reset_optimizer()
        # Two streams: the data order, and the diffusion noise (t, eps). Both are saved for exact resume.
        self.data_gen = torch.Generator().manual_seed(seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        torch.manual_seed(seed + 2)  # dropout
        self.step = 0
        # Non-finite steps: [skipped in all, current run in a row, longest run since last read]. Kept on the
        # device and read at log steps, so the guard adds no per-step host sync.
        self.nonfinite = torch.zeros(3, dtype=torch.long, device=self.device)
        self.last_saved: tuple[Path, int] | None = None
        self.interval: dict = {}  # the open metrics.jsonl interval (training.loop), checkpointed for an exact resume
        self.config = self._record(cfg)
        self.objective = (make_objective or default_objective)(self)
        self.config.update(self.objective.config(self.step))

    def _training_data(self, cfg: dict):
        """(the dataset, None), or for latent diffusion (the scaled latents of its images, the codec)."""
        data = build_dataset(cfg["dataset"])
        if not cfg.get("autoencoder"):
            return data, None
        from diffuse.pipeline.latent import latent_training_data

        report = console.print if self.dist.main else (lambda *a: None)
        return latent_training_data(cfg, data, self.out, self.dist, self.device, report)

    def _build_networks(self, init_weights: dict | None) -> None:
        """The network (net, which holds the state), its EMA, and the module the forward pass runs (model)."""
        rt = self.runtime
        self.net = build_network(self.model_cfg)
        if init_weights is not None:
            self.net.load_state_dict(init_weights)
        self.net = set_attention(self.net, rt.attention).to(self.device)
        if rt.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        # DDP averages gradients over ranks; the bare net holds the state.
        self.model = self.net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if rt.compile:
            self.model = compile_network(self.model, rt.compile_mode)

    def _record(self, cfg: dict) -> dict:
        """The config every checkpoint of the run records."""
        config = {
            "model": self.model_cfg,
            "schedule": cfg["schedule"],
            "objective": self.ocfg,
            "dataset": cfg["dataset"],
            "trainer": self.tcfg,
            "data": {"is_8bit": self.data.is_8bit, "num_classes": self.data.num_classes},
        }
        if self.latent is not None:
            config["autoencoder"] = self.latent.record()
        if self.lowres is not None:
            config["condition"] = {k: v for k, v in self.lowres.cond.items() if k != "factor"}
        return config

    def reset_optimizer(self) -> None:
        # Fused on every device: its found_inf input lets a non-finite step be skipped on the device itself.
        self.opt = torch.optim.AdamW(
            self.net.parameters(),
            lr=self.tcfg["lr"],
            weight_decay=self.tcfg["weight_decay"],
            fused=True,
        )

    # -- checkpoint state ----------------------------------------------------------------------------------
    def state(self) -> Checkpoint:
        rng = {"data": self.data_gen.get_state(), "noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        skipped, run, _ = self.nonfinite.tolist()
        return Checkpoint(
            config=self.config,
            step=self.step,
            model=self.net.state_dict(),
            ema=self.ema.state_dict(),
            optim=self.opt.state_dict(),
            rng=rng,
            extra={"skipped": skipped, "nonfinite_run": run, **self.interval},
            aux=self.objective.tensors(),
        )

    def load(self, ckpt: Checkpoint, path: Path) -> None:
        if not ckpt.rng or any(k not in ckpt.rng for k in ("data", "noise", "torch")) or ckpt.optim is None:
            raise UserError(
                f"cannot resume from {path}: it holds weights only (no optimizer or RNG state, e.g. made by "
                "diffuse convert), so the run it came from cannot be continued exactly; sample from it instead"
            )
        check_resumable(path, ckpt.config, self.config, self.schedule)
        check_rng_states(ckpt.rng, path)
        self.net.load_state_dict(ckpt.model)
        self.ema.load_state_dict(ckpt.ema)
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
        self.interval = {"interval": ckpt.extra["interval"]} if ckpt.extra.get("interval") else {}
        self.objective.load(ckpt.aux, ckpt.extra)
        self.config.update(self.objective.config(self.step))

    def save(self) -> Path | None:
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
            err = UserError(
                f"{e}; the last checkpoint written, {self.last_saved[0]} (step {self.last_saved[1]}), is kept"
            )
            err.keep_outputs = True
            raise err from None
        self.last_saved = (last, self.step)
        if keep > 0:
            # Oldest first; files of a step beyond this one are left from a timeline a resume abandoned (a
            # damaged checkpoint passed over) and go before any older valid one.
            others = sorted(
                (p for p in numbered_checkpoints(ckdir) if p != path),
                key=lambda p: (numbered_step(p) <= self.step, numbered_step(p)),
            )
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
        return learning_rate(self.tcfg, step)

    def train_step(self) -> torch.Tensor:
        # Every rank draws the whole global batch's randomness (indices, flips, label drops, t, eps) from the same
        # generators and keeps its own slice: the run is the same whatever the world size, and so is a resume.
        bs = self.tcfg["batch_size"]
        local = bs // self.dist.world
        sl = slice(self.dist.rank * local, (self.dist.rank + 1) * local)
        idx = torch.randint(0, len(self.data), (bs,), generator=self.data_gen)
        x0, y = self.data.batch(idx, generator=self.data_gen)
        x0, y = x0[sl].to(self.device, non_blocking=True), y[sl]
        if self.runtime.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device) if self.net.num_classes else None
        batch = Batch(x0, y, bs, sl, self.noise_gen, self.step)
        model = self.model
        if self.mask_probs is not None:  # from the checkpointed data stream, whole global batch, like the flips
            h, w = x0.shape[-2:]
            generate_px = draw_masks(bs, h, w, self.mask_probs, self.data_gen, device=self.device)[sl]
            model = MaskConditioned(self.model, mask_context(x0, 1 - generate_px))
        if self.lowres is not None:  # its levels and noise from the checkpointed noise stream, whole global batch
            model = self.lowres.wrap(self.model, batch)
        p_uncond = self.ocfg["p_uncond"]
        if y is not None and p_uncond > 0:  # label dropout to the null label: learns eps_null for guidance
            drop = batch.uniform() < p_uncond
            batch = dataclasses.replace(batch, y=torch.where(drop, torch.full_like(y, self.net.num_classes), y))
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.net.train()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = self.objective.loss(model, batch).mean()
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
        if self.objective.after_step(self.step):  # a new stage (a progressive round): a fresh optimizer
            self.reset_optimizer()
            self.config.update(self.objective.config(self.step))
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
    def update_ema(self, finite: torch.Tensor | None = None) -> None:
        decay = self.tcfg["ema_decay"]
        if self.tcfg["ema_warmup"]:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        ema_p = list(self.ema.parameters())
        weight = 1.0 - decay
        if finite is None and not self.runtime.ema_foreach:
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
    def sample_grid(self) -> Path | None:
        """samples/step_NNNNNNN.png and grid.png from the EMA network, the same images (seed) every time."""
        n = self.tcfg["sample_n"]
        if n == 0 or not self.dist.main:
            return None
        net = MaskConditioned(self.ema) if self.mask_probs is not None else self.ema  # nothing known: plain sampling
        if self.lowres is not None:  # the data's first low-resolution images, the same every time
            net = self.lowres.grid_model(
                self.ema, self.data.batch(torch.arange(n) % len(self.data))[0].to(self.device), self.tcfg["seed"]
            )
        den = self.objective.denoiser(net, self.amp)
        steps = self.objective.grid_steps(self.step)
        learned = den.variance_output if getattr(den, "learn_sigma", False) else None
        if steps is not None or learned is not None:
            plan = plan_sampler(
                self.sampler_cfg,
                steps if steps is not None else self.tcfg["sample_steps"],
                self.schedule,
                self.data.is_8bit,
                learned_variance=learned,
            )
        else:
            plan = self.plan
        shape = (self.data.channels, self.data.resolution, self.data.resolution)
        labels = (torch.arange(n) % self.data.num_classes) if self.net.num_classes else None
        decode = self.latent.decode if self.latent is not None else None  # latent samples are shown as images
        x = generate(
            den,
            plan,
            shape=shape,
            seed=self.tcfg["seed"],
            device=self.device,
            batch_size=n if self.lowres else min(n, 256),
            indices=list(range(n)),
            labels=labels,
            progress=False,
            decode=decode,
        ).images
        grid = make_grid(to_uint8(x))
        self.last_grid = grid  # for the logger (training.tracking)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        save_png(grid, path, upscale=grid_upscale(x.shape[-1]))
        save_png(grid, self.out / "grid.png", upscale=grid_upscale(x.shape[-1]))
        return path

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.net.parameters())
        return (
            f"training {self.model_cfg['arch']} ({n_params / 1e6:.2f}M parameters) on {self.data.name} "
            f"({len(self.data)} images, {self.data.resolution}x{self.data.resolution}"
            + (
                f" latents of {self.data.channels} channels, scale factor {self.latent.scale_factor:.4g}"
                if self.latent
                else ""
            )
            + f") on {self.device}"
            + (f" x {self.dist.world} processes" if self.dist.enabled else "")
        )


def default_objective(trainer: Trainer):
    """objective.kind: diffusion (the denoising losses), consistency (consistency training from scratch) or edm
    (Karras et al.'s preconditioned denoiser)."""
    from diffuse.training.objectives import ConsistencyObjective, DiffusionObjective, EDMObjective

    o, schedule = trainer.ocfg, trainer.schedule
    if o["kind"] == "consistency":
        return ConsistencyObjective(
            o, schedule, net=trainer.net, steps=trainer.tcfg["steps"], seed=trainer.tcfg["seed"], device=trainer.device
        )
    if o["kind"] == "edm":
        return EDMObjective(o, schedule)
    return DiffusionObjective(o, schedule, discretized=trainer.data.is_8bit)


def check_rng_states(rng: dict[str, torch.Tensor], path: Path) -> None:
    """The generator states of a checkpoint (metadata a user may have edited, or another program written): a CPU
    generator's state is a uint8 tensor of one fixed size; anything else is one line, not set_state's traceback."""
    size = torch.Generator().get_state().numel()
    for name in ("data", "torch", "noise"):
        t = rng[name]
        if name == "noise" and t.numel() != size:  # a CUDA generator's state: load() reseeds on another device
            continue
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != size:
            raise UserError(
                f"cannot resume from {path}: its rng.{name} is not a generator state "
                f"({str(t.dtype).removeprefix('torch.')}, {t.numel()} values; a CPU generator's is uint8, {size})"
            )
