"""ddpm_cifar10 (Ho et al.'s CIFAR-10 U-Net, 35.7M parameters, 32x32) against diffusers' UNet2DModel of the same
configuration, in one process, on one device, at one batch size. A benchmark: it prints figures, it judges nothing.

    python -m bench.throughput --device cpu --batch 8
    python -m bench.throughput                      # CUDA if present: batch 256, compiled

Needs the `bench` extra (diffusers). Both networks hold the same weights: the diffusers model is built at random,
saved, and imported with `diffuse convert`'s code; their outputs are compared before timing.

train   images/s of full training steps: forward, loss, backward, gradient clipping, AdamW, EMA.
        Ours: diffuse's Trainer.train_step as `diffuse train model=ddpm_cifar10` runs it (the data batch drawn
        from a resident 32x32 dataset included). Diffusers: the loop of its train_unconditional example (add_noise,
        UNet2DModel, MSE, clip_grad_norm_, torch AdamW, EMAModel with foreach=True, its faster option).
sample  images/s of 50-step DDIM from noise. Ours: the pipeline's load_model + prepare_sampling + generate, as
        `diffuse sample sampler=ddim` runs them. Diffusers: DDIMPipeline's loop (DDIMScheduler.set_timesteps, UNet2DModel, scheduler.step).
Both run under the same autocast (bf16 on CUDA, float32 on the CPU) and with diffusers' default attention (SDPA).
Sampling batches of the two alternate. The first training step and the first sampling batch are timed apart (torch.compile, CUDA graph capture, cuDNN
warm-up) and reported as warm-up; the rates exclude them. TFLOP/s come from the analytic count of
diffuse.nets.flops (conv, linear and attention products; a training step counted as 3 forward passes).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffuse.interop.convert import convert_diffusers
from diffuse.nets.flops import forward_flops

REFERENCE = {  # google/ddpm-cifar10-32's unet/config.json
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def note(msg: str) -> None:  # progress on stderr: stdout ends with the table and its JSON line
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(step, *, warmup: int, reps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, seconds per call over `reps` calls after `warmup` more)."""
    first = clock(step, device)
    for _ in range(warmup):
        step()
    return first, clock(lambda: [step() for _ in range(reps)], device) / reps


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return hydra_compose(config_name=name, overrides=overrides)


def ours_train(args, device, amp_flag: str, tmp: Path):
    from diffuse.training.trainer import Trainer

    cfg = compose(
        "train",
        [
            "model=ddpm_cifar10",
            "dataset=shapes",
            "dataset.resolution=32",
            "dataset.size=2048",
            f"trainer.batch_size={args.batch}",
            f"runtime.device={device}",
            f"runtime.precision={amp_flag}",
            f"runtime.compile={args.compile}",
            "trainer.sample_n=0",
            "trainer.warmup=0",
            f"runtime.channels_last={args.channels_last}",
            f"runtime.attention={args.attention}",
        ],
    )
    trainer = Trainer(cfg, tmp / "train")
    first, per = measure(trainer.train_step, warmup=args.warmup, reps=args.steps, device=device)
    compiled = trainer.model is not trainer.net
    del trainer
    return first, per, compiled


def diffusers_train(args, device, amp, model_cls):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = model_cls(**REFERENCE).to(device).train()
    runner = torch.compile(model) if args.diffusers_compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, foreach=True)
    noise_sched = DDPMScheduler(**SCHEDULE)
    data = torch.rand(2048, 3, 32, 32, device=device) * 2 - 1
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        idx = torch.randint(0, len(data), (args.batch,), device=device, generator=g)
        x0 = data[idx]
        noise = torch.randn(x0.shape, device=device, generator=g)
        t = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
        x_t = noise_sched.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = runner(x_t, t, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.step(model.parameters())

    return measure(step, warmup=args.warmup, reps=args.steps, device=device)


def ours_sample(args, device, amp_flag: str, ckpt: Path):
    from omegaconf import OmegaConf

    from diffuse.pipeline.job import prepare_sampling
    from diffuse.pipeline.model import load_model
    from diffuse.pipeline.runtime import resolve_runtime

    cfg = OmegaConf.to_container(
        compose(
            "sample",
            [
                "sampler=ddim",
                f"runtime.device={device}",
                f"runtime.precision={amp_flag}",
                f"runtime.compile={args.compile}",
                f"runtime.cuda_graphs={args.cuda_graphs}",
                f"runtime.channels_last={args.channels_last}",
                f"runtime.attention={args.attention}",
            ],
        ),
        resolve=True,
    )
    rt = resolve_runtime(cfg["runtime"], images=args.batch)
    model = load_model(ckpt=ckpt, model=None, dataset=None, schedule=None, use_ema=True, runtime=rt)
    job = prepare_sampling(
        model,
        sampler=cfg["sampler"],
        steps=args.sample_steps,
        guidance=cfg["guidance"],
        label=None,
        labels=None,
        n=args.batch,
        seed=0,
    )

    def run():
        job.generate(
            list(range(args.batch)), device=device, batch_size=args.batch, progress=False, fixed_shape=rt.compile
        )

    return run


def diffusers_sample(args, device, amp, model):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SCHEDULE, clip_sample=True)
    runner = torch.compile(model) if args.diffusers_compile else model
    g = torch.Generator(device=device).manual_seed(0)

    @torch.no_grad()
    def run():
        sched.set_timesteps(args.sample_steps)
        x = torch.randn(args.batch, 3, 32, 32, device=device, generator=g)
        for t in sched.timesteps:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                eps = runner(x, t, return_dict=False)[0]
            x = sched.step(eps.float(), t, x, eta=0.0, return_dict=False)[0]
        x.float().cpu()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256 on CUDA, 8 on the CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 on CUDA, 3 on the CPU)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps after the first (default 5 on CUDA, 1 on the CPU)"
    )
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per image")
    p.add_argument(
        "--sample-reps", type=int, default=None, help="timed sampling batches (default 3 on CUDA, 1 on the CPU)"
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "true", "false"],
        help="torch.compile ours (auto: on CUDA; sampling then replays CUDA graphs)",
    )
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"], help="ours (auto: on CUDA)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "math"], help="ours")
    p.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=["auto", "true", "false"],
        help="ours, sampling (auto: when compiled on CUDA)",
    )
    p.add_argument("--diffusers-compile", action="store_true", help="also torch.compile diffusers' UNet2DModel")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA")
    args = p.parse_args()

    from diffusers import UNet2DModel

    from diffuse.checkpoint import load_checkpoint
    from diffuse.pipeline.model import network_from_checkpoint
    from diffuse.pipeline.runtime import autocast_dtype, pick_device

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (256 if cuda else 8)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.sample_reps = args.sample_reps or (3 if cuda else 1)
    if args.compile == "auto":
        args.compile = "true" if cuda else "false"
    amp = autocast_dtype(args.precision, device)
    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else (platform.processor() or platform.machine()) + f" ({torch.get_num_threads()} threads)"
    )

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        torch.manual_seed(0)
        theirs = UNet2DModel(**REFERENCE).eval()
        theirs.save_pretrained(tmp / "unet")
        ckpt = convert_diffusers(tmp / "unet", tmp / "ddpm_cifar10.safetensors")
        ours = network_from_checkpoint(load_checkpoint(ckpt)).net
        ours.eval()
        x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
        with torch.no_grad():
            diff = (ours(x, t) - theirs(x, t).sample).abs().max().item()
        flops = forward_flops(ours, x[:1], t[:1])
        params = sum(q.numel() for q in ours.parameters())
        del ours

        tr_first, tr_ours, compiled = ours_train(args, device, args.precision, tmp)
        note(f"train ours: first step {tr_first:.1f} s, then {tr_ours:.3f} s/step")
        d_first, tr_theirs = diffusers_train(args, device, amp, UNet2DModel)
        note(f"train diffusers: first step {d_first:.1f} s, then {tr_theirs:.3f} s/step")
        if cuda:
            torch.cuda.empty_cache()
        # Sampling batches are long: ours and diffusers' alternate, so that a drift in the machine's load or
        # clocks falls on both.
        run_ours = ours_sample(args, device, args.precision, ckpt)
        run_theirs = diffusers_sample(args, device, amp, theirs.to(device))
        s_first, ds_first = clock(run_ours, device), clock(run_theirs, device)
        s_times, ds_times = [], []
        for _ in range(args.sample_reps):
            s_times.append(clock(run_ours, device))
            ds_times.append(clock(run_theirs, device))
        s_ours, s_theirs = sum(s_times) / len(s_times), sum(ds_times) / len(ds_times)
        note(f"sample ours: first batch {s_first:.1f} s, then {', '.join(f'{v:.2f}' for v in s_times)} s")
        note(f"sample diffusers: first batch {ds_first:.1f} s, then {', '.join(f'{v:.2f}' for v in ds_times)} s")

    b = args.batch
    rows = {
        "train": (b / tr_ours, b / tr_theirs, 3 * flops),
        "sample": (b / s_ours, b / s_theirs, args.sample_steps * flops),
    }
    prec = {None: "fp32", torch.bfloat16: "bf16"}[amp]
    print(
        f"device: {name} [{device.type}], torch {torch.__version__}, batch {b}, precision {prec}, "
        f"ours compiled: {'yes' if compiled else 'no'} (channels_last {args.channels_last}, attention {args.attention}, "
        f"cuda_graphs {args.cuda_graphs}), diffusers compiled: {'yes' if args.diffusers_compile else 'no'}"
    )
    print(
        f"network: ddpm_cifar10 = google/ddpm-cifar10-32, {params / 1e6:.2f}M parameters, {flops / 1e9:.2f} GFLOP per image "
        f"forward (analytic), outputs equal to {diff:.1e}"
    )
    print(
        f"warm-up (first call, excluded): train ours {tr_first:.1f} s, diffusers {d_first:.1f} s; "
        f"sample ours {s_first:.1f} s, diffusers {ds_first:.1f} s"
    )
    print(
        f"{'':28s}{'ours img/s':>12s}{'diffusers img/s':>17s}{'ratio':>8s}{'ours TFLOP/s':>14s}{'diffusers TFLOP/s':>19s}"
    )
    labels = {"train": "train (fwd+bwd+AdamW+EMA)", "sample": f"sample (DDIM, {args.sample_steps} steps)"}
    for key, (o, d, f) in rows.items():
        print(f"{labels[key]:28s}{o:12.2f}{d:17.2f}{o / d:8.2f}{o * f / 1e12:14.3f}{d * f / 1e12:19.3f}")
    print(
        json.dumps(
            {
                "device": name,
                "device_type": device.type,
                "batch": b,
                "precision": prec,
                "compiled": compiled,
                "train_images_per_s": {"ours": round(rows["train"][0], 3), "diffusers": round(rows["train"][1], 3)},
                "sample_images_per_s": {"ours": round(rows["sample"][0], 3), "diffusers": round(rows["sample"][1], 3)},
                "train_ratio": round(rows["train"][0] / rows["train"][1], 3),
                "sample_ratio": round(rows["sample"][0] / rows["sample"][1], 3),
                "train_tflops": {
                    "ours": round(rows["train"][0] * rows["train"][2] / 1e12, 4),
                    "diffusers": round(rows["train"][1] * rows["train"][2] / 1e12, 4),
                },
                "sample_tflops": {
                    "ours": round(rows["sample"][0] * rows["sample"][2] / 1e12, 4),
                    "diffusers": round(rows["sample"][1] * rows["sample"][2] / 1e12, 4),
                },
                "warmup_s": {
                    "train_ours": round(tr_first, 2),
                    "train_diffusers": round(d_first, 2),
                    "sample_ours": round(s_first, 2),
                    "sample_diffusers": round(ds_first, 2),
                },
                "max_output_diff": diff,
                "gflop_per_image_forward": round(flops / 1e9, 3),
                "sample_steps": args.sample_steps,
            }
        )
    )


if __name__ == "__main__":
    main()
