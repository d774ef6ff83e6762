"""Training a super-resolution model (condition=lowres): each example's low-resolution image is its block mean,
noised at a level l ~ U[0, aug_max] drawn per example (Ho et al. 2021, section 4.2), and the network sees it through
diffusion.superres.LowResConditioned. The level and the augmentation noise come from the trainer's noise stream, for
the whole global batch, this rank's slice kept: a resume continues them exactly, whatever the world size."""

from __future__ import annotations

import torch

from diffuse.diffusion.superres import LowResConditioned, augment, downsample
from diffuse.errors import UserError
from diffuse.pipeline.condition import check_condition


def lowres_condition(cond: dict | None, model: dict, objective: dict, resolution: int) -> dict | None:
    """A training run's condition group, checked against its network and objective: None, or the checked keys."""
    checked = check_condition(cond, resolution)
    if checked is None:
        return None
    if model["arch"] != "unet":
        raise UserError(
            f"condition=lowres needs model.arch=unet (it embeds the augmentation level), not {model['arch']!r}"
        )
    if objective["mask_training"]:
        raise UserError("condition=lowres and objective.mask_training=true cannot be combined: choose one conditioning")
    if objective["kind"] not in ("diffusion", "edm"):
        raise UserError(
            f"condition=lowres needs objective.kind=diffusion or edm, not {objective['kind']!r}: a consistency "
            "model's target network is called without the low-resolution image"
        )
    if objective["learn_sigma"]:
        raise UserError(
            "condition=lowres with objective.learn_sigma=true is not supported: the variance channels would be "
            "read without the low-resolution image; train it with fixed variances"
        )
    return checked


def network_io(channels: int) -> dict:
    """What a super-resolution U-Net reads and makes: x_t and the upsampled low-resolution image (2C), C channels."""
    return {"in_channels": 2 * channels, "out_channels": channels, "aug_embedding": True}


class LowResTraining:
    def __init__(self, cond: dict):
        self.cond, self.factor = cond, cond["factor"]

    def wrap(self, model, batch) -> LowResConditioned:
        """`model` told each example's augmented low-resolution image (batch: training.objectives.Batch, whose noise
        stream draws the levels and the augmentation noise)."""
        low = downsample(batch.x0, self.factor)
        level = batch.uniform(torch.float64) * self.cond["aug_max"]
        noise = batch.normal(*low.shape[1:], dtype=batch.x0.dtype)
        return LowResConditioned(model, self.factor).with_lowres(augment(low, level, noise), level)

    def grid_model(self, net, images: torch.Tensor, seed: int) -> LowResConditioned:
        """`net` told the low-resolution images of `images` (the data's first ones) at condition.aug_level, with
        noise from `seed`: the same grid every time."""
        low = downsample(images, self.factor)
        noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(seed), dtype=low.dtype).to(low.device)
        level = torch.tensor(self.cond["aug_level"], dtype=torch.float64)
        return LowResConditioned(net, self.factor).with_lowres(augment(low, level, noise), level)
