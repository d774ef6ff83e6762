"""Feature extractors for FID/KID/IS: uint8 images in, {"pool": N x D, "logits": N x K (optional)} out.

    inception    the TF-reference FID Inception-v3 (diffuse.metrics.inception): pool3 and the 1008 logits
    checkpoint   a diffuse-trained network's middle-layer activations, averaged over space (tokens for a DiT),
                 on the clean image at t = 0: features of the data's own domain for datasets far from
                 ImageNet (digits, medical, toy mixtures). Use a network trained on the reference data, and
                 not the model being scored, or the metric measures how much it likes its own samples.
    classifier   a diffuse train-classifier network's penultimate layer (its attention-pooled vector) at t = 0:
                 trained to tell the data's classes apart, as the Inception was ImageNet's.
    dinov2       DINOv2's class token (diffuse.metrics.dinov2, ViT-S/B/L/14): the feature space of FD_DINOv2.

Every extractor carries `name` and `sha256` (of its weights): reference statistics are only reused with the
same pair.
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.errors import UserError
from diffuse.validate import check_number

EXTRACTORS = ("inception", "dinov2", "checkpoint", "classifier")


class InceptionFeatures:
    name = "inception"

    def __init__(self, net: nn.Module, sha256: str, device: torch.device):
        self.net = net.to(device)
        self.sha256 = sha256
        self.dim = 2048
        self.has_logits = True
        self.device = device

    def check_shape(self, channels: int, resolution: int) -> None:
        if channels not in (1, 3):
            raise UserError(f"the Inception takes 1- or 3-channel images, these have {channels} channels")

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images.to(self.device))
        return {"pool": pool.float().cpu(), "logits": logits.float().cpu()}


class _Stop(Exception):
    """Raised by the feature hook: the layers after the middle one are not needed."""


class NetworkFeatures:
    """Activations of the middle of a diffusion network (the U-Net's last middle ResBlock, the DiT's middle
    block) at t = 0, global-average-pooled. Conditional networks get the null label."""

    name = "checkpoint"

    def __init__(self, net: nn.Module, sha256: str, device: torch.device, input_scale: float = 1.0):
        self.net = net.to(device).eval()
        self.sha256 = sha256
        self.device = device
        # What the network was trained to read at t = 0: an EDM-preconditioned one sees c_in x, not x.
        self.input_scale = input_scale
        layer = _middle_layer(net)
        self._out: torch.Tensor | None = None
        layer.register_forward_hook(self._hook)
        with torch.no_grad():
            probe = torch.zeros(1, net.in_channels, net.resolution, net.resolution, dtype=torch.uint8)
            self.dim = self(probe)["pool"].shape[1]
        self.has_logits = False

    def _hook(self, module, inputs, output):
        self._out = output
        raise _Stop

    def check_shape(self, channels: int, resolution: int) -> None:
        if (channels, resolution) != (self.net.in_channels, self.net.resolution):
            raise UserError(
                f"metrics.features=checkpoint: its network takes {self.net.in_channels}x{self.net.resolution}x{self.net.resolution} "
                f"images, these are {channels}x{resolution}x{resolution}"
            )

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images.to(self.device).float() / 127.5 - 1.0) * self.input_scale
        t = torch.zeros(x.shape[0], dtype=torch.long, device=self.device)
        with torch.no_grad():
            try:
                self.net(x, t, None)
            except _Stop:
                pass
        h = self._out.float()
        pooled = h.mean(dim=(2, 3)) if h.dim() == 4 else h.mean(dim=1)
        return {"pool": pooled.cpu()}


class ClassifierFeatures:
    """The penultimate layer of a noise-aware classifier (diffuse.nets.classifier) at t = 0."""

    name = "classifier"
    has_logits = False

    def __init__(self, net: nn.Module, sha256: str, device: torch.device):
        self.net = net.to(device).eval()
        self.sha256 = sha256
        self.device = device
        self.dim = net.feature_dim

    def check_shape(self, channels: int, resolution: int) -> None:
        if (channels, resolution) != (self.net.in_channels, self.net.resolution):
            raise UserError(
                f"metrics.features=classifier: the classifier takes {self.net.in_channels}x{self.net.resolution}x{self.net.resolution} "
                f"images, these are {channels}x{resolution}x{resolution}"
            )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.to(self.device).float() / 127.5 - 1.0
        t = torch.zeros(x.shape[0], dtype=torch.long, device=self.device)
        return {"pool": self.net.features(x, t).float().cpu()}


def _middle_layer(net: nn.Module) -> nn.Module:
    if hasattr(net, "mid"):
        return net.mid[-1]
    if hasattr(net, "blocks"):
        return net.blocks[len(net.blocks) // 2]
    raise UserError(f"metrics.features=checkpoint does not know where the middle of a {type(net).__name__} is")


def check_metrics_config(m: dict) -> dict:
    """The `metrics` group, checked before any image is drawn or read."""
    for key, minimum in (
        ("batch_size", 1),
        ("kid_subsets", 1),
        ("kid_subset_size", 2),
        ("kid_ref_max", 2),
        ("is_splits", 1),
        ("pr_k", 1),
        ("dc_k", 1),
        ("seeds", 1),
    ):
        check_number(f"metrics.{key}", m[key], minimum=minimum, integer=True)
    check_number("metrics.seed", m["seed"], integer=True)
    for key in ("inception_sha256", "dinov2_sha256"):
        sha = m[key]
        if sha not in (None, "") and (
            not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha)
        ):
            raise UserError(f"metrics.{key}={sha!r} is not allowed: 64 hex digits, or null to skip the check")
    from diffuse.metrics.dinov2 import ARCHS

    if m["dinov2_arch"] not in ARCHS:
        raise UserError(f"metrics.dinov2_arch={m['dinov2_arch']!r} is not allowed: choose one of {', '.join(ARCHS)}")
    return m


def build_extractor(m: dict, device: torch.device):
    """The extractor `metrics.features` names: the FID Inception (its weights found offline or downloaded), or a
    diffuse checkpoint's network (metrics.features_ckpt)."""
    name = m["features"]
    if name == "inception":
        from diffuse.metrics.inception import find_weights, load_inception

        path = find_weights(m["inception_weights"], download=m["download"])
        net, sha = load_inception(path, m["inception_sha256"])
        return InceptionFeatures(net, sha, device)
    if name == "dinov2":
        from diffuse.metrics.dinov2 import DINOv2Features, find_weights, load_dinov2

        path = find_weights(m["dinov2_arch"], m["dinov2_weights"], download=m["download"])
        net, sha = load_dinov2(path, m["dinov2_arch"], m["dinov2_sha256"])
        return DINOv2Features(net, sha, device)
    if name == "checkpoint":
        from diffuse.checkpoint import content_hash, load_checkpoint, resolve_ckpt_path
        from diffuse.pipeline.model import network_from_checkpoint

        if m["features_ckpt"] in (None, ""):
            raise UserError(
                "metrics.features=checkpoint needs metrics.features_ckpt=FILE|RUN_DIR: a diffuse checkpoint trained on the reference data"
            )
        path = resolve_ckpt_path(m["features_ckpt"], key="metrics.features_ckpt")
        ckpt = load_checkpoint(path)
        from diffuse.pipeline.classifier import is_classifier_config

        if is_classifier_config(ckpt.config):
            raise UserError(
                f"metrics.features_ckpt={m['features_ckpt']} is a classifier (diffuse train-classifier): use "
                "metrics.features=classifier"
            )
        tn = network_from_checkpoint(ckpt, where=str(path))
        scale = 1.0
        o = tn.config["objective"]  # complete: network_from_checkpoint's
        if o["kind"] == "edm":
            from diffuse.diffusion.prediction import edm_scalings

            sigma0 = tn.schedule.sigmas[:1]
            scale = float(edm_scalings(sigma0, float(o["sigma_data"]))[2][0])
        return NetworkFeatures(tn.net, content_hash(tn.net.state_dict()), device, input_scale=scale)
    if name == "classifier":
        from diffuse.checkpoint import content_hash
        from diffuse.pipeline.classifier import load_classifier_checkpoint

        if m["features_ckpt"] in (None, ""):
            raise UserError(
                "metrics.features=classifier needs metrics.features_ckpt=FILE|RUN_DIR: a diffuse train-classifier "
                "checkpoint trained on the reference data"
            )
        net = load_classifier_checkpoint(m["features_ckpt"], "metrics.features_ckpt").net
        return ClassifierFeatures(net, content_hash(net.state_dict()), device)
    raise UserError(f"metrics.features={name!r} is not allowed: choose one of {', '.join(EXTRACTORS)}")
