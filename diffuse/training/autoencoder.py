"""The Trainer's objective for the KL autoencoder (diffuse train-ae): a reconstruction loss plus a small KL term
(Rombach et al. 2022, app. G), with z drawn from q(z | x) by the reparameterisation trick. The noise of z comes
from the trainer's noise generator for the whole global batch, so the run is the same whatever the world size and a
resume continues it exactly.

    loss = mean over pixels |x - D(z)|  (or squared)  +  kl_weight * KL(q(z | x) || N(0, I)) / pixels

Dividing the KL sum by the image's pixel count keeps latent diffusion's ratio: its recipe sums the reconstruction
over pixels and weights the KL sum by 1e-6, which is the same loss up to that constant factor.

With loss.disc_weight > 0 a patch discriminator P (nets.autoencoder.PatchDiscriminator) joins after loss.disc_start
steps (Esser et al. 2021): the autoencoder's loss gains disc_weight * -mean P(x_rec), the mean over P's patch
logits, and after each of its steps P takes one step of the hinge loss on the same batch,

    0.5 * (mean relu(1 - P(x)) + mean relu(1 + P(x_rec)))

The weight is fixed rather than Esser et al.'s adaptive one (the ratio of the reconstruction's and the adversarial
term's gradient norms at the decoder's last layer): those norms are of this rank's slice of the batch, so the
adaptive weight would make a run under torchrun another run than the same one in one process, which no loss here
allows. P has its own AdamW (betas 0.5, 0.9 as in Esser et al.) at the trainer's learning rate and warm-up; its
weights and moments go into the checkpoint (aux.disc.*, aux.disc_optim.*) so that a resume stays exact, and under
torchrun it is wrapped in DDP like the autoencoder.
"""

from __future__ import annotations

import torch

from diffuse.errors import UserError
from diffuse.nets.autoencoder import PatchDiscriminator, patch_size_after
from diffuse.training.config import learning_rate
from diffuse.training.objectives import Batch, Objective, Status, saved_net, saved_part
from diffuse.validate import check_choice, check_number

RECON = ("l1", "l2")


def check_ae_objective(o: dict, resolution: int | None = None) -> None:
    """loss.*; with the resolution, also that the discriminator's patches are not empty at it."""
    check_choice("loss.recon", o["recon"], RECON)
    check_number("loss.kl_weight", o["kl_weight"], minimum=0)
    check_number("loss.disc_weight", o["disc_weight"], minimum=0)
    check_number("loss.disc_start", o["disc_start"], minimum=0, integer=True)
    check_number("loss.disc_ch", o["disc_ch"], minimum=1, integer=True)
    check_number("loss.disc_layers", o["disc_layers"], minimum=1, integer=True)
    if resolution is not None and o["disc_weight"] > 0 and patch_size_after(resolution, o["disc_layers"]) < 1:
        deepest = max((n for n in range(1, 12) if patch_size_after(resolution, n) >= 1), default=None)
        allowed = f"at most {deepest}" if deepest else "none fits"
        raise UserError(
            f"loss.disc_layers={o['disc_layers']} is not allowed for {resolution}-pixel images: the "
            f"discriminator would leave no patch to judge ({allowed}; or a larger dataset.resolution)"
        )


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over each sample's latent, one value per sample."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def ae_loss(
    model, x0: torch.Tensor, noise: torch.Tensor, recon: str, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss, per-sample reconstruction error) of the autoencoder `model` on x0."""
    xr, mean, logvar = model(x0, noise)
    return recon_kl(xr, mean, logvar, x0, recon, kl_weight)


def recon_kl(xr, mean, logvar, x0: torch.Tensor, recon: str, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    diff = xr.float() - x0.float()
    err = (diff.abs() if recon == "l1" else diff.square()).flatten(1).mean(1)
    pixels = x0[0].numel()
    return err + kl_weight * kl_divergence(mean.float(), logvar.float()) / pixels, err.detach()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss on the logits of real and reconstructed patches."""
    return 0.5 * (torch.relu(1.0 - real.float()).mean() + torch.relu(1.0 + fake.float()).mean())


class AutoencoderObjective(Objective):
    """Reconstruction + KL (+ the adversarial term once the discriminator is on); the interval's reconstruction error
    is reported as `recon` in metrics.jsonl, and from loss.disc_start on the discriminator's hinge loss as `disc` and
    the autoencoder's adversarial term -mean P(x_rec) as `adv`. `net` is the autoencoder trained, on images of
    `channels` x `resolution`^2; the discriminator follows the trainer's config `t` (seed, lr, warmup), its `device`,
    ranks (`dist`) and autocast dtype."""

    def __init__(self, loss_cfg: dict, *, net, channels: int, resolution: int, t: dict, device, dist, autocast):
        check_ae_objective(loss_cfg, resolution)
        self.cfg = dict(loss_cfg)
        self.net, self.t, self.device, self.dist, self.autocast = net, t, device, dist, autocast
        self.errors: list[torch.Tensor] = []
        self.disc_losses: list[torch.Tensor] = []
        self.adv_losses: list[torch.Tensor] = []
        self.pending = None  # (x, x_rec detached) of the step just taken, for the discriminator's own step
        self.disc = None
        if float(self.cfg["disc_weight"]) > 0:
            self._build_discriminator(channels)

    def _build_discriminator(self, channels: int) -> None:
        # Its initial weights from a stream of their own: the global one (dropout) stays where a run without a
        # discriminator has it, and the run is that run until disc_start.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.t["seed"] + 3)
            self.disc = PatchDiscriminator(channels, int(self.cfg["disc_ch"]), int(self.cfg["disc_layers"]))
        self.disc = self.disc.to(self.device)
        self.disc_model = self.disc
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.disc_model = DistributedDataParallel(
                self.disc, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.disc_opt = torch.optim.AdamW(
            self.disc.parameters(), lr=self.t["lr"], betas=(0.5, 0.9), weight_decay=0.0, fused=True
        )

    def disc_on(self, step: int) -> bool:
        return self.disc is not None and step >= int(self.cfg["disc_start"])

    def loss(self, model, batch: Batch):
        x0, net = batch.x0, self.net
        noise = batch.normal(
            net.latent_channels, x0.shape[-2] // net.factor, x0.shape[-1] // net.factor, dtype=x0.dtype
        )
        if not self.disc_on(batch.step):
            loss, err = ae_loss(model, x0, noise, self.cfg["recon"], float(self.cfg["kl_weight"]))
            self.errors.append(err.mean())
            return loss
        xr, mean, logvar = model(x0, noise)
        loss, err = recon_kl(xr, mean, logvar, x0, self.cfg["recon"], float(self.cfg["kl_weight"]))
        # The bare discriminator, frozen: its gradients come from its own loss alone, and DDP's hooks on its
        # parameters fire only in its own step.
        self.disc.requires_grad_(False)
        adv = -self.disc(xr).float().flatten(1).mean(1)
        self.disc.requires_grad_(True)
        self.errors.append(err.mean())
        self.adv_losses.append(adv.detach().mean())
        self.pending = (x0.detach(), xr.detach())
        return loss + float(self.cfg["disc_weight"]) * adv

    def after_step(self, step: int) -> bool:
        if self.pending is None:
            return False
        x0, xr = self.pending
        self.pending = None
        for group in self.disc_opt.param_groups:
            group["lr"] = learning_rate(self.t, step - 1)  # the step just taken's
        self.disc.train()
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.disc_model(torch.cat([x0, xr]))
            d_loss = hinge_d_loss(logits[: len(x0)], logits[len(x0) :])
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        # As the trainer's own step: a non-finite gradient (all-reduced under DDP) leaves P and its moments alone.
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.disc.parameters() if p.grad is not None])
        self.disc_opt.found_inf = (~torch.isfinite(norm)).float()
        self.disc_opt.step()
        self.disc_losses.append(d_loss.detach())
        return False

    def status(self, step: int) -> Status:
        # Read once per log step; what is logged then starts a new interval.
        from diffuse import distributed

        out = {}
        for key, held in (("recon", self.errors), ("disc", self.disc_losses), ("adv", self.adv_losses)):
            if held:
                out[key] = float(distributed.mean(torch.stack(held).mean(), self.dist))
                held.clear()
        text = (
            f"recon {out['recon']:.4g}" + (f", disc {out['disc']:.3f}" if "disc" in out else "")
            if "recon" in out
            else ""
        )
        return Status(out, text)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The open interval's values (a run resumed inside an interval logs what an uninterrupted one does), and
        the discriminator's weights and AdamW moments."""
        out = {
            f"interval_{key}": torch.stack(held).float()
            for key, held in (("recon", self.errors), ("disc", self.disc_losses), ("adv", self.adv_losses))
            if held
        }
        if self.disc is not None:
            out.update(saved_net("disc", self.disc))
            for idx, pstate in self.disc_opt.state_dict()["state"].items():
                out.update(
                    {f"disc_optim.{idx}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in pstate.items()}
                )
        return out

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        held = {}
        for key in ("recon", "disc", "adv"):
            t = tensors.get(f"interval_{key}")
            if t is not None and (t.dim() != 1 or not t.is_floating_point()):
                raise UserError(f"cannot resume: the checkpoint's interval values (aux.interval_{key}) are malformed")
            held[key] = list(t.to(self.device).unbind()) if t is not None else []
        self.errors, self.disc_losses, self.adv_losses = held["recon"], held["disc"], held["adv"]
        if self.disc is None:
            return  # a discriminator the run had is dropped: loss.disc_weight=0 continues without it
        weights = saved_part("disc", tensors)
        if not weights:
            raise UserError(
                "cannot resume with loss.disc_weight > 0: the checkpoint holds no discriminator (it was "
                "trained with loss.disc_weight=0); resume with loss.disc_weight=0, or start a new run"
            )
        try:
            self.disc.load_state_dict(weights)
        except RuntimeError:
            raise UserError(
                "cannot resume: the checkpoint's discriminator does not fit loss.disc_ch / loss.disc_layers "
                "of this run; resume with the values it was trained with"
            ) from None
        moments: dict[int, dict] = {}
        for name, v in tensors.items():
            if name.startswith("disc_optim."):
                _, idx, key = name.split(".", 2)
                moments.setdefault(int(idx), {})[key] = v
        sd = self.disc_opt.state_dict()
        self.disc_opt.load_state_dict({"state": moments, "param_groups": sd["param_groups"]})

    def denoiser(self, net, autocast=None):
        raise UserError("an autoencoder is not a denoiser: it draws no sample grids")

    def config(self, step: int) -> dict:
        return {"ae_loss": self.cfg}


def autoencoder_objective(trainer, loss_cfg: dict) -> AutoencoderObjective:
    """The Trainer's make_objective for diffuse train-ae (with its loss group)."""
    return AutoencoderObjective(
        loss_cfg,
        net=trainer.net,
        channels=trainer.data.channels,
        resolution=trainer.data.resolution,
        t=trainer.tcfg,
        device=trainer.device,
        dist=trainer.dist,
        autocast=trainer.amp,
    )
