"""A noise-aware classifier p(y | x_t, t) (Dhariwal & Nichol 2021, section 4.1): its training loss on
x_t = q_sample(x_0, t), and the gradient grad_x log p(y | x_t) that classifier guidance adds to the score.

    loss      cross-entropy of the classifier's logits at (x_t, t) against the label of x_0, t ~ U{0..T-1}
    grad      d/dx_t of log softmax(logits(x_t, t))[y], summed over the batch (each row depends on its own
              x_t only, so the sum's gradient is every sample's own)

Guidance itself (how the gradient moves the noise prediction) is in diffusion.guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffuse.diffusion.schedule import Schedule, q_sample


def classifier_loss(
    net, x0: torch.Tensor, y: torch.Tensor, schedule: Schedule, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample cross-entropy, per-sample correctness as float) of net(x_t, t) on x_t = q_sample(x0, t, noise)."""
    logits = net(q_sample(schedule, x0, t, noise), t).float()
    return F.cross_entropy(logits, y, reduction="none"), (logits.argmax(1) == y).float()


def log_prob_grad(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """grad_x log p(y | x_t) of a classifier given by its logits, by autograd (also inside torch.no_grad, where
    the samplers run), in float32 and returned in x_t's dtype."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        log_p = torch.log_softmax(logits_fn(x, t).float(), dim=1)
        picked = log_p.gather(1, y.long().view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(picked, x)
    return grad.to(x_t.dtype)
