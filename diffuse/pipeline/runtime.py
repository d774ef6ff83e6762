"""Where and how a network runs: the `runtime` config group (device, precision, fast paths) resolved once.

Every command reads the same keys; each uses the ones that apply to it (cuda_graphs to sampling, ema_foreach and
data_on_device to training). `auto` means on where it helps, which is CUDA: on the CPU every switch at auto is the
reference code path that the bit-identical resume tests pin down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from diffuse.errors import UserError
from diffuse.fastpath import check_attention, check_compile_mode, compile_network, set_attention, switch

# Sampling compiles by itself only when the run is long enough to repay the minute compiling takes: an FID-sized
# run is, a 64-image grid is not.
COMPILE_MIN_IMAGES = 1024


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast: torch.dtype | None  # None: float32
    channels_last: bool
    attention: str
    compile: bool
    compile_mode: str
    cuda_graphs: bool  # sampling: replay the compiled forward as a CUDA graph
    ema_foreach: bool  # training
    data_on_device: bool  # training

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_runtime(rcfg: dict, *, images: int | None = None) -> Runtime:
    """The runtime group's switches for this machine. `images`: how many images a sampling command draws (its
    compile=auto threshold); None for training, which compiles on CUDA at auto."""
    device = pick_device(rcfg["device"])
    cuda = device.type == "cuda"
    compiled = switch("runtime.compile", rcfg["compile"], cuda and (images is None or images >= COMPILE_MIN_IMAGES))
    return Runtime(
        device=device,
        autocast=autocast_dtype(rcfg["precision"], device),
        channels_last=switch("runtime.channels_last", rcfg["channels_last"], cuda),
        attention=check_attention("runtime.attention", rcfg["attention"]),
        compile=compiled,
        compile_mode=check_compile_mode("runtime.compile_mode", rcfg["compile_mode"]),
        cuda_graphs=switch("runtime.cuda_graphs", rcfg["cuda_graphs"], cuda and compiled) and compiled,
        ema_foreach=switch("runtime.ema_foreach", rcfg["ema_foreach"], True),
        data_on_device=switch("runtime.data_on_device", rcfg["data_on_device"], cuda),
    )


def pick_device(name) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"runtime.device={name!r} is not allowed: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"runtime.device={name!r} asked for, but no CUDA device is available: use runtime.device=cpu or auto"
        )
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"runtime.device={name!r} is not allowed: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun each rank owns GPU LOCAL_RANK: chosen here, before any network or tensor is placed, so
        # that nothing lands on GPU 0 of every rank.
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def autocast_dtype(precision, device: torch.device):
    """bf16 autocast on CUDA by default; the CPU runs float32 (its bf16 convs are slower, not faster)."""
    if precision in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    raise UserError(f"runtime.precision={precision!r} is not allowed: choose one of auto, fp32, bf16")


def inference_network(net: torch.nn.Module, rt: Runtime):
    """`net` on the runtime's device for inference, with its fast paths; returns what to call (maybe compiled).
    Under CUDA graphs the compiled forward is replayed at every step ("reduce-overhead")."""
    net = set_attention(net, rt.attention).to(rt.device).eval().requires_grad_(False)
    if rt.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if not rt.compile:
        return net
    return compile_network(net, "reduce-overhead" if rt.cuda_graphs else rt.compile_mode)
