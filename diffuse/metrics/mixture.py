"""How well samples reproduce a known Gaussian mixture: the ground-truth check for samplers.

Each sample is assigned to its most likely component; per component we report
    freq_z     (n_k / n - pi_k) / sqrt(pi_k (1 - pi_k) / n): the frequency's z-score against the weight
    mean_err   RMS over dimensions of (sample mean - mu_k), in units of s_k
    std_ratio  RMS over dimensions of the sample std, divided by s_k
"""

from __future__ import annotations

import math

import torch

from diffuse.data.gmm import GaussianMixture


def mixture_fit(mixture: GaussianMixture, x: torch.Tensor) -> list[dict]:
    x = x.to(torch.float64).cpu()
    lab = mixture.classify(x)
    n = x.shape[0]
    rows = []
    for k in range(mixture.K):
        sel = x[lab == k].flatten(1)
        nk = sel.shape[0]
        p = float(mixture.weights[k])
        s = float(mixture.stds[k])
        z = (nk / n - p) / math.sqrt(p * (1 - p) / n)
        if nk >= 2:
            mean = sel.mean(0)
            mean_err = float(((mean - mixture.means[k].flatten()) ** 2).mean().sqrt()) / s
            std_ratio = float(((sel - mean) ** 2).sum(0).div(nk - 1).mean().sqrt()) / s
        else:
            mean_err = std_ratio = float("nan")
        rows.append({"component": k, "weight": p, "std": s, "n": nk, "freq_z": z, "mean_err": mean_err, "std_ratio": std_ratio})
    return rows


def format_fit(rows: list[dict]) -> str:
    head = f"{'k':>2} {'std':>5} {'weight':>6} {'n':>6} {'freq z':>7} {'mean err':>9} {'std ratio':>9}"
    lines = [head] + [
        f"{r['component']:>2} {r['std']:>5.2f} {r['weight']:>6.2f} {r['n']:>6d} {r['freq_z']:>7.2f} {r['mean_err']:>9.3f} {r['std_ratio']:>9.3f}"
        for r in rows
    ]
    return "\n".join(lines)
