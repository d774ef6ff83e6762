"""Few-step students against their teacher's own samplers at equal NFE, with the exact mixture oracle as the
teacher: progressive distillation (students of 4 and 2 DDIM steps) and consistency distillation (1 and 2 steps),
each trained here on the CPU by `diffuse distill`, then sampled from the same n x_T as the teacher's DDIM,
DPM-Solver++(2M) and iPNDM at the same NFE.

The mixture: four components over 1 x 8 x 8 (stds 0.05, 0.1, 0.15, 0.2), the linear schedule. Each cell:
max |freq z| / worst mean error (in stds) / worst |std ratio - 1| over the components (bench/sampler_table.py's
figures); the floor row is what n exact samples give.

    python -m bench.distill_table [--steps 15000] [--cd-steps 8000] [--n 4000] [--out outputs/bench_distill]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.commands import run_command
from bench.sampler_table import config_options, summary
from diffuse.data.gmm import default_mixture
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import SAMPLERS
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import sampler_timesteps
from diffuse.pipeline.model import load_model
from diffuse.pipeline.runtime import resolve_runtime

STUDENT = [
    "model=tiny",
    "model.attn_resolutions=[]",
    "dataset=gmm",
    "dataset.channels=1",
    "dataset.size=20000",
    "trainer.batch_size=128",
    "trainer.lr=1e-3",
    "trainer.warmup=100",
    "trainer.log_every=100",
    "trainer.sample_n=0",
    "trainer.ckpt_every=100000",
    "trainer.ema_decay=0.999",
    "runtime.device=cpu",
]


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return hydra_compose(config_name=name, overrides=overrides)


def distil(out: Path, overrides: list[str]) -> float:
    """Runs `diffuse distill` unless its run dir is already complete; the seconds it took (kept in
    bench_seconds.txt beside the run, so a rerun of the table reports them)."""
    record = out / "bench_seconds.txt"
    if not (out / "checkpoints" / "last.safetensors").is_file():
        t0 = time.time()
        run_command("distill", [*STUDENT, "teacher=oracle", *overrides], out)
        record.write_text(f"{time.time() - t0:.0f}\n")
    return float(record.read_text()) if record.is_file() else float("nan")


def sample_student(path: Path, x_T: torch.Tensor, sampler: str, steps: int) -> torch.Tensor:
    """The student as `diffuse sample ckpt=PATH sampler=NAME steps=N` draws it (its recorded levels included), in float."""
    from diffuse.pipeline.config import to_dict
    from diffuse.pipeline.job import prepare_sampling

    cfg = compose("sample", [f"ckpt={path}", f"sampler={sampler}", "runtime.device=cpu"])
    model = load_model(
        ckpt=path, model=None, dataset=None, schedule=None, use_ema=True, runtime=resolve_runtime(to_dict(cfg.runtime))
    )
    job = prepare_sampling(
        model, sampler=to_dict(cfg.sampler), steps=steps, guidance=None, label=None, labels=None, n=len(x_T), seed=1
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return torch.cat([job.plan(model.denoiser, xb.float(), generator=g).double() for xb in x_T.split(1000)])


def cell(figures) -> str:
    z, mean, std = figures
    if mean != mean:  # a component drew no sample at all: its mean and spread are undefined
        return f"{z:.2f} / a component missed"
    return f"{z:.2f} / {mean:.3f} / {std:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15000, help="training steps of progressive distillation, all rounds")
    ap.add_argument("--cd-steps", type=int, default=8000, help="training steps of consistency distillation")
    ap.add_argument("--start", type=int, default=64, help="the first teacher's DDIM steps (log-SNR levels)")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--out", default="outputs/bench_distill")
    args = ap.parse_args()
    out = Path(args.out)
    times = {
        "progressive": distil(
            out / "progressive",
            [
                "method=progressive",
                f"distill.start_steps={args.start}",
                "distill.target_steps=2",
                f"trainer.steps={args.steps}",
            ],
        ),
        "consistency": distil(out / "consistency", ["method=consistency", f"trainer.steps={args.cd_steps}"]),
    }
    mixture, schedule = default_mixture(channels=1, resolution=8), make_schedule("linear")
    den = GMMDenoiser(mixture, schedule)
    x_T = torch.randn((args.n, *mixture.shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = [
        (
            "floor: exact samples",
            {0: summary(mixture, mixture.sample(args.n, generator=torch.Generator().manual_seed(7))[0])},
        )
    ]
    for name, spacing in (("ddim", "trailing"), ("ddim", "logsnr"), ("dpm_solver", "logsnr"), ("ipndm", "logsnr")):
        r = {}
        for nfe in (1, 2, 4):
            x = SAMPLERS[name](den, x_T, sampler_timesteps(schedule, nfe, spacing), schedule, **config_options(name))
            r[nfe] = summary(mixture, x)
        rows.append((f"teacher (oracle), {name}, {spacing}", r))
    students = out / "progressive" / "checkpoints"
    rows.append(
        (
            "progressive student, DDIM",
            {
                n: summary(mixture, sample_student(students / f"student_{n}steps.safetensors", x_T, "ddim", n))
                for n in (4, 2)
            },
        )
    )
    cd = out / "consistency" / "checkpoints" / "last.safetensors"
    rows.append(
        (
            "consistency distillation, consistency sampler",
            {n: summary(mixture, sample_student(cd, x_T, "consistency", n)) for n in (1, 2)},
        )
    )
    print(
        f"n = {args.n}; CPU seconds to distil: progressive {times['progressive']:.0f} ({args.steps} steps, "
        f"{args.start} -> 2), consistency {times['consistency']:.0f} ({args.cd_steps} steps)"
    )
    print("\n| sampler | NFE 1 | NFE 2 | NFE 4 |\n| --- | --- | --- | --- |")
    for label, r in rows:
        cells = [cell(r[k]) if k in r else "" for k in (1, 2, 4)]
        if 0 in r:
            cells = [cell(r[0])] * 3
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
