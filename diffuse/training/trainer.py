"""The state of one training run (network, EMA, optimizer, random streams, counters) and its optimisation step.
Every piece of it goes into the checkpoint, so that a resumed run is the run it continues, bit for bit."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import distributed
from diffuse.checkpoint import Checkpoint, numbered_checkpoints, numbered_step, save_checkpoint
from diffuse.console import console
from diffuse.data import build_dataset
from diffuse.diffusion.inpainting import MaskConditioned, mask_context
from diffuse.diffusion.masks import check_mask_kinds, draw_masks
from diffuse.diffusion.objectives import WEIGHTINGS
from diffuse.diffusion.prediction import PREDICTIONS
from diffuse.errors import UserError
from diffuse.fastpath import compile_network, set_attention
from diffuse.images import grid_upscale, make_grid, save_png, to_uint8
from diffuse.nets import build_network, check_model_config
from diffuse.pipeline.model import schedule_from_config
from diffuse.pipeline.runtime import resolve_runtime
from diffuse.pipeline.sampling import generate, plan_sampler
from diffuse.training.evaluation import check_eval_config
from diffuse.training.superres import network_io
from diffuse.training.tracking import check_logger
from diffuse.validate import check_choice, check_number


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
    check_number("trainer.max_nonfinite", t["max_nonfinite"], minimum=1, integer=True)
    if not isinstance(t["ema_warmup"], bool):
        raise UserError(f"trainer.ema_warmup={t['ema_warmup']!r} is not allowed: true or false")


def validate_objective(o: dict) -> None:
    from diffuse.training.objectives import KINDS, check_edm

    check_choice("objective.kind", o["kind"], KINDS)
    check_choice("objective.prediction", o["prediction"], PREDICTIONS)
    if o["kind"] == "edm":
        check_edm(o)
    else:
        check_choice("objective.weighting", o["weighting"], WEIGHTINGS)
    check_number("objective.min_snr_gamma", o["min_snr_gamma"], minimum=0, exclusive_min=True)
    check_number("objective.p_uncond", o["p_uncond"], minimum=0, maximum=1)
    if o["mask_training"] not in (True, False):
        raise UserError(f"objective.mask_training={o['mask_training']!r} is not allowed: it must be true or false")
    if o["mask_training"]:
        check_mask_kinds(o["mask_kinds"])
    if o["learn_sigma"] not in (True, False):
        raise UserError(f"objective.learn_sigma={o['learn_sigma']!r} is not allowed: it must be true or false")
    if o["learn_sigma"]:
        if o["kind"] != "diffusion":
            raise UserError(
                f"objective.learn_sigma=true is not allowed with objective.kind={o['kind']}: learned variances "
                "(Nichol & Dhariwal 2021) are for diffusion training (objective=simple, min_snr or vlb)"
            )
        check_number("objective.vlb_weight", o["vlb_weight"], minimum=0)


def output_channels(o: dict, channels: int) -> int | None:
    """The network's output channels when they are not its input's: the image's C beside a mask-conditioned input
    (2C + 1), doubled with learned variances (objective.learn_sigma)."""
    if o.get("learn_sigma"):
        return 2 * channels
    return channels if o.get("mask_training") else None


def superres_of(cfg: dict, resolution: int):
    """condition=lowres of a training config, checked: its LowResTraining, or None."""
    from diffuse.training.superres import LowResTraining, lowres_condition

    # before the condition's keys: with an autoencoder, `resolution` is the latent side, which the user never typed
    c = cfg.get("condition")
    if isinstance(c, dict) and c.get("name") not in (None, "none") and cfg.get("autoencoder"):
        raise UserError(
            "condition=lowres with autoencoder= is not supported: super-resolution models are trained on pixels"
        )
    cond = lowres_condition(cfg.get("condition"), cfg["model"], cfg["objective"], resolution)
    return LowResTraining(cond) if cond is not None else None


def check_latent_cache(value) -> None:
    """latent_cache=DIR: a folder, or one that can be made; checked before any work (the encoding makes it)."""
    if value in (None, ""):
        return
    p = Path(str(value)).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(
            f"latent_cache={str(value)!r} is not allowed: it is a file; give a folder for the encoded dataset"
        )
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"latent_cache={str(value)!r} cannot be written: {parent} is not a writable folder")


def objective_key(o) -> dict:
    """An objective config as resume compares it: checkpoints from before mask training lack its keys, and
    mask_kinds only matter when mask_training is on."""
    o = dict(o or {})
    if o.get("kind", "diffusion") == "diffusion":  # checkpoints from before consistency models lack the key
        o.pop("kind", None)
    if not o.get("mask_training"):
        o["mask_training"] = False
        o.pop("mask_kinds", None)
    if not o.get("learn_sigma"):  # checkpoints from before learned variances lack the keys
        o.pop("learn_sigma", None)
        o.pop("vlb_weight", None)
    return o


def check_config(cfg: dict):
    """What a training run refuses from its config alone, without loading the data or allocating the network (it is
    sized on the meta device at the dataset's shape): (runtime, schedule). Trainer runs it first; a -m sweep runs
    it for every job before the first starts (tasks/train.py check)."""
    from diffuse.data import DATASETS, dataset_shape

    t, o = cfg["trainer"], cfg["objective"]
    validate_trainer(t)
    validate_objective(o)
    check_logger(cfg.get("logger"))
    check_eval_config(t, cfg.get("metrics"))
    rt = resolve_runtime(cfg["runtime"])
    schedule = schedule_from_config(cfg["schedule"])
    model, data = cfg["model"], cfg["dataset"]
    if model.get("arch") == "oracle":
        raise UserError(
            "model=oracle is the exact mixture denoiser: there is nothing to train (use it with diffuse sample)"
        )
    check_model_config(model)
    if data.get("name") not in DATASETS:
        raise UserError(f"dataset={data.get('name')!r} is not allowed: choose one of {', '.join(sorted(DATASETS))}")
    channels, resolution, classes = dataset_shape(data)
    if cfg.get("autoencoder"):  # latent diffusion: the network is sized for the latents
        from diffuse.pipeline.latent import check_latent_config

        channels, resolution = check_latent_config(cfg, channels, resolution)
        check_latent_cache(cfg.get("latent_cache"))
    if t["sample_steps"] > schedule.T:
        raise UserError(f"trainer.sample_steps={t['sample_steps']} is not allowed: at most schedule.T={schedule.T}")
    plan_sampler(cfg["sampler"], t["sample_steps"], schedule, data["name"] != "gmm")
    k = model.get("num_classes")
    if k and (not classes or classes > k):
        raise UserError(
            f"model.num_classes={k} does not fit dataset={data['name']!r}, which has {classes or 'no'} classes"
        )
    net = {**model, "resolution": resolution, "in_channels": channels}
    if o["mask_training"]:
        net.update(in_channels=2 * channels + 1)
    if superres_of(cfg, resolution) is not None:
        net.update(network_io(channels))
    if output_channels(o, channels) is not None:
        net.update(out_channels=output_channels(o, channels))
    try:
        with torch.device("meta"):
            build_network(net)
    except UserError as e:
        if not cfg.get("autoencoder"):
            raise
        # the network's resolution is the latents' side, not the dataset.resolution the user typed
        msg = str(e).replace(f"dataset.resolution={resolution} ", f"the latent side {resolution} ")
        raise UserError(
            f"with autoencoder= the network sees {resolution}x{resolution} latents of dataset.resolution="
            f"{data.get('resolution')}: {msg}"
        ) from None
    return rt, schedule


class Trainer:
    """One training run, built from the composed train config (model, dataset, schedule, objective, trainer,
    sampler, runtime)."""

    def __init__(self, cfg: dict | DictConfig, out: Path, make_objective=None, init_weights: dict | None = None):
        """make_objective(trainer) -> the objective (default: by objective.kind, diffusion or consistency training);
        init_weights: the network's starting weights (a distillation student starts as its teacher)."""
        cfg = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
        self.out = out
        self.tcfg, self.ocfg = cfg["trainer"], cfg["objective"]
        self.logger_cfg, self.metrics_cfg = (
            cfg.get("logger"),
            cfg.get("metrics"),
        )  # training.tracking, training.evaluation
        rt, self.schedule = check_config(cfg)
        self.runtime = rt
        self.device = rt.device
        self.dist = distributed.setup(self.device.type)
        if self.tcfg["batch_size"] % self.dist.world:
            raise UserError(
                f"trainer.batch_size={self.tcfg['batch_size']} does not split over {self.dist.world} processes: "
                "it is the global batch and must be a multiple of the world size"
            )
        self.amp = rt.autocast
        model_cfg = cfg["model"]
        self.data = build_dataset(cfg["dataset"])
        self.latent = None  # latent diffusion: the codec whose scaled latents replace the images
        if cfg.get("autoencoder"):
            from diffuse.pipeline.latent import latent_training_data

            report = console.print if self.dist.main else (lambda *a: None)
            self.data, self.latent = latent_training_data(cfg, self.data, out, self.dist, self.device, report)
        self.sampler_cfg = cfg["sampler"]
        self.plan = plan_sampler(cfg["sampler"], self.tcfg["sample_steps"], self.schedule, self.data.is_8bit)
        self.model_cfg = {**model_cfg, "resolution": self.data.resolution, "in_channels": self.data.channels}
        # Mask training: the network also reads the masked image (C) and the mask (1); it still predicts C channels.
        self.mask_probs = check_mask_kinds(self.ocfg["mask_kinds"]) if self.ocfg["mask_training"] else None
        if self.mask_probs is not None:
            self.model_cfg.update(in_channels=2 * self.data.channels + 1)
        # Super-resolution: the network also reads the upsampled low-resolution image and embeds its augmentation level.
        self.lowres = superres_of(cfg, self.data.resolution)
        if self.lowres is not None:
            self.model_cfg.update(network_io(self.data.channels))
        if output_channels(self.ocfg, self.data.channels) is not None:
            self.model_cfg.update(out_channels=output_channels(self.ocfg, self.data.channels))
        k = model_cfg.get("num_classes")
        if k and (not self.data.num_classes or self.data.num_classes > k):
            raise UserError(
                f"model.num_classes={k} does not fit dataset={self.data.name!r}, which has {self.data.num_classes or 'no'} classes"
            )
        seed = self.tcfg["seed"]
        torch.manual_seed(seed)  # the initial weights follow from the seed alone
        self.net = build_network(self.model_cfg)
        if init_weights is not None:
            self.net.load_state_dict(init_weights)
        self.net = set_attention(self.net, rt.attention).to(self.device)
        if rt.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        # The module that runs the forward pass: DDP averages gradients over ranks; the bare net holds the state.
        self.model = self.net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if rt.compile:
            self.model = compile_network(self.model, rt.compile_mode)
        self.data = self.data.to(self.device) if rt.data_on_device else self.data
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
        self.config = {
            "model": self.model_cfg,
            "schedule": cfg["schedule"],
            "objective": self.ocfg,
            "dataset": cfg["dataset"],
            "trainer": self.tcfg,
            "data": {"is_8bit": self.data.is_8bit, "num_classes": self.data.num_classes},
        }
        if self.latent is not None:
            self.config["autoencoder"] = self.latent.record()
        if self.lowres is not None:
            self.config["condition"] = {k: v for k, v in self.lowres.cond.items() if k != "factor"}
        self.objective = (make_objective or default_objective)(self)
        self.config.update(self.objective.config())

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
        if ckpt.config.get("model") != self.model_cfg:
            raise UserError(
                f"cannot resume from {path}: it was trained with model {ckpt.config.get('model')}, this run has {self.model_cfg}"
            )
        # The schedule is compared by what it is (its betas): a key added to the config since is not a difference.
        same_schedule = torch.equal(schedule_from_config(ckpt.config.get("schedule")).betas, self.schedule.betas)
        if not same_schedule or objective_key(ckpt.config.get("objective")) != objective_key(self.ocfg):
            raise UserError(f"cannot resume from {path}: its schedule or objective differs from this run's")
        if ckpt.config.get("condition") != self.config.get("condition"):
            raise UserError(
                f"cannot resume from {path}: it was trained with condition {ckpt.config.get('condition')}, "
                f"this run has {self.config.get('condition')}"
            )
        ae_then, ae_now = (
            (ckpt.config.get("autoencoder") or {}).get("hash"),
            (self.config.get("autoencoder") or {}).get("hash"),
        )
        if ae_then != ae_now:
            raise UserError(
                f"cannot resume from {path}: it was trained on the latents of autoencoder {ae_then and ae_then[:12]}, "
                f"this run on those of {ae_now and ae_now[:12]}"
            )
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
        if self.runtime.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device) if self.net.num_classes else None
        model = self.model
        if self.mask_probs is not None:  # from the checkpointed data stream, whole global batch, like the flips
            h, w = x0.shape[-2:]
            generate_px = draw_masks(bs, h, w, self.mask_probs, self.data_gen, device=self.device)[sl]
            model = MaskConditioned(self.model, mask_context(x0, 1 - generate_px))
        if self.lowres is not None:  # its levels and noise from the checkpointed noise stream, whole global batch
            model = self.lowres.wrap(self.model, x0, bs, sl, self.noise_gen)
        p_uncond = self.ocfg["p_uncond"]
        gdev = self.noise_gen.device
        if y is not None and p_uncond > 0:  # label dropout to the null label: learns eps_null for guidance
            drop = (torch.rand((bs,), generator=self.noise_gen, device=gdev) < p_uncond)[sl].to(y.device)
            y = torch.where(drop, torch.full_like(y, self.net.num_classes), y)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.net.train()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = self.objective.loss(model, x0, y, bs, sl).mean()
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
        self.objective.after_step()
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
        steps = self.objective.grid_steps()
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

    kind = trainer.ocfg.get("kind", "diffusion")
    return {"consistency": ConsistencyObjective, "edm": EDMObjective}.get(kind, DiffusionObjective)(trainer)
