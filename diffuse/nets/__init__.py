"""Networks F(x, t, y), built from a config through an allow-list: a checkpoint's config is user input."""

from __future__ import annotations

import inspect

from torch import nn

from diffuse.errors import UserError
from diffuse.nets.dit import DiT
from diffuse.nets.unet import UNet

NETWORKS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}


def build_network(cfg: dict) -> nn.Module:
    """cfg: {'arch': name, **constructor arguments}. Unknown architectures and arguments are refused."""
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    if "_target_" in cfg:
        raise UserError(f"model._target_={cfg['_target_']!r} is refused: networks are chosen by model.arch from {', '.join(NETWORKS)}")
    if arch not in NETWORKS:
        raise UserError(f"model.arch={arch!r} is not allowed: choose one of {', '.join(sorted(NETWORKS))}")
    cls = NETWORKS[arch]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise UserError(f"model.{unknown[0]} is not an argument of {arch}: allowed are {', '.join(sorted(allowed))}")
    for key in ("ch_mult", "attn_resolutions"):
        if key in cfg and cfg[key] is not None:
            cfg[key] = tuple(cfg[key])
    try:
        return cls(**cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"model config is not valid for {arch}: {e}") from None
