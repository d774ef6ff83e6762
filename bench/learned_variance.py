"""Learned reverse variances (Nichol & Dhariwal 2021) against fixed ones on Fashion-MNIST at one training budget.

Two networks, identical but for the loss: the fashion_mnist experiment's v-prediction on the tiny U-Net with the
trainer settings of bench/edm_fmnist.py (its `train_v` run is reused when present, so the fixed-variance model is
the one of the EDM table), and the same with objective.learn_sigma=true (L_hybrid, lambda = 0.001). For each:

    bits/dim   `diffuse eval --metric bpd` on the first n test images, the variational bound over all T terms
               (likelihood.methods=[vlb]): fixed with beta-tilde and with beta, learned with its own variances
    samples    50 (and any --sample-steps) respaced ancestral steps (sampler=ddpm): fixed beta, fixed beta-tilde,
               learned; scored by FID / KID against the 60k training images on a Fashion-MNIST classifier's
               features (metrics.features=classifier) and, where bench/edm_fmnist.py trained it, on its feature
               network (metrics.features=checkpoint: a diffusion U-Net's middle layer, which sees pixel noise that
               the classifier, trained on noised images, barely does)

Stages are skipped when their outputs exist; a stopped training resumes.

    OMP_NUM_THREADS=1 python -m bench.learned_variance [--steps 1500] [--batch 32] [--n 1000]
        [--bpd-n 100] [--sample-steps 50 20] [--out outputs/bench_edm_fmnist] [--classifier outputs/fmnist_classifier]
        [--markdown]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.edm_fmnist import DATA, diffuse, loop_seconds, score, train

RUNS = {
    "fixed": ["objective=simple", "objective.prediction=v"],
    "learned": ["objective=simple", "objective.prediction=v", "objective.learn_sigma=true"],
}
RUN_DIR = {"fixed": "train_v", "learned": "train_v_learned"}
BPD_VARIANCES = {"fixed": ["beta_tilde", "beta"], "learned": ["learned"]}
SAMPLE_VARIANCES = {"fixed": ["beta", "beta_tilde"], "learned": ["learned"]}


def bpd(run: Path, out: Path, variance: str, n: int) -> dict:
    if not (out / "metrics.json").is_file():
        diffuse(
            [
                "eval",
                "--metric",
                "bpd",
                f"ckpt={run}",
                *DATA,
                "dataset.split=test",
                f"likelihood.n={n}",
                "likelihood.methods=[vlb]",
                f"likelihood.variance={variance}",
                "runtime.device=cpu",
                f"hydra.run.dir={out}",
            ],
            out.parent / f"{out.name}.log",
        )
    return json.loads((out / "metrics.json").read_text())["metrics"]


def sample(run: Path, out: Path, variance: str, n: int, steps: int) -> dict:
    if not (out / "samples.npz").is_file():
        diffuse(
            [
                "sample",
                f"ckpt={run}",
                "sampler=ddpm",
                f"sampler.variance={variance}",
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
    return json.loads((out / "sample.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=1000, help="images sampled and scored per variance")
    ap.add_argument("--bpd-n", type=int, default=100, help="test images whose bound is computed")
    ap.add_argument("--sample-steps", type=int, nargs="+", default=[50])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_edm_fmnist"))
    ap.add_argument("--classifier", type=Path, default=Path("outputs/fmnist_classifier"))
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    extractors = {"classifier": ["metrics.features=classifier", f"metrics.features_ckpt={a.classifier}"]}
    if (a.out / "featnet").is_dir():
        extractors["featnet"] = ["metrics.features=checkpoint", f"metrics.features_ckpt={a.out / 'featnet'}"]
    rows = []
    for name, overrides in RUNS.items():
        run = a.out / RUN_DIR[name]
        print(f"train {name}", flush=True)
        train(run, overrides, a.steps, a.batch)
        loop, loss = loop_seconds(run, a.batch)
        for v in BPD_VARIANCES[name]:
            print(f"bpd {name} {v}", flush=True)
            rows.append(
                {
                    "model": name,
                    "kind": "bpd",
                    "variance": v,
                    "loop_s": loop,
                    "loss": loss,
                    **bpd(run, a.out / f"bpd_{name}_{v}", v, a.bpd_n),
                }
            )
        for steps in a.sample_steps:
            for v in SAMPLE_VARIANCES[name]:
                print(f"sample {name} {v} {steps} steps", flush=True)
                where = a.out / f"ddpm{steps}_{name}_{v}"
                s = sample(run, where, v, a.n, steps)
                for ex, feats in extractors.items():
                    suffix = "" if ex == "classifier" else f"_{ex}"
                    m = score(where, a.out / f"eval_ddpm{steps}_{name}_{v}{suffix}", feats, None)
                    rows.append(
                        {
                            "model": name,
                            "kind": "sample",
                            "steps": steps,
                            "features": ex,
                            "variance": v,
                            "nfe": s["nfe"],
                            **m,
                        }
                    )
    (a.out / "learned_variance.json").write_text(json.dumps({"rows": rows, "args": vars(a)}, default=str, indent=1))

    def cell(r):
        return f"{r['fid']:.2f} / {r['kid']:.2f} +- {r['kid_std']:.2f}" if r else "-"

    cols = [(st, ex) for st in a.sample_steps for ex in extractors]
    head = " | ".join(f"{st}-step ancestral, {ex} features: FID / KID" for st, ex in cols)
    lines = [
        f"| model (same network, data, steps) | variance | VLB bits/dim (n={a.bpd_n} test images) | {head} |",
        "| --- | --- | --- |" + " --- |" * len(cols),
    ]
    for name in RUNS:
        for v in dict.fromkeys(BPD_VARIANCES[name] + SAMPLE_VARIANCES[name]):
            b = next((r for r in rows if r["model"] == name and r["kind"] == "bpd" and r["variance"] == v), None)
            bcell = f"{b['bpd_vlb']:.3f} +- {b['bpd_vlb_sem']:.3f}" if b else "-"
            cells = [
                cell(
                    next(
                        (
                            r
                            for r in rows
                            if r["model"] == name
                            and r["kind"] == "sample"
                            and r["variance"] == v
                            and r["steps"] == st
                            and r["features"] == ex
                        ),
                        None,
                    )
                )
                for st, ex in cols
            ]
            lines.append(f"| {name} (`{' '.join(RUNS[name])}`) | {v} | {bcell} | " + " | ".join(cells) + " |")
    print("\n".join(lines) if a.markdown else json.dumps(rows, default=str, indent=1))


if __name__ == "__main__":
    main()
