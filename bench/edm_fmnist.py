"""EDM preconditioning against eps- and v-prediction on Fashion-MNIST (32x32, padded), at one training budget.

The same network (model=tiny, the 1.1M U-Net), schedule (the experiment's cosine), data, optimizer, batch and
number of steps for three objectives; only the loss differs:

    eps   objective=simple objective.prediction=eps       (Ho et al.'s L_simple)
    v     objective=simple objective.prediction=v         (Salimans & Ho)
    edm   objective=edm                                   (Karras et al.: preconditioned D, log-normal sigma, lambda)

Each is trained by `diffuse train` (one CPU thread: identical compute per step, so the comparison is by steps, not
by wall time, which the table records as well: the machine is shared), sampled by `diffuse sample` with one solver
at one NFE (DPM-Solver++(2M), 20 steps, seed 0), and scored by `diffuse eval --metric fid --metric kid` against the
60k training images:

    classifier  metrics.features=classifier metrics.features_ckpt=CLASSIFIER (a Fashion-MNIST classifier's
                features; scored only when that checkpoint exists)
    featnet     metrics.features=checkpoint on a fourth network trained here (x0-prediction, another seed: none of
                the three objectives), the fallback when there is no classifier yet

A floor row scores n real images of the test split the same way. Every stage is skipped when its output exists and
a training stopped part-way is resumed, so rerunning the script after the classifier appears only scores.

    OMP_NUM_THREADS=1 python -m bench.edm_fmnist [--steps 1500] [--batch 32] [--n 2000]
        [--out outputs/bench_edm_fmnist] [--classifier outputs/fmnist_classifier] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = ["dataset=fashion_mnist", "dataset.resolution=32", "dataset.fit=pad"]
RUNS = {
    "eps": ["objective=simple", "objective.prediction=eps"],
    "v": ["objective=simple", "objective.prediction=v"],
    "edm": ["objective=edm"],
}
FEATNET = ["objective=simple", "objective.prediction=x0", "trainer.seed=1"]


def trainer_args(steps: int, batch: int) -> list[str]:
    # A short run: a higher lr and shorter EMA than the experiment's 30k-step recipe, the same for every objective.
    return [
        "experiment=fashion_mnist",
        "model=tiny",
        *DATA,
        f"trainer.steps={steps}",
        f"trainer.batch_size={batch}",
        "trainer.lr=1e-3",
        "trainer.warmup=100",
        "trainer.ema_decay=0.999",
        "trainer.log_every=50",
        f"trainer.ckpt_every={max(steps // 6, 1)}",
        "trainer.sample_every=0",
        "runtime.device=cpu",
    ]


def diffuse(args: list[str], log: Path) -> float:
    """`python -m diffuse ARGS` on one thread, its output appended to `log`; the seconds it took."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("a") as f:
        f.write("$ diffuse " + " ".join(args) + "\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "diffuse", *args], env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"diffuse {' '.join(args)} failed ({r.returncode}); see {log}")
    return time.time() - t0


def last_step(run: Path) -> int:
    from diffuse.checkpoint import load_checkpoint

    path = run / "checkpoints" / "last.safetensors"
    return load_checkpoint(path).step if path.is_file() else 0


def train(run: Path, overrides: list[str], steps: int, batch: int) -> None:
    done = last_step(run)
    if done >= steps:
        return
    args = ["train", *trainer_args(steps, batch), *overrides, f"hydra.run.dir={run}"] + (
        ["resume=true"] if done else []
    )
    seconds = diffuse(args, run.parent / f"{run.name}.log")
    wall = run / "bench_wall.json"  # summed over resumed invocations
    before = json.loads(wall.read_text())["seconds"] if wall.is_file() else 0.0
    wall.write_text(json.dumps({"seconds": before + seconds}))


def loop_seconds(run: Path, batch: int) -> tuple[float, float]:
    """(seconds in the training loop, by metrics.jsonl's images/s, whatever resumes there were; the last loss)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds, prev = 0.0, 0
    for r in recs:
        seconds += (r["step"] - prev) * batch / r["images_per_s"]
        prev = r["step"]
    return seconds, recs[-1]["loss"]


def sample(run: Path, out: Path, n: int, sampler: str, steps: int) -> dict:
    if not (out / "samples.npz").is_file():
        seconds = diffuse(
            [
                "sample",
                f"ckpt={run}",
                f"sampler={sampler}",
                f"steps={steps}",
                f"n={n}",
                "batch_size=250",
                "save_npz=true",
                "save_images=false",
                "seed=0",
                "runtime.device=cpu",
                f"hydra.run.dir={out}",
            ],
            out.parent / f"{out.name}.log",
        )
        (out / "bench_wall.json").write_text(json.dumps({"seconds": seconds}))
    info = json.loads((out / "sample.json").read_text())
    return {"nfe": info.get("nfe"), "seconds": json.loads((out / "bench_wall.json").read_text())["seconds"]}


def real_images(out: Path, n: int) -> Path:
    """n images of the test split as an ADM-style npz: the floor of the metrics at this n."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    path = out / "test_split.npz"
    if not path.is_file():
        from hydra import compose, initialize_config_module

        from diffuse.data import build_dataset

        with initialize_config_module(config_module="diffuse.conf", version_base=None):
            cfg = compose(config_name="train", overrides=[*DATA, "dataset.split=test"])
        data = build_dataset(OmegaConf.to_container(cfg.dataset, resolve=True))
        x, _ = data.batch(torch.arange(n))
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out.mkdir(parents=True, exist_ok=True)
        np.savez(path, arr_0=arr)
    return path


def score(samples: Path, out: Path, features: list[str], ref: str | None) -> dict:
    if not (out / "metrics.json").is_file():
        diffuse(
            [
                "eval",
                "--metric",
                "fid",
                "--metric",
                "kid",
                f"samples={samples}",
                *DATA,
                *features,
                *([f"ref={ref}"] if ref else []),
                "runtime.device=cpu",
                f"hydra.run.dir={out}",
            ],
            out.parent / f"{out.name}.log",
        )
    return json.loads((out / "metrics.json").read_text())["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--featnet-steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=2000, help="images sampled and scored per objective")
    ap.add_argument("--sampler", default="dpm_solver")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_edm_fmnist"))
    ap.add_argument("--classifier", type=Path, default=Path("outputs/fmnist_classifier"))
    ap.add_argument("--no-featnet", action="store_true", help="score with the classifier only")
    ap.add_argument("--ref", default=None, help="eval's ref= (default: the 60k training images)")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    out = a.out
    for name, overrides in RUNS.items():
        print(f"train {name}", flush=True)
        train(out / f"train_{name}", overrides, a.steps, a.batch)
    extractors = {}
    if a.classifier.exists():
        extractors["classifier"] = ["metrics.features=classifier", f"metrics.features_ckpt={a.classifier}"]
    else:
        print(f"no classifier at {a.classifier}: its column waits for a rerun", flush=True)
    if not a.no_featnet:
        print("train featnet", flush=True)
        train(out / "featnet", FEATNET, a.featnet_steps, a.batch)
        extractors["featnet"] = ["metrics.features=checkpoint", f"metrics.features_ckpt={out / 'featnet'}"]
    rows = []
    floor = {"name": "floor: real test images", "scores": {}}
    for ex, feats in extractors.items():
        try:
            floor["scores"][ex] = score(real_images(out, a.n), out / f"eval_real_{ex}", feats, a.ref)
        except RuntimeError as e:
            print(f"warning: {e}", flush=True)
    for name in RUNS:
        run = out / f"train_{name}"
        print(f"sample {name}", flush=True)
        s = sample(run, out / f"sample_{name}", a.n, a.sampler, a.sample_steps)
        loop, loss = loop_seconds(run, a.batch)
        wall = (
            json.loads((run / "bench_wall.json").read_text())["seconds"]
            if (run / "bench_wall.json").is_file()
            else float("nan")
        )
        row = {"name": name, "args": RUNS[name], "loop_s": loop, "wall_s": wall, "loss": loss, **s, "scores": {}}
        for ex, feats in extractors.items():
            try:
                row["scores"][ex] = score(out / f"sample_{name}", out / f"eval_{name}_{ex}", feats, a.ref)
            except RuntimeError as e:  # e.g. an extractor this checkout does not have yet
                print(f"warning: {e}", flush=True)
        rows.append(row)
    (out / "table.json").write_text(json.dumps({"rows": rows, "floor": floor, "args": vars(a)}, default=str, indent=1))

    def cell(scores, ex):
        m = scores.get(ex)
        return f"{m['fid']:.2f} / {m['kid']:.2f} +- {m['kid_std']:.2f}" if m else "-"

    cols = ["classifier", "featnet"]
    head = (
        "| objective | steps x batch | train loop s (wall s) | sampling: NFE, s | FID / KID, classifier features "
        "| FID / KID, featnet (fallback) |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    lines.append(f"| {floor['name']} (n={a.n}) | | | | " + " | ".join(cell(floor["scores"], c) for c in cols) + " |")
    for r in rows:
        lines.append(
            f"| {r['name']} (`{' '.join(r['args'])}`) | {a.steps} x {a.batch} | {r['loop_s']:.0f} ({r['wall_s']:.0f}) "
            f"| {r['nfe']}, {r['seconds']:.0f} | " + " | ".join(cell(r["scores"], c) for c in cols) + " |"
        )
    print("\n".join(lines) if a.markdown else json.dumps(rows, default=str, indent=1))


if __name__ == "__main__":
    main()
