"""The GPU fast paths, each one switch in the trainer or sample config.

    channels_last   NHWC activations and weights: cuDNN's fast layout for 3x3 convs under bf16 (auto: on CUDA)
    attention       sdpa (PyTorch's fused flash / memory-efficient kernels) or math (explicit softmax(QK^T)V)
    compile         torch.compile of the network; for sampling with cuda_graphs, mode "reduce-overhead", which
                    records the fixed-shape forward pass as a CUDA graph and replays it at every step
    (AdamW is fused on every device: its found_inf input skips non-finite steps on the device)
    ema_foreach     the EMA update as one torch._foreach_lerp_ over all parameters (trainer)
    data_on_device  the uint8 dataset held on the GPU, batches gathered there (trainer; auto: on CUDA)

"auto" means on where it helps: on CUDA, off on the CPU (where channels_last and fused kernels bring nothing,
and compiling costs more than a test run takes). None of them changes what is computed, only how; on the CPU
with everything at auto the code path is the reference one that the bit-identical resume tests pin down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffuse.errors import UserError
from diffuse.nets.layers import ATTENTION_IMPLS

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def switch(name: str, value: Any, auto: bool) -> bool:
    """A config switch: auto (-> `auto`), true or false; anything else is one clear line."""
    if value is None or value == "auto":
        return auto
    if isinstance(value, bool):
        return value
    raise UserError(f"{name}={value!r} is not allowed: choose auto, true or false")


def check_attention(name: str, value: Any) -> str:
    if value not in ATTENTION_IMPLS:
        raise UserError(f"{name}={value!r} is not allowed: choose one of {', '.join(ATTENTION_IMPLS)}")
    return value


def check_compile_mode(name: str, value: Any) -> str:
    if value not in COMPILE_MODES:
        raise UserError(f"{name}={value!r} is not allowed: choose one of {', '.join(COMPILE_MODES)}")
    return value


def set_attention(net: nn.Module, impl: str) -> nn.Module:
    for m in net.modules():
        if hasattr(m, "attention_impl"):
            m.attention_impl = impl
    return net


def uses_cuda_graphs(mode: str) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def compile_network(net: nn.Module, mode: str = "default") -> Callable:
    """torch.compile(net) for fixed shapes. Under CUDA graphs (reduce-overhead, max-autotune) a replay writes its
    output into the memory of the previous one, so each call is marked as a new step and its output copied out:
    samplers that keep the last denoised output (DPM-Solver, Heun) then see the values they stored."""
    compiled = torch.compile(net, mode=mode, dynamic=False)
    if not uses_cuda_graphs(mode):
        return compiled

    def run(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs).clone()

    return run
