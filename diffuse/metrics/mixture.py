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
        rows.append(
            {"component": k, "weight": p, "std": s, "n": nk, "freq_z": z, "mean_err": mean_err, "std_ratio": std_ratio}
        )
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
        rows.append(
            {
                "component": k,
                "weight": float(w[k]),
                "freq": nk / n,
                "n": nk,
                "mean_err": mean_err,
                "std_ratio": std_ratio,
            }
        )
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
    from diffuse.diffusion.bound import log_normal_interval

    lo = lo.to(torch.float64).cpu().flatten(1)[:, None, :]
    hi = hi.to(torch.float64).cpu().flatten(1)[:, None, :]
    mu = mixture.means.flatten(1)[None]
    s = mixture.stds[None, :, None]
    log_comp = log_normal_interval((lo - mu) / s, (hi - mu) / s).sum(2) + torch.log(mixture.weights)
    return -torch.logsumexp(log_comp, 1) / mixture.dim


def noisy_posterior(
    mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(x_0 | x_t) of one noisy image x_t = a x_0 + s eps (a^2 = alpha_bar, s^2 = 1 - alpha_bar): again a mixture,
    sum_k w_k N(m_k, v_k I), returned as (w (K,), m (K, D), v (K,)), float64. Per component (mean mu_k, isotropic
    std s_k, weight pi_k) the product of two Gaussians in x_0:
        w_k proportional to pi_k N(x_t; a mu_k, (a^2 s_k^2 + s^2) I)
        m_k = (a s_k^2 x_t + s^2 mu_k) / (a^2 s_k^2 + s^2)
        v_k = s_k^2 s^2 / (a^2 s_k^2 + s^2)
    What SDEdit from x_t draws when the reverse process samples the mixture exactly."""
    x = x_t.to(torch.float64).cpu().reshape(1, -1)
    a, s2 = math.sqrt(alpha_bar), 1.0 - alpha_bar
    w = torch.softmax(mixture.component_log_probs(x, s2, a)[0], 0)
    sk2 = mixture.stds**2
    denom = a**2 * sk2 + s2
    m = (a * sk2[:, None] * x + s2 * mixture.means.flatten(1)) / denom[:, None]
    return w, m, sk2 * s2 / denom


def posterior_fit(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, samples: torch.Tensor) -> list[dict]:
    """Samples against a mixture sum_k w_k N(m_k, v_k I) (noisy_posterior's), with no hard assignment (the
    components of a posterior may overlap): r_k(x), each sample's responsibility under that mixture, satisfies
    E[r_k] = w_k, E[r_k x] = w_k m_k and E[r_k |x - m_k|^2] = w_k D v_k exactly, so per component
        weight     mean of r_k (its standard error `weight_se` from the same samples)
        mean_err   RMS over dimensions of (r-weighted mean - m_k), in units of sqrt(v_k)
        std_ratio  RMS over dimensions of the r-weighted spread, divided by sqrt(v_k)
    and n_eff = (sum r_k)^2 / sum r_k^2, the samples' worth for component k."""
    x = samples.to(torch.float64).cpu().flatten(1)
    n, d = x.shape
    sq = (x**2).sum(1, keepdim=True) - 2 * x @ m.T + (m**2).sum(1)
    r = torch.softmax(torch.log(w) - 0.5 * sq / v - 0.5 * d * torch.log(v), dim=1)  # (n, K)
    rows = []
    for k in range(len(w)):
        rk = r[:, k]
        total = float(rk.sum())
        n_eff = total**2 / float((rk**2).sum()) if total > 0 else 0.0
        row = {
            "component": k,
            "exact_weight": float(w[k]),
            "weight": total / n,
            "weight_se": float(rk.std()) / math.sqrt(n),
            "n_eff": n_eff,
            "mean_err": float("nan"),
            "std_ratio": float("nan"),
        }
        if n_eff >= 2:
            mean = (rk[:, None] * x).sum(0) / total
            spread = ((rk[:, None] * (x - mean) ** 2).sum(0) / total).mean().sqrt()
            row["mean_err"] = float(((mean - m[k]) ** 2).mean().sqrt()) / math.sqrt(float(v[k]))
            row["std_ratio"] = float(spread) / math.sqrt(float(v[k]))
        rows.append(row)
    return rows


def sample_posterior(
    w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, n: int, generator: torch.Generator
) -> torch.Tensor:
    """n exact draws (n x D, float64) of the mixture sum_k w_k N(m_k, v_k I): the floor any sampler's fit is seen through."""
    k = torch.multinomial(w, n, replacement=True, generator=generator)
    return m[k] + v[k].sqrt()[:, None] * torch.randn((n, m.shape[1]), generator=generator, dtype=torch.float64)
