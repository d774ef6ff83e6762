"""The U-Net of Ho et al. 2020 (appendix B): a PixelCNN++-style backbone with a sinusoidal time embedding,
GroupNorm residual blocks, self-attention at chosen resolutions, and an optional class embedding.

With ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), at 32x32 it is the 35.7M-parameter
CIFAR-10 network; with downsample_pad="end" (TensorFlow's SAME padding at stride 2, as the original code) it is
exactly the network of google/ddpm-cifar10-32 in diffusers, whose weights `diffuse convert` imports. The class
embedding has num_classes + 1 rows: the last is the "null" label that classifier-free guidance trains with and
samples against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.nets.layers import AttnBlock, Downsample, ResBlock, Upsample, group_norm, timestep_embedding


@dataclass(frozen=True)
class Blocks:
    """What every residual and attention block of one network shares."""

    temb_dim: int
    dropout: float
    groups: int
    heads: int
    norm_eps: float = 1e-6
    scale_shift: bool = False

    def res(self, cin: int, cout: int) -> ResBlock:
        return ResBlock(cin, cout, self.temb_dim, self.dropout, self.groups, self.norm_eps, self.scale_shift)

    def attn(self, channels: int) -> AttnBlock:
        return AttnBlock(channels, self.heads, self.groups, self.norm_eps)

    def middle(self, channels: int) -> nn.ModuleList:
        """The middle block: res, attention, res."""
        return nn.ModuleList([self.res(channels, channels), self.attn(channels), self.res(channels, channels)])


def encoder(
    ch: int, ch_mult, num_res_blocks: int, attn_resolutions, resolution: int, blocks: Blocks, downsample_pad: str
) -> tuple[nn.ModuleList, list[int], int]:
    """The U-Net's down path (shared with the noise-aware classifier, whose weights it therefore names alike): the
    blocks, the channels of every skip (conv_in's first), and the resolution it ends at."""
    down, chans = nn.ModuleList(), [ch]
    cur, res = ch, resolution
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            block = nn.ModuleList([blocks.res(cur, ch * mult)])
            cur = ch * mult
            if res in attn_resolutions:
                block.append(blocks.attn(cur))
            down.append(block)
            chans.append(cur)
        if level != len(ch_mult) - 1:
            down.append(nn.ModuleList([Downsample(cur, downsample_pad)]))
            chans.append(cur)
            res //= 2
    return down, chans, res


def decoder(
    ch: int, ch_mult, num_res_blocks: int, attn_resolutions, res: int, chans: list[int], blocks: Blocks
) -> tuple[nn.ModuleList, int]:
    """The up path: each level's res blocks (each taking a skip from `chans`, consumed from the end), attention at
    attn_resolutions, an upsample between levels; and the channels it ends with."""
    chans = list(chans)
    cur = chans[-1]
    up = nn.ModuleList()
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            block = nn.ModuleList([blocks.res(cur + chans.pop(), ch * mult)])
            cur = ch * mult
            if res in attn_resolutions:
                block.append(blocks.attn(cur))
            up.append(block)
        if level != 0:
            up.append(nn.ModuleList([Upsample(cur)]))
            res *= 2
    return up, cur


def embedding_mlp(ch: int, dim: int) -> nn.Sequential:
    """Sinusoidal features of width ch to the embedding width: Linear, SiLU, Linear."""
    return nn.Sequential(nn.Linear(ch, dim), nn.SiLU(), nn.Linear(dim, dim))


class UNet(nn.Module):
    def __init__(
        self,
        resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_classes: int | None = None,
        heads: int = 1,
        groups: int = 32,
        downsample_pad: str = "both",
        aug_embedding: bool = False,
        norm_eps: float = 1e-6,
        scale_shift: bool = False,
        time_embedding: str = "ddpm",
        time_scale: float = 1.0,
    ):
        super().__init__()
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.ch = ch
        # Nichol & Dhariwal's networks (diffuse convert --from improved-diffusion): GroupNorm eps 1e-5, scale-shift
        # norms, their [cos, sin] embedding, and t rescaled to 0..1000 when T differs (rescale_timesteps).
        self.time_embedding, self.time_scale = time_embedding, time_scale
        temb_dim = 4 * ch
        self.temb = embedding_mlp(ch, temb_dim)
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        # A super-resolution model's conditioning-augmentation level, embedded like t (Ho et al. 2021, section 4.2).
        self.aug_emb = embedding_mlp(ch, temb_dim) if aug_embedding else None

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        blocks = Blocks(temb_dim, dropout, groups, heads, norm_eps, scale_shift)
        self.down, chans, res = encoder(
            ch, ch_mult, num_res_blocks, attn_resolutions, resolution, blocks, downsample_pad
        )
        self.mid = blocks.middle(chans[-1])
        self.up, cur = decoder(ch, ch_mult, num_res_blocks, attn_resolutions, res, chans, blocks)
        self.norm_out = group_norm(cur, groups, norm_eps)
        self.conv_out = nn.Conv2d(cur, self.out_channels, 3, padding=1)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, aug: torch.Tensor | None = None) -> torch.Tensor:
        t = t if self.time_scale == 1.0 else t * self.time_scale
        emb = self.temb(timestep_embedding(t, self.ch, layout=self.time_embedding))
        if self.aug_emb is not None:
            if aug is None:
                raise ValueError("this U-Net embeds an augmentation level (aug_embedding=True): call it with aug=")
            emb = emb + self.aug_emb(timestep_embedding(aug, self.ch))
        if self.label_emb is not None:
            if y is None:  # unconditional use of a conditional network: the null label
                y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label_emb(y)
        return emb

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, aug: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.embed(t, y, aug)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = _run(block, h, emb)
            skips.append(h)
        h = _run(self.mid, h, emb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = _run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h
