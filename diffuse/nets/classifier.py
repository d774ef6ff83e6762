"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, section 4 and appendix
C): the encoder half of the U-Net, with its time embedding, then attention pooling over the last feature map.

    x_t -> conv_in -> the U-Net's down path (ResBlocks, attention at attn_resolutions, stride-2 convs)
        -> its middle block (ResBlock, attention, ResBlock) -> GroupNorm, SiLU
        -> attention pooling: one query, the mean of the feature map, attends to it and to every position
           (learned position embeddings); the pooled vector is the penultimate layer (`features`)
        -> a linear layer to num_classes logits

No label embedding: the label is what it predicts. `features(x, t)` is what diffuse eval uses as a feature
extractor (metrics.features=classifier, at t = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.nets.layers import ResBlock, attention, group_norm, timestep_embedding
from diffuse.nets.unet import Blocks, embedding_mlp, encoder


class AttentionPool(nn.Module):
    """(B, C, H, W) -> (B, C): the map's mean, with the positions, as the one query of multi-head attention over
    [mean, positions]; learning where to look is what a mean pool cannot."""

    def __init__(self, channels: int, tokens: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.attention_impl = "sdpa"  # a runtime choice (diffuse.fastpath.set_attention), not part of the weights
        self.pos = nn.Parameter(torch.randn(tokens + 1, channels) / channels**0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c = h.shape[:2]
        tokens = h.flatten(2).transpose(1, 2)  # (b, hw, c)
        seq = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.pos.to(tokens.dtype)
        q, k, v = self.qkv(seq).unflatten(-1, (3, self.heads, c // self.heads)).permute(2, 0, 3, 1, 4)
        out = attention(q[:, :, :1].contiguous(), k, v, self.attention_impl)  # (b, heads, 1, d)
        return self.proj(out.transpose(1, 2).reshape(b, c))


class Classifier(nn.Module):
    def __init__(
        self,
        resolution: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        ch: int = 32,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        heads: int = 1,
        groups: int = 32,
        downsample_pad: str = "both",
    ):
        super().__init__()
        self.resolution = resolution
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.ch = ch
        temb_dim = 4 * ch
        self.temb = embedding_mlp(ch, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        blocks = Blocks(temb_dim, dropout, groups, heads)
        self.down, chans, res = encoder(
            ch, ch_mult, num_res_blocks, attn_resolutions, resolution, blocks, downsample_pad
        )
        cur = chans[-1]
        self.mid = blocks.middle(cur)
        self.norm_out = group_norm(cur, groups)
        self.pool = AttentionPool(cur, res * res, heads)
        self.head = nn.Linear(cur, num_classes)
        self.feature_dim = cur

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: the attention-pooled vector (B, feature_dim)."""
        emb = self.temb(timestep_embedding(t, self.ch))
        h = self.conv_in(x)
        for block in [*self.down, self.mid]:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.pool(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of p(y | x_t, t), (B, num_classes)."""
        return self.head(self.features(x, t))
