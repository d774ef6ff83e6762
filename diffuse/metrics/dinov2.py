"""DINOv2 ViT-S/14, ViT-B/14 and ViT-L/14 (Oquab et al. 2023) in plain torch: the feature space of FD_DINOv2
(Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"), who found it ranks generators the
way people do where the Inception does not.

The feature is the class token after the final LayerNorm (the official model's `x_norm_clstoken`, its output
with the identity head). Images go in as Stein et al.'s code feeds them: uint8 -> [0, 1], grayscale repeated to
three channels, resized to 224 x 224 by bicubic interpolation (antialiased, as torchvision's Resize of a tensor),
normalised by the ImageNet mean and std. The position embeddings, learned for a 37 x 37 grid (518 pixels), are
resized to the 16 x 16 grid of 224 pixels as the official code does: bicubic, with the scale factor
(16 + 0.1) / 37 (interpolate_offset = 0.1; 0 resizes to the grid size instead, as Hugging Face's port does).

Weights: safetensors only, never a pickle. The official checkpoints (dinov2_vit?14_pretrain.pth) are pickles; the
Hugging Face repositories facebook/dinov2-small, -base and -large publish the same weights as model.safetensors,
which loads here as it is (its tensor names are mapped; a file with the official names loads too). Put it at
torch.hub.get_dir()/checkpoints/dinov2_vits14.safetensors (vitb14, vitl14) or pass metrics.dinov2_weights=PATH;
its SHA-256 is checked against metrics.dinov2_sha256 when that is set, and always recorded with the features.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.data.files import file_digest
from diffuse.errors import UserError

# arch -> (embedding width, depth, heads, Hugging Face repository)
ARCHS = {
    "vits14": (384, 12, 6, "facebook/dinov2-small"),
    "vitb14": (768, 12, 12, "facebook/dinov2-base"),
    "vitl14": (1024, 24, 16, "facebook/dinov2-large"),
}
PATCH = 14
GRID = 37  # the position embeddings' grid: 518 / 14
SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def filename(arch: str) -> str:
    return f"dinov2_{arch}.safetensors"


def url(arch: str) -> str:
    return f"https://huggingface.co/{ARCHS[arch][3]}/resolve/main/model.safetensors"


def preprocess(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """uint8 N x C x H x W (C = 1 or 3) -> float32 N x 3 x size x size, normalised."""
    if images.dtype != torch.uint8:
        raise TypeError(f"the DINOv2 extractor takes uint8 images, got {images.dtype}")
    x = images.float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(MEAN, device=x.device)[:, None, None]
    std = torch.tensor(STD, device=x.device)[:, None, None]
    return (x - mean) / std


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the official model


class Block(nn.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """Preprocessed N x 3 x H x W (H, W multiples of the patch) -> the normalised class token, N x dim.
    Parameter names are the official model's, so its state dict (as safetensors) loads strictly."""

    def __init__(
        self, dim: int, depth: int, heads: int, *, patch: int = PATCH, grid: int = GRID, interpolate_offset: float = 0.1
    ):
        super().__init__()
        self.patch, self.grid, self.interpolate_offset = patch, grid, interpolate_offset
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dim = dim
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DINOv2:
        return super().train(False)

    def pos_embedding(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:].float()
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # The official model's way: a scale factor a little above out/in, so that the output size rounds down to
            # the grid wanted; interpolate then maps coordinates with that factor, not with out/in.
            scale = ((h + self.interpolate_offset) / self.grid, (w + self.interpolate_offset) / self.grid)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (h, w):
            raise ValueError(f"position grid {tuple(grid.shape[-2:])} for {h}x{w} patches")
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(cls.dtype)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embedding(h, w)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


# Hugging Face's names for the official ones (the hub's model.safetensors, and transformers 5's own names).
_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
}
_HF_QKV = (
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
)


def from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face Dinov2Model state dict under the official names (q, k, v stacked into qkv); the mask token,
    used only in training, is dropped."""
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    sd.pop("embeddings.mask_token", None)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(depth):
        pre = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            for qkv in _HF_QKV:
                if pre + f"{qkv[0]}.{part}" in sd:
                    out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([sd.pop(pre + f"{name}.{part}") for name in qkv])
                    break
        for theirs, ours in _HF_BLOCK.items():
            for part in ("",) if theirs.endswith("lambda1") else (".weight", ".bias"):
                key = pre + theirs + part
                if key in sd:
                    out[f"blocks.{i}.{ours}{part}"] = sd.pop(key)
    if sd:
        raise ValueError(f"tensors no DINOv2 backbone has: {sorted(sd)[0]} (and {len(sd) - 1} more)")
    return out


def build(state: dict[str, torch.Tensor], arch: str | None = None, interpolate_offset: float = 0.1) -> DINOv2:
    """The network whose weights are `state` (official or Hugging Face names), its size read from the tensors."""
    if "embeddings.cls_token" in state or "dinov2.embeddings.cls_token" in state:
        state = from_hf(state)
    state = {k: v for k, v in state.items() if k != "mask_token"}
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    patch = state["patch_embed.proj.weight"].shape[-1]
    heads = next((h for a, (d, n, h, _) in ARCHS.items() if d == dim and (arch in (None, a))), None)
    if heads is None:
        raise ValueError(f"a {dim}-wide backbone is not metrics.dinov2_arch={arch}")
    net = DINOv2(dim, depth, heads, patch=patch, grid=grid, interpolate_offset=interpolate_offset)
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return net


def find_weights(arch: str, path: str | None, *, download: bool = True) -> Path:
    """The weights file: `path`, else the torch hub checkpoints cache, else downloaded into it."""
    from diffuse.metrics.inception import downloads_allowed

    if path not in (None, ""):
        p = Path(str(path)).expanduser()
        if p.is_dir():
            raise UserError(f"metrics.dinov2_weights={str(path)!r} is a folder: give the .safetensors file")
        if not p.is_file():
            raise UserError(f"metrics.dinov2_weights={str(path)!r} does not exist")
        if p.suffix != ".safetensors":
            raise UserError(
                f"metrics.dinov2_weights={str(path)!r} is not allowed: a .safetensors file (pickled checkpoints are refused)"
            )
        return p
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename(arch)
    if target.is_file():
        return target
    if downloads_allowed(download):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url(arch), str(target), progress=True)
            return target
        except Exception:  # offline, DNS, proxy, HTTP errors: all end in the message below
            pass
    raise UserError(
        f"the DINOv2 {arch} weights are not available offline: download {url(arch)} and put it at {target} "
        "(or pass metrics.dinov2_weights=PATH)"
    )


def load_dinov2(path: Path, arch: str, sha256: str | None = None) -> tuple[DINOv2, str]:
    """(network, the file's SHA-256); a file whose hash is not `sha256` (when given) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    digest = file_digest(path, "sha256")
    if sha256 and digest != sha256.lower():
        raise UserError(
            f"{path}: SHA-256 {digest} is not metrics.dinov2_sha256={sha256}: download it again from {url(arch)}, "
            "or set metrics.dinov2_sha256=null to use this file anyway"
        )
    try:
        state = load_file(str(path))
        return build(state, arch), digest
    except (
        KeyError,
        ValueError,
        RuntimeError,
        OSError,
        SafetensorError,
    ) as e:  # SafetensorError: truncated, not safetensors
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{path}: not DINOv2 {arch} weights in safetensors ({first})") from None


class DINOv2Features:
    """The extractor of metrics.features=dinov2: 224 x 224 class tokens, in float32."""

    name = "dinov2"
    has_logits = False

    def __init__(self, net: DINOv2, sha256: str, device: torch.device, size: int = SIZE):
        self.net = net.to(device)
        self.sha256 = sha256
        self.device = device
        self.dim = net.dim
        self.size = size

    def check_shape(self, channels: int, resolution: int) -> None:
        if channels not in (1, 3):
            raise UserError(f"DINOv2 takes 1- or 3-channel images, these have {channels} channels")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = preprocess(images.to(self.device), self.size)
        return {"pool": self.net(x).float().cpu()}
