"""DiT, the diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers").

    x (B, C, H, W) -> patchify (a p x p, stride p conv) + fixed 2-D sin-cos positions -> N = (H/p)(W/p) tokens
    c = MLP(sinusoidal(t)) + label embedding(y)            (num_classes + 1 rows: the last is the null label)
    depth x DiT block with adaLN-Zero (section 3.2): from c, a zero-initialised linear regresses
        (shift, scale, gate) for the attention and for the MLP branch:
        x = x + gate_a * Attn(LN(x) * (1 + scale_a) + shift_a)
        x = x + gate_m * MLP (LN(x) * (1 + scale_m) + shift_m)
      the gates start at 0, so every block is the identity at initialisation
    final layer: adaLN-modulated LN, a zero-initialised linear to p*p*C per token -> unpatchify -> (B, C, H, W)

The network predicts one output of C channels (the objective's eps / x0 / v), not DiT's learned variance.
Sizes of the paper (table 1): S = hidden 384, depth 12, heads 6; B = 768, 12, 12; patch size 2 for "/2".
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.nets.layers import attention, timestep_embedding


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine position embedding: half the channels encode the row, half the
    column, each as [sin, cos] of the position times frequencies 1/10000^(i/(dim/4))."""
    if dim % 4:
        raise ValueError(f"hidden_size={dim} must be divisible by 4 for the 2-D position embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def enc(p):
        a = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.attention_impl = "sdpa"  # a runtime choice (diffuse.fastpath.set_attention)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, self.attention_impl)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (Peebles & Xie, figure 3, right)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(
        self,
        resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        freq_dim: int = 256,
    ):
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"resolution={resolution} is not divisible by patch_size={patch_size}")
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.freq_dim = freq_dim
        self.grid = resolution // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, self.grid)[None], persistent=False)
        self.t_embedder = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As the paper: Xavier-uniform linears (the patch conv seen as a linear), N(0, 0.02) embeddings, and
        zero for every adaLN modulation and the final linear (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for mod in [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation]:
            nn.init.zeros_(mod[-1].weight)
            nn.init.zeros_(mod[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(timestep_embedding(t, self.freq_dim))
        if self.y_embedder is not None:
            if y is None:  # unconditional use of a conditional network: the null label
                y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            c = c + self.y_embedder(y)
        return c

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, hidden) tokens with their positions."""
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        b, p, g, c = tokens.shape[0], self.patch_size, self.grid, self.out_channels
        x = tokens.reshape(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.embed(t, y)
        h = self.patchify(x)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


__all__ = ["DiT", "DiTBlock", "FinalLayer", "sincos_2d"]
