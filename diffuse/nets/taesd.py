"""The tiny autoencoder TAESD (Ollin Boer Bohan, madebyollin/taesd): a deterministic convolutional image <-> latent map
distilled from a latent-diffusion VAE, with no posterior, no normalisation and no attention.

    encoder: x in [-1, 1] -> (x + 1) / 2 -> conv -> blocks, then per further stage: stride-2 conv (no bias) -> blocks
             -> conv to latent_channels
    decoder: z -> 3 tanh(z / 3) -> conv -> act -> per stage: blocks -> upsample -> conv (no bias); the last stage's
             conv (with a bias) gives the image in [0, 1] -> 2 y - 1

Every block is conv-act-conv-act-conv plus its input, through a ReLU (whatever `act` is). The factor is
2^(stages - 1). Every stage has the same width: diffusers' AutoencoderTiny accepts a list of widths but only runs
when they are equal (each stage's first conv reads its own width), so one width per half is the honest setting.

The latents are the encoder's output moved to `(E(x) - shift_factor) * scaling_factor` (the convention of the
diffusers pipelines TAESD stands in for: 0 and 1 for madebyollin/taesd), and decode undoes exactly that. TAESD's
latent_magnitude / latent_shift only describe the 8-bit storage format of diffusers' forward (clamped to [0, 1],
rounded to 1/255): a latent model never stores its latents that way, so they are not part of this network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "mish": F.mish}
UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")
# TAESD's decoder squashes its input into (-3, 3) before anything else: the range its latents were trained to.
LATENT_CLAMP = 3.0


class TinyBlock(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return F.relu(h + x)


class EncoderStage(nn.Module):
    def __init__(self, width: int, blocks: int, act: str, downsample: bool):
        super().__init__()
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False) if downsample else None
        self.blocks = nn.ModuleList(TinyBlock(width, act) for _ in range(blocks))

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        for b in self.blocks:
            x = b(x)
        return x


class DecoderStage(nn.Module):
    """Blocks, then (all but the last stage) upsampling and a bias-free conv; the last stage's conv is the decoder's
    output layer and is kept outside."""

    def __init__(self, width: int, blocks: int, act: str, upsample: tuple[int, str] | None):
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(width, act) for _ in range(blocks))
        self.upsample = upsample
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False) if upsample is not None else None

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        if self.upsample is None:
            return x
        factor, mode = self.upsample
        return self.conv(F.interpolate(x, scale_factor=float(factor), mode=mode))


class TinyEncoder(nn.Module):
    def __init__(self, cin: int, width: int, blocks: Sequence[int], zdim: int, act: str):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, width, 3, padding=1)
        self.stages = nn.ModuleList(EncoderStage(width, n, act, downsample=i > 0) for i, n in enumerate(blocks))
        self.conv_out = nn.Conv2d(width, zdim, 3, padding=1)

    def forward(self, x):
        h = self.conv_in((x + 1) / 2)  # TAESD's images are in [0, 1]
        for s in self.stages:
            h = s(h)
        return self.conv_out(h)


class TinyDecoder(nn.Module):
    def __init__(self, zdim: int, width: int, blocks: Sequence[int], cout: int, act: str, factor: int, mode: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.conv_in = nn.Conv2d(zdim, width, 3, padding=1)
        last = len(blocks) - 1
        self.stages = nn.ModuleList(
            DecoderStage(width, n, act, None if i == last else (factor, mode)) for i, n in enumerate(blocks)
        )
        self.conv_out = nn.Conv2d(width, cout, 3, padding=1)

    def forward(self, z):
        h = self.act(self.conv_in(torch.tanh(z / LATENT_CLAMP) * LATENT_CLAMP))
        for s in self.stages:
            h = s(h)
        return self.conv_out(h) * 2 - 1


class TinyAutoencoder(nn.Module):
    """encode(x) -> latents (deterministic); decode(z) -> x; forward(x) -> decode(encode(x)).

    resolution is the training images' size: nothing in the weights depends on it (the network is convolutional),
    but it is checked to be divisible by the factor and recorded with the data."""

    num_classes = None  # not a denoiser
    deterministic = True  # encode gives the latents themselves, not a posterior (pipeline/latent.py reads this)

    def __init__(
        self,
        resolution: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        latent_channels: int = 4,
        encoder_width: int = 64,
        decoder_width: int = 64,
        encoder_blocks: Sequence[int] = (1, 3, 3, 3),
        decoder_blocks: Sequence[int] = (3, 3, 3, 1),
        act: str = "relu",
        upsample_mode: str = "nearest",
        upsample_factor: int = 2,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        self.resolution, self.in_channels = resolution, in_channels
        self.out_channels = out_channels or in_channels
        self.latent_channels = latent_channels
        self.factor = 2 ** (len(encoder_blocks) - 1)
        if upsample_factor ** (len(decoder_blocks) - 1) != self.factor:
            raise ValueError(
                f"the decoder upsamples by {upsample_factor}^{len(decoder_blocks) - 1}, the encoder "
                f"downsamples by {self.factor}"
            )
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)
        self.encoder = TinyEncoder(in_channels, encoder_width, encoder_blocks, latent_channels, act)
        self.decoder = TinyDecoder(
            latent_channels, decoder_width, decoder_blocks, self.out_channels, act, upsample_factor, upsample_mode
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.encoder(x) - self.shift_factor) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.scaling_factor + self.shift_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
