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


def _known(mixture: GaussianMixture, keep: torch.Tensor) -> torch.Tensor:
    """A keep mask of one image (C x H x W, 1 x C x H x W or broadcastable) as a flat bool over the pixels."""
    k = keep.bool()
    while k.dim() > 3:
        k = k[0]
    return k.expand(mixture.shape).flatten()


def inpaint_posterior(mixture: GaussianMixture, x_known: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Posterior component weights of x_0 given its known pixels (keep = 1): the exact conditional of the
    missing pixels is sum_k w_k N(mu_k[missing], s_k^2 I), with
        w_k proportional to pi_k N(x[known]; mu_k[known], s_k^2 I)
    because each component's covariance is isotropic (known and missing pixels independent within it)."""
    sel = _known(mixture, keep)
    x = x_known.to(torch.float64).reshape(-1)[sel]
    mu = mixture.means.flatten(1)[:, sel]
    var = mixture.stds**2
    m = int(sel.sum())
    logw = torch.log(mixture.weights) - 0.5 * ((x - mu) ** 2).sum(1) / var - 0.5 * m * torch.log(2 * math.pi * var)
    return torch.softmax(logw, 0)


def inpaint_fit(mixture: GaussianMixture, completions: torch.Tensor, x_known: torch.Tensor, keep: torch.Tensor) -> dict:
    """Completions of one image against the exact conditional: each is assigned to its most likely component
    on the missing pixels; per component the frequency against the posterior weight, and the filled pixels'
    mean error (RMS, in units of s_k) and std ratio. `tv` is the total variation between the frequencies and
    the weights; `known_exact` whether every completion kept the known pixels exactly."""
    x = completions.to(torch.float64).cpu()
    miss = ~_known(mixture, keep)
    xm = x.flatten(1)[:, miss]
    mu = mixture.means.flatten(1)[:, miss]
    var = mixture.stds**2
    d = int(miss.sum())
    ll = -0.5 * ((xm**2).sum(1, keepdim=True) - 2 * xm @ mu.T + (mu**2).sum(1)) / var - 0.5 * d * torch.log(var)
    lab = ll.argmax(1)
    w = inpaint_posterior(mixture, x_known, keep)
    n = x.shape[0]
    rows = []
    for k in range(mixture.K):
        sel = xm[lab == k]
        nk, s = sel.shape[0], float(mixture.stds[k])
        if nk >= 2:
            mean = sel.mean(0)
            mean_err = float(((mean - mu[k]) ** 2).mean().sqrt()) / s
            std_ratio = float(sel.std(0).pow(2).mean().sqrt()) / s
        else:
            mean_err = std_ratio = float("nan")
        rows.append({"component": k, "weight": float(w[k]), "freq": nk / n, "n": nk, "mean_err": mean_err, "std_ratio": std_ratio})
    tv = 0.5 * sum(abs(r["freq"] - r["weight"]) for r in rows)
    known = _known(mixture, keep)
    exact = bool((x.flatten(1)[:, known] == x_known.to(torch.float64).reshape(-1)[known]).all())
    return {"rows": rows, "tv": tv, "known_exact": exact}


def format_inpaint_fit(fit: dict) -> str:
    head = f"{'k':>2} {'post w':>7} {'freq':>6} {'n':>6} {'mean err':>9} {'std ratio':>9}"
    lines = [head] + [
        f"{r['component']:>2} {r['weight']:>7.3f} {r['freq']:>6.3f} {r['n']:>6d} {r['mean_err']:>9.3f} {r['std_ratio']:>9.3f}"
        for r in fit["rows"]
    ]
    return "\n".join(lines + [f"TV(freq, posterior) = {fit['tv']:.3f}"])


def mixture_nll(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """The exact -log p(x) of each sample under the mixture, nats per dimension (float64, (N,))."""
    return -mixture.log_prob(x.to(torch.float64).cpu()) / mixture.dim


def mixture_interval_nll(mixture: GaussianMixture, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The exact -log P(lo <= x < hi) of a box per sample (lo, hi: N x C x H x W, +-inf allowed), nats per
    dimension: sum_k pi_k prod_i [Phi((hi_i - mu_ki)/s_k) - Phi((lo_i - mu_ki)/s_k)], since each component's
    covariance is isotropic. With the 8-bit bins it is the exact discrete nll of quantized mixture data."""
    from diffuse.metrics.likelihood import log_normal_interval

    lo = lo.to(torch.float64).cpu().flatten(1)[:, None, :]
    hi = hi.to(torch.float64).cpu().flatten(1)[:, None, :]
    mu = mixture.means.flatten(1)[None]
    s = mixture.stds[None, :, None]
    log_comp = log_normal_interval((lo - mu) / s, (hi - mu) / s).sum(2) + torch.log(mixture.weights)
    return -torch.logsumexp(log_comp, 1) / mixture.dim
