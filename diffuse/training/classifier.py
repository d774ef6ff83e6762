"""The Trainer's objective for a noise-aware classifier (diffuse train-classifier): cross-entropy on
x_t = q_sample(x_0, t), t ~ U{0..T-1}, eps ~ N(0, I), drawn from the trainer's noise generator for the whole global
batch like the diffusion objectives; and the training accuracy of each log interval for metrics.jsonl."""

from __future__ import annotations

import torch

from diffuse import distributed
from diffuse.diffusion.classifier import classifier_loss
from diffuse.training.objectives import Batch, Objective, Status


class ClassifierObjective(Objective):
    """The per-step accuracies of the open log interval are kept on the device (no host sync per step) and in the
    checkpoint, so that a resumed run logs the accuracies an uninterrupted one does, as the loop does for losses.
    `dist`: the ranks, over which the accuracies are averaged at a log step; `device`: the trainer's."""

    def __init__(self, schedule, dist, device):
        self.schedule, self.dist, self.device = schedule, dist, device
        self.accuracies: list[torch.Tensor] = []
        # The status of the last log step while no step has been taken since: its accuracies were logged.
        self._read: Status | None = None

    def loss(self, model, batch: Batch) -> torch.Tensor:
        if self._read is not None:  # the interval logged at the last read is closed: this step opens the next one
            self.accuracies, self._read = [], None
        t = batch.integers(self.schedule.T)
        loss, correct = classifier_loss(model, batch.x0, batch.y, self.schedule, t, batch.noise())
        self.accuracies.append(correct.mean().detach())
        return loss

    def status(self, step: int) -> Status:
        """{"accuracy": the interval's mean training accuracy}, read at log steps: every rank reads it at the same
        one (MetricsLog.write), where the ranks' accuracies are averaged; later reads at that step reuse it."""
        if self._read is None:
            fields = {}
            if self.accuracies:
                fields = {"accuracy": float(distributed.mean(torch.stack(self.accuracies).mean(), self.dist))}
            self._read = Status(fields, f"accuracy {fields['accuracy']:.3f}" if fields else "")
        return self._read

    def denoiser(self, net, autocast=None):
        raise RuntimeError("a classifier is not a denoiser: train-classifier draws no sample grids")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The open interval's accuracies (none at a log step, as the loop's own interval)."""
        if not self.accuracies or self._read is not None:
            return {}
        return {"interval_accuracy": torch.stack(self.accuracies).float()}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        acc = tensors.get("interval_accuracy")
        if acc is not None and (acc.dim() != 1 or not acc.is_floating_point()):
            from diffuse.errors import UserError

            raise UserError("cannot resume: the checkpoint's interval accuracies (aux.interval_accuracy) are malformed")
        self.accuracies = [v.to(self.device) for v in acc] if acc is not None else []
        self._read = None


def classifier_objective(trainer) -> ClassifierObjective:
    """The Trainer's make_objective for diffuse train-classifier."""
    return ClassifierObjective(trainer.schedule, trainer.dist, trainer.device)
