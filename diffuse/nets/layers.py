"""Building blocks shared by the networks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TIME_EMBEDDINGS = ("ddpm", "adm")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, layout: str = "ddpm") -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps. layout="ddpm", as in Ho et al.'s code: [sin, cos],
    frequencies exp(-log(max_period) * i / (half - 1)); "adm", as in Nichol & Dhariwal's (improved/guided
    diffusion): [cos, sin], frequencies exp(-log(max_period) * i / half)."""
    half = dim // 2
    denom = half if layout == "adm" else half - 1
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / denom)
    args = t.float()[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)] if layout == "adm" else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


ATTENTION_IMPLS = ("sdpa", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., n, d) tensors. "sdpa" lets PyTorch pick a fused kernel (flash or
    memory-efficient on CUDA); "math" spells it out, for comparison and for backends where the fused ones fail."""
    if impl == "sdpa":
        try:
            return F.scaled_dot_product_attention(q, k, v)
        except NotImplementedError:  # forward-mode AD (the likelihood's jvp) has no formula for the fused kernels
            pass
    w = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return w.to(v.dtype) @ v


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    # Narrow test networks have channel counts (e.g. 16 + 32 at a skip) that 32 does not divide.
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=eps)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, GroupNorm-SiLU-dropout-conv, with a skip.
    scale_shift: the embedding gives a scale and shift of the second norm's output instead of a bias added before
    it (Nichol & Dhariwal's use_scale_shift_norm, "AdaGN" in Dhariwal & Nichol 2021)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        temb_dim: int,
        dropout: float = 0.0,
        groups: int = 32,
        eps: float = 1e-6,
        scale_shift: bool = False,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(cin, groups, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, 2 * cout if scale_shift else cout)
        self.norm2 = group_norm(cout, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.temb_proj(F.silu(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the pixels of a feature map, through scaled_dot_product_attention."""

    def __init__(self, channels: int, heads: int = 1, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.attention_impl = "sdpa"  # a runtime choice (diffuse.fastpath.set_attention), not part of the weights
        self.norm = group_norm(channels, groups, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # The 1x1 convs run as matrix products over pixel tokens (b, hw, c): a GEMM rather than the CPU's slow
        # 1x1-conv path, and q, k, v come out with the head dimension contiguous, which the fused attention
        # kernels (flash, memory-efficient) require; strided ones would fall back to the unfused math.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = qkv.unflatten(-1, (3, self.heads, c // self.heads)).permute(2, 0, 3, 1, 4)  # (b, heads, hw, d)
        out = attention(q, k, v, self.attention_impl).transpose(1, 2).reshape(b, h * w, c)
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


DOWNSAMPLE_PADS = ("both", "end")


class Downsample(nn.Module):
    """A stride-2 3x3 conv. pad="both": one pixel on every side (PyTorch's usual padding=1). pad="end": one pixel
    after the last row and column only, which is what TensorFlow's SAME padding does at stride 2 on an even size:
    Ho et al.'s network was built that way, so its weights (and diffusers' downsample_padding=0) need it."""

    def __init__(self, channels: int, pad: str = "both"):
        super().__init__()
        if pad not in DOWNSAMPLE_PADS:
            raise ValueError(f"downsample_pad={pad!r} is not one of {', '.join(DOWNSAMPLE_PADS)}")
        self.pad = pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1 if pad == "both" else 0)

    def forward(self, x):
        if self.pad == "end":
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
