"""What one training step minimises, and the state that comes with it beyond the network: a teacher, a target
network, a curriculum. The Trainer draws the data (and label dropout); an objective draws its own randomness from
the trainer's noise generator, always for the whole global batch, keeping this rank's slice, so that a run is the
same whatever the world size and a resume continues it exactly.

    diffusion      the denoising losses of diffusion.objectives (simple, min-SNR, the bound's weights)
    edm            Karras et al. 2022: the network preconditioned by sigma_data, log-normal noise levels, lambda(sigma)
    progressive    Salimans & Ho 2022: a student of N DDIM steps matches its teacher's 2N, N halving per round
    consistency    Song et al. 2023 / Song & Dhariwal 2023: consistency distillation (a teacher's ODE step between
                   adjacent levels) or consistency training (the same noise at both levels), against a target network
    ect            Geng et al. 2024: consistency tuning from a diffusion model, the two levels drawing closer over
                   the run
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from diffuse.diffusion import consistency as cm
from diffuse.diffusion import distillation as pd
from diffuse.diffusion.noise import sample_seed
from diffuse.diffusion.objectives import diffusion_loss, edm_loss, edm_sigmas
from diffuse.diffusion.prediction import EDMDenoiser, NetworkDenoiser
from diffuse.errors import UserError
from diffuse.validate import check_choice, check_number

KINDS = ("diffusion", "consistency", "edm")


class DiffusionObjective:
    """The denoising loss at t ~ U{0..T-1}, eps ~ N(0, I)."""

    def __init__(self, trainer):
        self.tr = trainer

    def loss(self, model, x0: torch.Tensor, y, bs: int, sl: slice) -> torch.Tensor:
        tr, o = self.tr, self.tr.ocfg
        gdev = tr.noise_gen.device
        t = torch.randint(0, tr.schedule.T, (bs,), generator=tr.noise_gen, device=gdev)[sl].to(tr.device)
        noise = torch.randn((bs, *x0.shape[1:]), generator=tr.noise_gen, device=gdev, dtype=x0.dtype)[sl].to(tr.device)
        # The loss covers every pixel, known ones included (see README: mask-conditioned training).
        return diffusion_loss(
            model,
            x0,
            tr.schedule,
            prediction=o["prediction"],
            weighting=o["weighting"],
            min_snr_gamma=o["min_snr_gamma"],
            y=y,
            t=t,
            noise=noise,
            learn_sigma=o["learn_sigma"],
            vlb_weight=o["vlb_weight"],
            discretized=tr.data.is_8bit,
        )

    def after_step(self) -> None:
        pass

    def denoiser(self, net, autocast=None):
        return NetworkDenoiser(
            net,
            self.tr.ocfg["prediction"],
            self.tr.schedule,
            autocast_dtype=autocast,
            learn_sigma=self.tr.ocfg["learn_sigma"],
        )

    def grid_steps(self) -> int | None:
        return None  # the trainer's sample_steps

    def status(self) -> dict:
        """Where a staged objective is, for the progress bar and metrics.jsonl (a round, a level count N)."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state(self) -> dict:
        return {}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        pass

    def config(self) -> dict:
        return {}


class EDMObjective(DiffusionObjective):
    """EDM training (Karras et al. 2022): ln sigma ~ N(P_mean, P_std^2) clamped to the schedule's levels, eps ~ N(0, I),
    lambda(sigma) |D - x_0|^2 with D the preconditioned network. Its checkpoint records objective.kind=edm, which is
    all that sampling needs to rebuild D."""

    def __init__(self, trainer):
        super().__init__(trainer)
        o = trainer.ocfg
        check_edm(o)
        self.sigma_data = float(o["sigma_data"])
        self.sigma_range = float(trainer.schedule.sigmas[0]), float(trainer.schedule.sigmas[-1])

    def loss(self, model, x0, y, bs, sl):
        tr, o = self.tr, self.tr.ocfg
        gdev = tr.noise_gen.device
        sigma = edm_sigmas(
            bs,
            tr.noise_gen,
            p_mean=o["p_mean"],
            p_std=o["p_std"],
            sigma_min=self.sigma_range[0],
            sigma_max=self.sigma_range[1],
            device=gdev,
        )[sl].to(tr.device)
        noise = torch.randn((bs, *x0.shape[1:]), generator=tr.noise_gen, device=gdev, dtype=x0.dtype)[sl].to(tr.device)
        return edm_loss(model, x0, tr.schedule, sigma, noise, sigma_data=self.sigma_data, y=y)

    def denoiser(self, net, autocast=None):
        return EDMDenoiser(net, self.tr.schedule, self.sigma_data, autocast_dtype=autocast)


def check_edm(o: dict) -> None:
    """The keys of objective=edm. Its network's target and loss weight are fixed by the preconditioning, so
    prediction and weighting only record them (x0: D predicts the clean image; edm: Karras's lambda)."""
    if o["prediction"] != "x0":
        raise UserError(
            f"objective.prediction={o['prediction']!r} is not allowed with objective.kind=edm: the "
            "preconditioned D(x; sigma) predicts x0 (its network regresses (x0 - c_skip x~) / c_out); leave it x0"
        )
    if o["weighting"] != "edm":
        raise UserError(
            f"objective.weighting={o['weighting']!r} is not allowed with objective.kind=edm: its loss weight "
            "is Karras et al.'s lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; leave it edm"
        )
    check_number("objective.sigma_data", o["sigma_data"], minimum=0, exclusive_min=True)
    check_number("objective.p_mean", o["p_mean"])
    check_number("objective.p_std", o["p_std"], minimum=0, exclusive_min=True)


def frozen(net):
    return copy.deepcopy(net).eval().requires_grad_(False)


class ProgressiveObjective(DiffusionObjective):
    """Progressive distillation: rounds of trainer.steps / rounds each; in round r the student of `steps[r]` DDIM
    steps learns its teacher's two-step target. The first teacher is given (a network's denoiser, the mixture
    oracle); each later teacher is a frozen copy of the student's EMA at the end of the round before. At the end of
    a round its student is written to checkpoints/student_{N}steps.safetensors (recording its steps) and the
    optimizer restarts, as a new distillation does."""

    def __init__(self, trainer, teacher, dcfg: dict, on_round: Callable[[int, dict], None]):
        super().__init__(trainer)
        self.first_teacher, self.teacher = teacher, teacher
        self.rounds = check_progressive(dcfg, trainer.tcfg["steps"])
        self.weighting = dcfg["weighting"]
        # on the device once: the loss indexes it every step
        self.grid = pd.teacher_grid(trainer.schedule, dcfg["start_steps"], dcfg["spacing"]).to(trainer.device)
        self.per_round = trainer.tcfg["steps"] // len(self.rounds)
        self.on_round = on_round
        self.teacher_net = None  # the frozen student that teaches rounds after the first
        self.dcfg = dcfg

    @property
    def round(self) -> int:
        return min(self.tr.step // self.per_round, len(self.rounds) - 1)

    @property
    def steps(self) -> int:
        return self.rounds[self.round]

    def loss(self, model, x0, y, bs, sl):
        tr = self.tr
        gdev = tr.noise_gen.device
        index = torch.randint(0, self.steps, (bs,), generator=tr.noise_gen, device=gdev)[sl].to(tr.device)
        noise = torch.randn((bs, *x0.shape[1:]), generator=tr.noise_gen, device=gdev, dtype=x0.dtype)[sl].to(tr.device)
        return pd.progressive_loss(
            model,
            tr.ocfg["prediction"],
            self.teacher,
            x0,
            tr.schedule,
            self.grid,
            self.steps,
            index,
            noise,
            weighting=self.weighting,
            y=y,
        )

    def after_step(self) -> None:
        tr = self.tr
        if tr.step == tr.tcfg["steps"]:  # the last round's student (also last.safetensors)
            self.on_round(self.rounds[-1], self.sampling(self.rounds[-1]))
            return
        if tr.step % self.per_round or tr.step // self.per_round >= len(self.rounds):
            return
        finished = self.rounds[tr.step // self.per_round - 1]
        self.on_round(
            finished, self.sampling(finished)
        )  # the student of `finished` steps, saved before it becomes the teacher
        self.teacher_net = frozen(tr.ema)
        self.teacher = self.denoiser(self.teacher_net)
        tr.reset_optimizer()
        tr.config["sampling"] = self.sampling()

    def grid_steps(self) -> int:
        return self.steps

    def status(self) -> dict:
        return {"round": self.round + 1, "rounds": len(self.rounds), "student_steps": self.steps}

    def sampling(self, steps: int | None = None) -> dict:
        """What the student's checkpoint records: DDIM over its own levels (explicit, as spacings other than
        trailing could not rebuild them from the step count)."""
        steps = steps or self.steps
        levels = pd.student_levels(self.grid, steps)
        return {
            "sampler": "ddim",
            "steps": steps,
            "timesteps": [int(v) if not levels.is_floating_point() else float(v) for v in levels],
        }

    def tensors(self):
        return (
            {f"teacher.{k}": v for k, v in self.teacher_net.state_dict().items()}
            if self.teacher_net is not None
            else {}
        )

    def load(self, tensors, state):
        teacher = {k[len("teacher.") :]: v for k, v in tensors.items() if k.startswith("teacher.")}
        if teacher:
            self.teacher_net = frozen(self.tr.ema)
            self.teacher_net.load_state_dict(teacher)
            self.teacher = self.denoiser(self.teacher_net)
        self.tr.config["sampling"] = self.sampling()

    def config(self) -> dict:
        return {"sampling": self.sampling()}


def check_progressive(d: dict, steps: int) -> list[int]:
    """distill.* of progressive distillation against trainer.steps: the rounds' step counts."""
    rounds = pd.rounds(d["start_steps"], d["target_steps"])
    check_choice("distill.weighting", d["weighting"], pd.WEIGHTINGS)
    check_choice("distill.spacing", d["spacing"], pd.SPACINGS)
    if steps < len(rounds):
        raise UserError(
            f"trainer.steps={steps} is fewer than the {len(rounds)} rounds from {d['start_steps']} to "
            f"{d['target_steps']} steps: give each round at least one step"
        )
    return rounds


def check_consistency(o: dict, method: str) -> None:
    """The consistency keys of an objective config (objective=consistency, or a distillation method's)."""
    if o["mask_training"]:
        raise UserError(
            "objective.mask_training=true is for diffusion objectives: a consistency model is not trained with masks"
        )
    check_number("objective.target_decay", o["target_decay"], minimum=0, maximum=1)
    check_number("objective.sigma_data", o["sigma_data"], minimum=0, exclusive_min=True)
    check_choice("objective.loss", o["loss"], cm.LOSSES)
    check_number("objective.p_std", o["p_std"], minimum=0, exclusive_min=True)
    check_number("objective.p_mean", o["p_mean"])
    if method == "ect":
        check_number("distill.ect_delta", o["ect_delta"], minimum=0, maximum=1, exclusive_min=True)
        return
    check_choice("objective.curriculum", o["curriculum"], ("cd", "ict"))
    for key in ("levels_start", "levels_end"):
        check_number(f"objective.{key}", o[key], minimum=2, integer=True)
    if o["levels_end"] < o["levels_start"]:
        raise UserError(
            f"objective.levels_end={o['levels_end']} is not allowed: at least levels_start={o['levels_start']}"
        )


class ConsistencyObjective(DiffusionObjective):
    """Consistency distillation (a teacher), training (none) or tuning (method ect, continuous levels drawing
    closer). The student is a consistency model (diffusion.consistency.consistency_fn); the target network is the
    student's EMA at rate objective.target_decay (0: the student itself without gradient, as iCT), kept in the
    checkpoint. Pairs of levels sigma_lo < sigma_hi: Karras's rho = 7 grid of N(k) levels (CD: Song et al.'s
    sqrt-growing N(k) and uniform pairs; CT: iCT's doubling N(k) and log-normal pairs), or for ect a log-normal
    sigma_hi and sigma_lo = sigma_hi (1 - delta), delta halving every tenth of the run."""

    def __init__(self, trainer, teacher=None, method: str | None = None):
        super().__init__(trainer)
        o = trainer.ocfg
        self.o = o
        self.method = method or ("cd" if teacher is not None else "ct")
        self.teacher = teacher
        check_consistency(o, self.method)
        self.target_decay, self.sigma_data = o["target_decay"], o["sigma_data"]
        self.target_net = frozen(trainer.net) if self.target_decay > 0 else None
        self._levels: dict = {}

    def denoiser(self, net, autocast=None):
        return cm.ConsistencyDenoiser(
            net, self.o["prediction"], self.tr.schedule, self.sigma_data, autocast_dtype=autocast
        )

    def grid_steps(self) -> int:
        return 1

    def status(self) -> dict:
        if self.method == "ect":
            return {
                "ect_delta": self.o["ect_delta"] / 2 ** math.floor(10 * self.tr.step / max(self.tr.tcfg["steps"], 1))
            }
        return {"levels": len(self.levels()[0])}

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, t) of the current N(k) levels, on the device (computed once per N)."""
        tr, o = self.tr, self.o
        total = tr.tcfg["steps"]
        if o["curriculum"] == "ict":
            n = cm.ict_levels(tr.step, total, o["levels_start"], o["levels_end"])
        else:
            n = cm.cd_levels(tr.step, total, o["levels_start"], o["levels_end"])
        if n not in self._levels:
            sig = cm.karras_levels(tr.schedule, n)
            self._levels = {n: (sig.to(tr.device), tr.schedule.t_from_sigma(sig).to(tr.device))}
        return self._levels[n]

    def pair(self, bs: int, sl: slice):
        """(sigma_lo, t_lo, sigma_hi, t_hi, weight) for the global batch, this rank's slice."""
        tr, o = self.tr, self.o
        gdev = tr.noise_gen.device
        if self.method == "ect":
            s_min, s_max = float(tr.schedule.sigmas[0]), float(tr.schedule.sigmas[-1])
            n = torch.randn((bs,), generator=tr.noise_gen, device=gdev, dtype=torch.float64)[sl].to(tr.device)
            s_hi = (o["p_mean"] + o["p_std"] * n).exp().clamp(s_min * 1.001, s_max)
            delta = o["ect_delta"] / 2 ** math.floor(10 * tr.step / max(tr.tcfg["steps"], 1))
            s_lo = (s_hi * (1 - delta)).clamp(min=s_min)
            t_hi, t_lo = cm.t_of_sigma(tr.schedule, s_hi), cm.t_of_sigma(tr.schedule, s_lo)
            return s_lo, t_lo, s_hi, t_hi, 1 / (s_hi - s_lo)
        sig, ts = self.levels()
        if o["curriculum"] == "ict":
            # multinomial draws on the CPU: a generator seeded by (seed, step) keeps them the same on every device.
            g = torch.Generator().manual_seed(sample_seed(tr.tcfg["seed"] + 3, tr.step))
            idx = cm.lognormal_indices(sig.cpu(), bs, g, o["p_mean"], o["p_std"])[sl].to(tr.device)
            weight = 1 / (sig[idx + 1] - sig[idx])
        else:
            idx = torch.randint(0, len(sig) - 1, (bs,), generator=tr.noise_gen, device=gdev)[sl].to(tr.device)
            weight = torch.ones_like(sig[idx])
        return sig[idx], ts[idx], sig[idx + 1], ts[idx + 1], weight

    def loss(self, model, x0, y, bs, sl):
        tr = self.tr
        gdev = tr.noise_gen.device
        s_lo, t_lo, s_hi, t_hi, weight = self.pair(bs, sl)
        z = torch.randn((bs, *x0.shape[1:]), generator=tr.noise_gen, device=gdev, dtype=x0.dtype)[sl].to(tr.device)

        def shaped(v):
            return v.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))

        x_hi = x0 + shaped(s_hi) * z  # x~ = x_0 + sigma eps, and x_t = x~ / sqrt(1 + sigma^2)
        if self.teacher is not None:
            x_lo = cm.heun_step(self.teacher, x_hi, s_hi, s_lo, t_hi, t_lo, y)
        else:
            x_lo = x0 + shaped(s_lo) * z
        f = cm.consistency_fn(
            model,
            self.o["prediction"],
            tr.schedule,
            x_hi / shaped((1 + s_hi**2).sqrt()),
            t_hi,
            y,
            sigma_data=self.sigma_data,
        )
        with torch.no_grad():
            target_net = self.target_net if self.target_net is not None else model
            f_target = cm.consistency_fn(
                target_net,
                self.o["prediction"],
                tr.schedule,
                x_lo / shaped((1 + s_lo**2).sqrt()),
                t_lo,
                y,
                sigma_data=self.sigma_data,
            )
        return cm.pair_distance(f, f_target, self.o["loss"]) * weight.to(torch.float32)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.target_net is None:
            return
        torch._foreach_lerp_(
            list(self.target_net.parameters()), [p.detach() for p in self.tr.net.parameters()], 1 - self.target_decay
        )

    def sampling(self) -> dict:
        return {"sampler": "consistency", "steps": 1}

    def tensors(self):
        return (
            {f"target.{k}": v for k, v in self.target_net.state_dict().items()} if self.target_net is not None else {}
        )

    def load(self, tensors, state):
        target = {k[len("target.") :]: v for k, v in tensors.items() if k.startswith("target.")}
        if self.target_net is not None:
            if not target:
                raise UserError(
                    "cannot resume: the checkpoint holds no target network, which this consistency run keeps"
                )
            self.target_net.load_state_dict(target)

    def config(self) -> dict:
        return {"sampling": self.sampling()}
