"""What one training step minimises, and the state that comes with it beyond the network: a teacher, a target
network, a curriculum. The Trainer draws the data (and label dropout) and hands each step to its objective as a
Batch; an objective draws its own randomness from the batch's noise stream, always for the whole global batch,
keeping this rank's rows, so that a run is the same whatever the world size and a resume continues it exactly.

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
from dataclasses import dataclass, field

import torch

from diffuse.diffusion import consistency as cm
from diffuse.diffusion import distillation as pd
from diffuse.diffusion.noise import sample_seed
from diffuse.diffusion.objectives import diffusion_loss, edm_loss, edm_sigmas
from diffuse.diffusion.prediction import EDMDenoiser, NetworkDenoiser
from diffuse.errors import UserError
from diffuse.training.config import check_consistency, check_edm, check_progressive


@dataclass(frozen=True)
class Batch:
    """One step's examples as its objective sees them: this rank's rows of the global batch, the step's index (the
    steps taken before it) and the noise stream every draw of the step comes from."""

    x0: torch.Tensor
    y: torch.Tensor | None
    size: int  # the global batch
    rows: slice  # this rank's rows of it
    gen: torch.Generator
    step: int

    def mine(self, drawn: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a draw for the global batch, on the examples' device."""
        return drawn[self.rows].to(self.x0.device)

    def normal(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.mine(torch.randn((self.size, *shape), generator=self.gen, device=self.gen.device, dtype=dtype))

    def noise(self) -> torch.Tensor:
        """eps ~ N(0, I) of the examples' shape and dtype."""
        return self.normal(*self.x0.shape[1:], dtype=self.x0.dtype)

    def uniform(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.mine(torch.rand((self.size,), generator=self.gen, device=self.gen.device, dtype=dtype))

    def integers(self, high: int) -> torch.Tensor:
        return self.mine(torch.randint(0, high, (self.size,), generator=self.gen, device=self.gen.device))


@dataclass(frozen=True)
class Status:
    """Where an objective is at a log step: its fields join the metrics.jsonl record (and the logger's), its text
    the progress bar and the plain log line."""

    fields: dict = field(default_factory=dict)
    text: str = ""


class Objective:
    """What the Trainer asks of an objective besides its loss(model, batch) and denoiser(net, autocast); these
    defaults are those of an objective with no state of its own."""

    def after_step(self, step: int) -> bool:
        """After the optimizer step that made `step` steps taken: True when a new stage starts there, for which the
        Trainer restarts its optimizer and records config(step) again."""
        return False

    def grid_steps(self, step: int) -> int | None:
        return None  # the trainer's sample_steps

    def status(self, step: int) -> Status:
        """Where a staged objective is, for the progress bar and metrics.jsonl (a round, a level count N)."""
        return Status()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        pass

    def config(self, step: int) -> dict:
        return {}


def network_denoiser(net, o: dict, schedule, autocast=None) -> NetworkDenoiser:
    return NetworkDenoiser(net, o["prediction"], schedule, autocast_dtype=autocast, learn_sigma=o["learn_sigma"])


class DiffusionObjective(Objective):
    """The denoising loss at t ~ U{0..T-1}, eps ~ N(0, I). discretized: the data is 8-bit (the bound's last term is
    a discretized likelihood)."""

    def __init__(self, o: dict, schedule, *, discretized: bool):
        self.o, self.schedule, self.discretized = o, schedule, discretized

    def loss(self, model, batch: Batch) -> torch.Tensor:
        o = self.o
        t = batch.integers(self.schedule.T)
        # The loss covers every pixel, known ones included (see README: mask-conditioned training).
        return diffusion_loss(
            model,
            batch.x0,
            self.schedule,
            prediction=o["prediction"],
            weighting=o["weighting"],
            min_snr_gamma=o["min_snr_gamma"],
            y=batch.y,
            t=t,
            noise=batch.noise(),
            learn_sigma=o["learn_sigma"],
            vlb_weight=o["vlb_weight"],
            discretized=self.discretized,
        )

    def denoiser(self, net, autocast=None):
        return network_denoiser(net, self.o, self.schedule, autocast)


class EDMObjective(Objective):
    """EDM training (Karras et al. 2022): ln sigma ~ N(P_mean, P_std^2) clamped to the schedule's levels, eps ~ N(0, I),
    lambda(sigma) |D - x_0|^2 with D the preconditioned network. Its checkpoint records objective.kind=edm, which is
    all that sampling needs to rebuild D."""

    def __init__(self, o: dict, schedule):
        check_edm(o)
        self.o, self.schedule = o, schedule
        self.sigma_data = float(o["sigma_data"])
        self.sigma_range = float(schedule.sigmas[0]), float(schedule.sigmas[-1])

    def loss(self, model, batch: Batch) -> torch.Tensor:
        o, (lo, hi) = self.o, self.sigma_range
        levels = edm_sigmas(
            batch.size,
            batch.gen,
            p_mean=o["p_mean"],
            p_std=o["p_std"],
            sigma_min=lo,
            sigma_max=hi,
            device=batch.gen.device,
        )
        sigma = batch.mine(levels)
        return edm_loss(model, batch.x0, self.schedule, sigma, batch.noise(), sigma_data=self.sigma_data, y=batch.y)

    def denoiser(self, net, autocast=None):
        return EDMDenoiser(net, self.schedule, self.sigma_data, autocast_dtype=autocast)


def frozen(net):
    return copy.deepcopy(net).eval().requires_grad_(False)


def saved_net(prefix: str, net) -> dict[str, torch.Tensor]:
    """An objective's own network (a teacher, a target) among its checkpoint tensors, its keys under `prefix.`."""
    return {f"{prefix}.{k}": v for k, v in net.state_dict().items()} if net is not None else {}


def saved_part(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What saved_net(prefix, ...) stored, its keys without the prefix; empty when nothing was."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


class ProgressiveObjective(Objective):
    """Progressive distillation: rounds of `steps` (trainer.steps) / rounds each; in round r the student of
    `rounds[r]` DDIM steps learns its teacher's two-step target. The first teacher is given (a network's denoiser,
    the mixture oracle); each later teacher is a frozen copy of the student's EMA (`ema`) at the end of the round
    before. At the end of a round on_round(its steps, its sampling record) saves its student, and the optimizer
    restarts, as a new distillation does."""

    def __init__(self, o: dict, schedule, teacher, dcfg: dict, *, steps: int, device, ema, on_round: Callable):
        self.o, self.schedule, self.teacher = o, schedule, teacher
        self.rounds = check_progressive(dcfg, steps)
        self.total, self.weighting = steps, dcfg["weighting"]
        # on the device once: the loss indexes it every step
        self.grid = pd.teacher_grid(schedule, dcfg["start_steps"], dcfg["spacing"]).to(device)
        self.per_round = steps // len(self.rounds)
        self.ema, self.on_round = ema, on_round
        self.teacher_net = None  # the frozen student that teaches rounds after the first

    def round(self, step: int) -> int:
        return min(step // self.per_round, len(self.rounds) - 1)

    def steps(self, step: int) -> int:
        """The student's DDIM steps in the round of `step`."""
        return self.rounds[self.round(step)]

    def loss(self, model, batch: Batch) -> torch.Tensor:
        n = self.steps(batch.step)
        index = batch.integers(n)
        noise = batch.noise()
        return pd.progressive_loss(
            model,
            self.o["prediction"],
            self.teacher,
            batch.x0,
            self.schedule,
            self.grid,
            n,
            index,
            noise,
            weighting=self.weighting,
            y=batch.y,
        )

    def after_step(self, step: int) -> bool:
        if step == self.total:  # the last round's student (also last.safetensors)
            self.on_round(self.rounds[-1], self.sampling(self.rounds[-1]))
            return False
        if step % self.per_round or step // self.per_round >= len(self.rounds):
            return False
        finished = self.rounds[step // self.per_round - 1]
        self.on_round(finished, self.sampling(finished))  # the student of `finished` steps, before it teaches
        self.teacher_net = frozen(self.ema)
        self.teacher = self.denoiser(self.teacher_net)
        return True

    def denoiser(self, net, autocast=None):
        return network_denoiser(net, self.o, self.schedule, autocast)

    def grid_steps(self, step: int) -> int:
        return self.steps(step)

    def status(self, step: int) -> Status:
        r, n = self.round(step) + 1, self.steps(step)
        fields = {"round": r, "rounds": len(self.rounds), "student_steps": n}
        return Status(fields, f"round {r}/{len(self.rounds)}, {n}-step student")

    def sampling(self, steps: int) -> dict:
        """What the student's checkpoint records: DDIM over its own levels (explicit, as spacings other than
        trailing could not rebuild them from the step count)."""
        levels = pd.student_levels(self.grid, steps)
        return {
            "sampler": "ddim",
            "steps": steps,
            "timesteps": [int(v) if not levels.is_floating_point() else float(v) for v in levels],
        }

    def tensors(self):
        return saved_net("teacher", self.teacher_net)

    def load(self, tensors, state):
        teacher = saved_part("teacher", tensors)
        if teacher:
            self.teacher_net = frozen(self.ema)
            self.teacher_net.load_state_dict(teacher)
            self.teacher = self.denoiser(self.teacher_net)

    def config(self, step: int) -> dict:
        return {"sampling": self.sampling(self.steps(step))}


class ConsistencyObjective(Objective):
    """Consistency distillation (a teacher), training (none) or tuning (method ect, continuous levels drawing
    closer). The student (`net`) is a consistency model (diffusion.consistency.consistency_fn); the target network
    is the student's EMA at rate objective.target_decay (0: the student itself without gradient, as iCT), kept in the
    checkpoint. Pairs of levels sigma_lo < sigma_hi: Karras's rho = 7 grid of N(k) levels (CD: Song et al.'s
    sqrt-growing N(k) and uniform pairs; CT: iCT's doubling N(k) and log-normal pairs), or for ect a log-normal
    sigma_hi and sigma_lo = sigma_hi (1 - delta), delta halving every tenth of the run (`steps`, trainer.steps).
    `seed` (trainer.seed) seeds iCT's pair draws."""

    def __init__(self, o: dict, schedule, *, net, steps: int, seed: int, device, teacher=None, method=None):
        self.o, self.schedule = o, schedule
        self.method = method or ("cd" if teacher is not None else "ct")
        self.teacher = teacher
        check_consistency(o, self.method)
        self.total, self.seed, self.device = steps, seed, device
        self.target_decay, self.sigma_data = o["target_decay"], o["sigma_data"]
        self.net = net
        self.target_net = frozen(net) if self.target_decay > 0 else None
        self._levels: dict = {}

    def denoiser(self, net, autocast=None):
        return cm.ConsistencyDenoiser(
            net, self.o["prediction"], self.schedule, self.sigma_data, autocast_dtype=autocast
        )

    def grid_steps(self, step: int) -> int:
        return 1

    def delta(self, step: int) -> float:
        """ECT's gap between the two levels, relative to sigma_hi, at `step`."""
        return self.o["ect_delta"] / 2 ** math.floor(10 * step / max(self.total, 1))

    def status(self, step: int) -> Status:
        if self.method == "ect":
            delta = self.delta(step)
            return Status({"ect_delta": delta}, f"delta {delta:.3g}")
        n = len(self.levels(step)[0])
        return Status({"levels": n}, f"N {n}")

    def levels(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, t) of the N(k) levels at `step`, on the device (computed once per N)."""
        o = self.o
        curriculum = cm.ict_levels if o["curriculum"] == "ict" else cm.cd_levels
        n = curriculum(step, self.total, o["levels_start"], o["levels_end"])
        if n not in self._levels:
            sig = cm.karras_levels(self.schedule, n)
            self._levels = {n: (sig.to(self.device), self.schedule.t_from_sigma(sig).to(self.device))}
        return self._levels[n]

    def pair(self, batch: Batch):
        """(sigma_lo, t_lo, sigma_hi, t_hi, weight) for the global batch, this rank's rows."""
        o, schedule = self.o, self.schedule
        if self.method == "ect":
            s_min, s_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
            n = batch.normal(dtype=torch.float64)
            s_hi = (o["p_mean"] + o["p_std"] * n).exp().clamp(s_min * 1.001, s_max)
            s_lo = (s_hi * (1 - self.delta(batch.step))).clamp(min=s_min)
            t_hi, t_lo = cm.t_of_sigma(schedule, s_hi), cm.t_of_sigma(schedule, s_lo)
            return s_lo, t_lo, s_hi, t_hi, 1 / (s_hi - s_lo)
        sig, ts = self.levels(batch.step)
        if o["curriculum"] == "ict":
            # multinomial draws on the CPU: a generator seeded by (seed, step) keeps them the same on every device.
            g = torch.Generator().manual_seed(sample_seed(self.seed + 3, batch.step))
            idx = batch.mine(cm.lognormal_indices(sig.cpu(), batch.size, g, o["p_mean"], o["p_std"]))
            weight = 1 / (sig[idx + 1] - sig[idx])
        else:
            idx = batch.integers(len(sig) - 1)
            weight = torch.ones_like(sig[idx])
        return sig[idx], ts[idx], sig[idx + 1], ts[idx + 1], weight

    def f(self, net, x_t: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        return cm.consistency_fn(net, self.o["prediction"], self.schedule, x_t, t, y, sigma_data=self.sigma_data)

    def loss(self, model, batch: Batch) -> torch.Tensor:
        x0, y = batch.x0, batch.y
        s_lo, t_lo, s_hi, t_hi, weight = self.pair(batch)
        z = batch.noise()

        def shaped(v):  # one value per example, in the examples' dtype
            return v.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))

        x_hi = x0 + shaped(s_hi) * z  # x~ = x_0 + sigma eps, and x_t = x~ / sqrt(1 + sigma^2)
        if self.teacher is not None:
            x_lo = cm.heun_step(self.teacher, x_hi, s_hi, s_lo, t_hi, t_lo, y)
        else:
            x_lo = x0 + shaped(s_lo) * z
        f = self.f(model, x_hi / shaped((1 + s_hi**2).sqrt()), t_hi, y)
        with torch.no_grad():
            target_net = self.target_net if self.target_net is not None else model
            f_target = self.f(target_net, x_lo / shaped((1 + s_lo**2).sqrt()), t_lo, y)
        return cm.pair_distance(f, f_target, self.o["loss"]) * weight.to(torch.float32)

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        if self.target_net is not None:
            params = [p.detach() for p in self.net.parameters()]
            torch._foreach_lerp_(list(self.target_net.parameters()), params, 1 - self.target_decay)
        return False

    def tensors(self):
        return saved_net("target", self.target_net)

    def load(self, tensors, state):
        target = saved_part("target", tensors)
        if self.target_net is not None:
            if not target:
                raise UserError(
                    "cannot resume: the checkpoint holds no target network, which this consistency run keeps"
                )
            self.target_net.load_state_dict(target)

    def config(self, step: int) -> dict:
        return {"sampling": {"sampler": "consistency", "steps": 1}}
