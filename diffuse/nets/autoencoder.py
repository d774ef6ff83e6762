"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and app. G).

    image (C x H x W) -> encoder -> (mean, log-variance) of q(z | x), z of latent_channels x H/f x W/f -> decoder

f = 2^(len(ch_mult) - 1). Each level of the encoder is num_res_blocks residual blocks at ch * ch_mult[i] channels,
then a stride-2 convolution (none after the last); the middle is block, self-attention, block; the decoder mirrors
it with one block more per level and nearest-neighbour upsampling. There is no time embedding: this network
never sees a noise level. The layout is the Stable Diffusion VAE's, so that diffusers' AutoencoderKL weights map
onto it one tensor per tensor (diffuse/interop/diffusers_vae.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.nets.layers import AttnBlock, Downsample, Upsample, group_norm

# Latent diffusion clamps the log-variance before it is exponentiated: exp(20) is already absurd as a variance, and
# an untrained encoder can emit anything.
LOGVAR_RANGE = (-30.0, 20.0)


class Block(nn.Module):
    """GroupNorm-SiLU-conv twice, with a skip (a 1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Middle(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool, dropout: float):
        super().__init__()
        self.block1 = Block(channels, channels, groups, dropout)
        self.attn = AttnBlock(channels, heads=1, groups=groups) if attention else nn.Identity()
        self.block2 = Block(channels, channels, groups, dropout)

    def forward(self, x):
        return self.block2(self.attn(self.block1(x)))


class Level(nn.Module):
    """The blocks of one resolution, then the resampler that leaves it (None at the innermost level)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(
        self,
        cin: int,
        widths: Sequence[int],
        num_res_blocks: int,
        zdim: int,
        groups: int,
        attention: bool,
        dropout: float,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
        levels, prev = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [Block(prev if j == 0 else w, w, groups, dropout) for j in range(num_res_blocks)]
            # Padding after the last row and column only, as the Stable Diffusion VAE does (its weights assume it).
            levels.append(Level(blocks, Downsample(w, pad="end") if i < len(widths) - 1 else None))
            prev = w
        self.levels = nn.ModuleList(levels)
        self.mid = Middle(widths[-1], groups, attention, dropout)
        self.norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], zdim, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(
        self,
        zdim: int,
        widths: Sequence[int],
        num_res_blocks: int,
        cout: int,
        groups: int,
        attention: bool,
        dropout: float,
    ):
        super().__init__()
        rev = list(reversed(widths))
        self.conv_in = nn.Conv2d(zdim, rev[0], 3, padding=1)
        self.mid = Middle(rev[0], groups, attention, dropout)
        levels, prev = [], rev[0]
        for i, w in enumerate(rev):
            blocks = [Block(prev if j == 0 else w, w, groups, dropout) for j in range(num_res_blocks + 1)]
            levels.append(Level(blocks, Upsample(w) if i < len(rev) - 1 else None))
            prev = w
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], cout, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """encode(x) -> (mean, logvar) of the diagonal Gaussian q(z | x); decode(z) -> x; forward(x, noise) -> the
    reconstruction of z = mean + exp(logvar / 2) noise (noise None: z = mean), mean and logvar.

    resolution is the training images' size: it fixes nothing in the weights (the network is convolutional and
    runs at any size divisible by its factor), but it is checked to be divisible and recorded with the data."""

    num_classes = None  # not a denoiser: read by the Trainer, which passes no labels then

    def __init__(
        self,
        resolution: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        latent_channels: int = 4,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        groups: int = 32,
        mid_attention: bool = True,
        quant_conv: bool = True,
        post_quant_conv: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.resolution, self.in_channels = resolution, in_channels
        self.out_channels = out_channels or in_channels
        self.latent_channels = latent_channels
        self.factor = 2 ** (len(ch_mult) - 1)
        widths = [ch * m for m in ch_mult]
        self.encoder = Encoder(in_channels, widths, num_res_blocks, 2 * latent_channels, groups, mid_attention, dropout)
        self.quant = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if quant_conv else nn.Identity()
        self.post_quant = nn.Conv2d(latent_channels, latent_channels, 1) if post_quant_conv else nn.Identity()
        self.decoder = Decoder(
            latent_channels, widths, num_res_blocks, self.out_channels, groups, mid_attention, dropout
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.quant(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant(z))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar


def patch_size_after(resolution: int, layers: int) -> int:
    """The side of the logit map PatchDiscriminator gives for a resolution x resolution image (4x4 kernels, padding
    1: each stride-2 conv halves the side, each of the two stride-1 ones takes one off)."""
    side = resolution
    for _ in range(layers):
        side = side // 2
    return side - 2


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017, as Esser et al. 2021 use it beside their autoencoder): `layers`
    stride-2 4x4 convs doubling the width (capped at 8 ch), one stride-1 conv, then a 1-channel conv whose every logit
    judges one receptive-field patch (70 px at layers=3) as real or reconstructed.

    GroupNorm where PatchGAN has BatchNorm: batch statistics would differ with the per-rank batch, so a run under
    torchrun would not be the run of one process, and running buffers would be one more state to keep exact."""

    def __init__(self, in_channels: int = 3, ch: int = 64, layers: int = 3, groups: int = 32):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ch
        for n in range(1, layers + 1):
            out = ch * min(2**n, 8)
            # no bias before a norm: the norm's shift replaces it
            mods += [
                nn.Conv2d(width, out, 4, stride=2 if n < layers else 1, padding=1, bias=False),
                group_norm(out, groups),
                nn.LeakyReLU(0.2),
            ]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
