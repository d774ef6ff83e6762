"""The Inception-v3 of the TensorFlow FID/IS reference (graph `inception-2015-12-05`), in plain torch.

FID numbers are only comparable when computed with this exact network, not torchvision's ImageNet Inception:
  - the input is uint8 RGB, resized to 299x299 by TensorFlow 1's bilinear resize (no antialiasing, no half-pixel
    offset: output pixel j samples input coordinate j * in / out), then mapped to [-1, 1) by (x - 128) / 128;
  - the average pools inside the 35x35, 17x17 and first 8x8 blocks ignore the zero padding (TF's SAME pooling);
  - the last 8x8 block pools its side branch with a max pool, not an average pool;
  - the classifier has 1008 outputs (1000 ImageNet classes and 8 unused ones).
FID and KID use the 2048-d global average pool ("pool3"); the Inception Score uses the logits without the
classifier's bias, as the reference IS code does (it multiplies pool3 by the softmax weights only).

Parameter names follow the published port of the TF graph (torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`, byte-identical to pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`),
so that file loads with strict=True. It is read with torch.load(weights_only=True) (no unpickling of code) or
from a .safetensors conversion.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.data.files import file_digest
from diffuse.errors import UserError

FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid publishes the same bytes under another name; either is found in the hub cache.
ALT_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth",)
URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + FILENAME
SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1 `resize_bilinear(align_corners=False)` of N x C x H x W floats to size x size.

    Output pixel j reads input coordinate j * (in / out) (float32, as TF computes it), interpolating between
    floor and floor + 1, the latter clamped to the last pixel. torch's interpolate(align_corners=False) uses
    (j + 0.5) * in / out - 0.5 instead, which shifts the image by a fraction of a pixel and changes FID."""

    def taps(n_in: int):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo.float()).to(x.dtype)

    ylo, yhi, wy = taps(x.shape[-2])
    xlo, xhi, wx = taps(x.shape[-1])
    top, bottom = x[..., ylo, :], x[..., yhi, :]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * wx
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * wx
    return top + (bottom - top) * wy[:, None]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W (C = 1 or 3) -> float32 N x 3 x 299 x 299 in the reference's input range."""
    if images.dtype != torch.uint8:
        raise TypeError(f"the FID Inception takes uint8 images, got {images.dtype}")
    x = images.float()
    if x.shape[1] == 1:  # grayscale: the same image in the three channels
        x = x.expand(-1, 3, -1, -1)
    x = resize_bilinear_tf1(x, SIZE)
    return (x - 128.0) / 128.0


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (TF's epsilon 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real pixels under the window, not by 9.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Mixed35(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_same(x)),
            ],
            1,
        )


class Reduce35(nn.Module):
    """35x35 -> 17x17: strided 3x3 | 1x1 -> 3x3 -> strided 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class Mixed17(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            dbl = conv(dbl)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                dbl,
                self.branch_pool(_avg_pool_same(x)),
            ],
            1,
        )


class Reduce17(nn.Module):
    """17x17 -> 8x8: 1x1 -> strided 3x3 | 1x1 -> 1x7 -> 7x1 -> strided 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class Mixed8(nn.Module):
    """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 outputs. `max_pool`: the TF graph's last
    block pools its side branch with a 3x3 max pool where torchvision's uses an average pool."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(s),
                self.branch3x3_2b(s),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """uint8 images -> (pool3 N x 2048, logits without bias N x 1008), in float32, always in eval mode."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Mixed35(192, 32)
        self.Mixed_5c = Mixed35(256, 64)
        self.Mixed_5d = Mixed35(288, 64)
        self.Mixed_6a = Reduce35(288)
        self.Mixed_6b = Mixed17(768, 128)
        self.Mixed_6c = Mixed17(768, 160)
        self.Mixed_6d = Mixed17(768, 160)
        self.Mixed_6e = Mixed17(768, 192)
        self.Mixed_7a = Reduce17(768)
        self.Mixed_7b = Mixed8(1280, max_pool=False)
        self.Mixed_7c = Mixed8(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)  # batch norm must use the published running statistics

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed N x 3 x 299 x 299 -> N x 2048."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), _no_tf32():
            pool = self.pool3(preprocess(images.to(self.fc.weight.device)))
            return pool, pool @ self.fc.weight.T


@contextlib.contextmanager
def _no_tf32():
    """TF32 convolutions (cuDNN's default on Ampere+) perturb the features at the 1e-3 level: keep float32."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def downloads_allowed(flag: bool = True) -> bool:
    """False when the config says so or DIFFUSE_OFFLINE is set (tests set it: they must never wait on a network)."""
    return bool(flag) and os.environ.get("DIFFUSE_OFFLINE", "").lower() not in ("1", "true", "yes")


def find_weights(path: str | None = None, *, download: bool = True, timeout: float = 20.0) -> Path:
    """The weights file: `path` if given, else the torch hub checkpoints cache, else downloaded into it."""
    if path not in (None, ""):
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise UserError(f"metrics.inception_weights={str(path)!r} does not exist")
        return p
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (FILENAME, *ALT_FILENAMES):
        if (cache / name).is_file():
            return cache / name
    target = cache / FILENAME
    if downloads_allowed(download):
        cache.mkdir(parents=True, exist_ok=True)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            # Writes a temporary file and renames it: an interrupted download leaves nothing behind.
            torch.hub.download_url_to_file(URL, str(target), progress=True)
            return target
        except Exception:  # offline, DNS, proxy, HTTP errors: all end in the message below
            pass
        finally:
            socket.setdefaulttimeout(old)
    raise UserError(
        f"the FID Inception weights {FILENAME} are not available offline: download {URL} and put it at {target} "
        f"(or pass metrics.inception_weights=PATH)"
    )


def load_inception(path: Path, sha256: str | None = SHA256) -> tuple[FIDInceptionV3, str]:
    """(network with the weights of `path` loaded strictly, the file's SHA-256). A file whose hash is not
    `sha256` is refused (sha256=None accepts any file: your own conversion of the TF graph)."""
    digest = file_digest(path, "sha256")
    if sha256 and digest != sha256.lower():
        raise UserError(
            f"{path}: SHA-256 {digest} is not that of the published FID Inception weights ({sha256}): "
            f"download it again from {URL}, or set metrics.inception_sha256=null to use this file anyway"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a readable weights file ({first})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: weights do not fit the FID Inception-v3: {detail}") from None
    return net, digest
