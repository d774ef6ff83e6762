"""The Trainer's objective for a noise-aware classifier (diffuse train-classifier): cross-entropy on
x_t = q_sample(x_0, t), t ~ U{0..T-1}, eps ~ N(0, I), drawn from the trainer's noise generator for the whole global
batch like the diffusion objectives; and the training accuracy of each log interval for metrics.jsonl."""

from __future__ import annotations

import torch

from diffuse import distributed
from diffuse.diffusion.classifier import classifier_loss
from diffuse.training.objectives import DiffusionObjective


class ClassifierObjective(DiffusionObjective):
    """The per-step accuracies of the open log interval are kept on the device (no host sync per step) and in the
    checkpoint, so that a resumed run logs the accuracies an uninterrupted one does, as the loop does for losses."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.accuracies: list[torch.Tensor] = []
        self._read: tuple[int, dict] | None = None  # (step, status) of the last read

    def loss(self, model, x0, y, bs, sl):
        tr = self.tr
        if self._closed():
            self.accuracies = []
        gdev = tr.noise_gen.device
        t = torch.randint(0, tr.schedule.T, (bs,), generator=tr.noise_gen, device=gdev)[sl].to(tr.device)
        noise = torch.randn((bs, *x0.shape[1:]), generator=tr.noise_gen, device=gdev, dtype=x0.dtype)[sl].to(tr.device)
        loss, correct = classifier_loss(model, x0, y, tr.schedule, t, noise)
        self.accuracies.append(correct.mean().detach())
        return loss

    def _closed(self) -> bool:
        """Whether the accuracies held were logged (status() is read at log steps only): the next step opens a new
        interval."""
        return self._read is not None and self._read[0] == self.tr.step

    def status(self) -> dict:
        """{"accuracy": the interval's mean training accuracy}, read at log steps: every rank reads it at the same
        one (MetricsLog.write), where the ranks' accuracies are averaged; later reads at that step reuse it."""
        tr = self.tr
        if self._read is not None and self._read[0] == tr.step:
            return self._read[1]
        out = {}
        if self.accuracies:
            out = {"accuracy": float(distributed.mean(torch.stack(self.accuracies).mean(), tr.dist))}
        self._read = (tr.step, out)
        return out

    def denoiser(self, net, autocast=None):
        raise RuntimeError("a classifier is not a denoiser: train-classifier draws no sample grids")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The open interval's accuracies (none at a log step, as the loop's own interval)."""
        if not self.accuracies or self._closed():
            return {}
        return {"interval_accuracy": torch.stack(self.accuracies).float()}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        acc = tensors.get("interval_accuracy")
        if acc is not None and (acc.dim() != 1 or not acc.is_floating_point()):
            from diffuse.errors import UserError

            raise UserError("cannot resume: the checkpoint's interval accuracies (aux.interval_accuracy) are malformed")
        self.accuracies = [v.to(self.tr.device) for v in acc] if acc is not None else []
        self._read = None
