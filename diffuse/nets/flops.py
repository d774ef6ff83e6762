"""Analytic FLOP count of a network's forward pass: the multiply-adds of its convolutions, linear layers and
attention products, read off each layer's shapes by forward hooks (normalisations, activations and additions,
a few percent of the work, are not counted, as is the custom). One multiply-add is two FLOPs.

A training step costs about three forward passes (the backward pass computes the gradient with respect to
the input and to the weights, each as much work as the forward product).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffuse.nets.dit import Attention as DiTAttention
from diffuse.nets.layers import AttnBlock


def forward_flops(net: nn.Module, *inputs) -> int:
    """FLOPs of `net(*inputs)` for the batch in `inputs` (run once, without gradients)."""
    macs = 0

    def conv(m: nn.Conv2d, args, out):
        nonlocal macs
        macs += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear(m: nn.Linear, args, out):
        nonlocal macs
        macs += out.numel() * m.in_features

    def unet_attention(m: AttnBlock, args, out):
        # Its qkv and proj 1x1 convs run as matrix products (their forward hooks do not fire): 4 b n c^2; then
        # q k^T and (weights) v over the n = h*w pixels: 2 b n^2 c.
        nonlocal macs
        b, c, h, w = args[0].shape
        n = h * w
        macs += 4 * b * n * c * c + 2 * b * n * n * c

    def dit_attention(m: DiTAttention, args, out):  # the same over the n tokens of width d
        nonlocal macs
        b, n, d = args[0].shape
        macs += 2 * b * n * n * d

    hooks = []
    for m in net.modules():
        for kind, hook in (
            (nn.Conv2d, conv),
            (nn.Linear, linear),
            (AttnBlock, unet_attention),
            (DiTAttention, dit_attention),
        ):
            if isinstance(m, kind):
                hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return 2 * macs
