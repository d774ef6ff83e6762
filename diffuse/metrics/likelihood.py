"""Likelihood of data under a diffusion model, per example: the variational bound and the probability-flow ODE.

    vlb_nll / vlb_bpd   the discrete-time variational bound of Ho et al. 2020, eq. 5:
                            L = L_T + sum_{t>1} L_{t-1} + L_0
                        with the discretized Gaussian decoder of their section 3.3 for 8-bit data (bpd) or a
                        Gaussian decoder density for continuous data (nll). All T terms are summed exactly;
                        each is one denoiser call at a fresh x_t ~ q(x_t | x_0).
    ode_nll / ode_bpd   the probability-flow ODE of Song et al. 2021 (section 4.3 and appendix D.2): the
                        instantaneous change of variables along the deterministic path from the data to the
                        prior, with the Hutchinson trace estimator; 8-bit data is dequantized uniformly.

*_nll are nats per dimension of continuous data in the model's [-1, 1] units; *_bpd are bits per dimension of
8-bit data (x in [-1, 1] on the grid 2k/255 - 1, as images.from_uint8 makes it). Every function takes the one
denoiser interface `denoiser(x_t, t, y) -> eps` and a Schedule, and returns a (N,) float64 tensor on the CPU.
Randomness comes from `generator` (a torch.Generator, or a PerSample one: then example i's draws depend only on
(seed, i), whatever the batch); `progress(done, total)` is called after each chunk of timesteps or ODE step.

Timesteps follow schedule.py: index t = 0..T-1 is the paper's t+1, so the KL terms are at t = 1..T-1, the decoder
L_0 is the denoiser at t = 0, and the prior term L_T is at t = T-1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Optional

import torch

from diffuse.diffusion.bound import (
    discretized_log_likelihood,
    gaussian_kl,
    interpolate_log_variance,
    log_variance_bounds,
)
from diffuse.diffusion.noise import Generator, randn
from diffuse.diffusion.schedule import Schedule, coefficients, posterior, q_sample
from diffuse.errors import UserError

VARIANCES = ("beta_tilde", "beta")
PROBES = ("rademacher", "gaussian")
LN2 = math.log(2.0)
# Uniform dequantization puts 8-bit value k in [k, k+1)/256, i.e. [k/128 - 1, (k+1)/128 - 1) in [-1, 1] units:
# bins of width 2/256, so -log2 P(k) <= nll/ln 2 - log2(2/256) per dimension (Theis et al. 2016).
DEQUANT_OFFSET_BITS = math.log2(256 / 2)

Progress = Optional[Callable[[int, int], None]]


def _dim(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:])


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------------------------- 8-bit data


def grid_index(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit value k of each entry of x = 2k/255 - 1; x off that grid is refused."""
    k = ((x.detach().to(torch.float64) + 1) * 127.5).round()
    off = (x.detach().to(torch.float64) - (k / 127.5 - 1)).abs().max() if x.numel() else 0.0
    if x.numel() and (k.min() < 0 or k.max() > 255 or off > 1e-4):
        raise UserError(
            f"8-bit likelihood needs data on the grid 2k/255 - 1, k = 0..255 (range [-1, 1]); got values "
            f"in [{float(x.min()):.4g}, {float(x.max()):.4g}] up to {float(off):.2g} off the grid"
        )
    return k.long()


def uniform(shape, generator: Generator, device) -> torch.Tensor:
    """U(0, 1) in float64, drawn as Phi(z) of a normal through noise.randn so that a PerSample generator keeps
    example i's draws a function of (seed, i) alone."""
    return torch.special.ndtr(randn(shape, generator, device, torch.float64))


def dequantize(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Uniform dequantization of 8-bit data: z = (k + u) / 128 - 1, u ~ U(0, 1), in [-1, 1) (Song et al. 2021's
    convention: the value k spread over [k, k+1)/256 and mapped to [-1, 1])."""
    k = grid_index(x)
    u = uniform(x.shape, generator, x.device)
    return ((k.to(torch.float64) + u) / 128 - 1).to(x.dtype)


def bpd_from_dequantized_nll(nll: torch.Tensor) -> torch.Tensor:
    """Bits/dim of 8-bit data from the nll (nats/dim, [-1, 1] units) of its dequantized values."""
    return nll / LN2 + DEQUANT_OFFSET_BITS


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) per entry under N(mean, std^2), Ho et al. 2020 section 3.3: the bin of 2k/255 - 1 is
    [x - 1/255, x + 1/255], widened to -inf at k = 0 and +inf at k = 255, so the 256 bins cover the line.
    x off the 8-bit grid is refused."""
    grid_index(x)
    return discretized_log_likelihood(x, mean, std)


# ------------------------------------------------------------------------------------------ the variational bound


def prior_kl(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, nats; closed form, no denoiser."""
    ab = schedule.alpha_bar[-1]
    x = x0.to(torch.float64).flatten(1)
    return gaussian_kl(ab.sqrt() * x, 1 - ab, torch.zeros_like(x), torch.ones_like(x)).sum(1)


def reverse_variance(schedule: Schedule, t: torch.Tensor, variance: str) -> torch.Tensor:
    """sigma_t^2 of p(x_{t-1} | x_t), float64 (N,): beta-tilde_t or beta_t (Ho et al. section 3.2). At t = 0 (the
    decoder) both are beta-tilde_1, since beta-tilde_0 = 0; Ho et al.'s code does the same."""
    if variance not in VARIANCES:
        raise UserError(f"variance={variance!r} is not allowed: choose one of {', '.join(VARIANCES)}")
    t = t.cpu().long()
    # No reverse step leaves clean data, and a negative index would wrap round to the noisiest level.
    if bool((t < 0).any()):
        raise ValueError(f"reverse variance of p(x_(t-1) | x_t) needs timesteps t >= 0, got {int(t.min())}")
    table = schedule.posterior_variance if variance == "beta_tilde" else schedule.betas
    return torch.where(t == 0, schedule.posterior_variance[1], table[t])


def x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    a, s = coefficients(schedule, t, x_t)
    return (x_t - s * eps) / a


def _var_p(schedule: Schedule, t: torch.Tensor, variance: str, like: torch.Tensor, v_raw) -> torch.Tensor:
    """p(x_{t-1} | x_t)'s variance, broadcast against `like`: fixed, or the learned one of v_raw (bound.py)."""
    if variance == "learned":
        log_beta, log_beta_tilde = log_variance_bounds(schedule, t.to(like.device), like)
        return torch.exp(interpolate_log_variance(v_raw.to(like.dtype), log_beta, log_beta_tilde))
    return _bcast(reverse_variance(schedule, t, variance), like)


def kl_terms(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    variance: str = "beta_tilde",
    v_raw: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) per example in nats, for integer t >= 1, given the
    denoiser's eps at x_t; p's mean is the posterior mean at x0_hat (Ho et al. eq. 11), its variance sigma_t^2
    (variance="learned": the network's, from its v_raw at x_t)."""
    x0, x_t, eps = (v.to(torch.float64) for v in (x0, x_t, eps))
    mean_q, var_q = posterior(schedule, x0, x_t, t)
    mean_p, _ = posterior(schedule, x0_from_eps(eps, x_t, t, schedule), x_t, t)
    var_p = _var_p(schedule, t, variance, x0, v_raw)
    return gaussian_kl(mean_q, var_q, mean_p, var_p).flatten(1).sum(1)


def decoder_nll(
    x0: torch.Tensor,
    x_1: torch.Tensor,
    eps: torch.Tensor,
    schedule: Schedule,
    discretized: bool,
    v_raw: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_0 = -log p(x_0 | x_1) per example in nats, x_1 the sample at index 0: a Gaussian with the posterior mean
    at x0_hat (which at the first step is x0_hat itself) and variance beta-tilde_1 (or the learned one, given the
    network's v_raw); a density for continuous data, the discretized probability of the 8-bit bin for 8-bit data."""
    t = torch.zeros(x0.shape[0], dtype=torch.long)
    x0, x_1, eps = (v.to(torch.float64) for v in (x0, x_1, eps))
    mean, _ = posterior(schedule, x0_from_eps(eps, x_1, t, schedule), x_1, t)
    var = _var_p(schedule, t, "learned" if v_raw is not None else "beta_tilde", x0, v_raw)
    if discretized:
        return -discretized_gaussian_log_likelihood(x0, mean, var.sqrt()).flatten(1).sum(1)
    return (0.5 * (x0 - mean) ** 2 / var + 0.5 * torch.log(2 * math.pi * var)).flatten(1).sum(1)


def _check_variance(variance: str, learned_variance) -> None:
    if variance == "learned" and learned_variance is None:
        raise UserError(
            "variance='learned' needs a model trained with learned variances (objective.learn_sigma=true): "
            f"this one has none; choose one of {', '.join(VARIANCES)}"
        )
    if variance != "learned" and variance not in VARIANCES:
        raise UserError(f"variance={variance!r} is not allowed: choose one of {', '.join(VARIANCES)}, learned")


@torch.no_grad()
def vlb_terms(
    denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    y=None,
    generator: Generator = None,
    variance: str = "beta_tilde",
    discretized: bool = False,
    batch_t: int = 8,
    progress: Progress = None,
    learned_variance=None,
) -> torch.Tensor:
    """(N, T+1) float64 nats: column 0 the decoder L_0, column t = 1..T-1 the KL term L_{t-1} (paper indexing) at
    schedule step t, column T the prior L_T. batch_t timesteps share one denoiser call of batch_t * N inputs.
    variance="learned": the model's learned variances, `learned_variance(x_t, t, y) -> v_raw` (the network's
    variance channels of the call just made, prediction.NetworkDenoiser.variance_output).

    Noise for the chunk is drawn as (N, batch_t, ...) so that a PerSample generator keys it on the example."""
    if isinstance(batch_t, bool) or not isinstance(batch_t, int) or batch_t < 1:
        raise UserError(f"batch_t={batch_t!r} is not allowed: it must be a positive integer")
    _check_variance(variance, learned_variance)  # refuse a bad name before any work
    learned = variance == "learned"
    n, T = x.shape[0], schedule.T
    if discretized:
        grid_index(x)
    terms = torch.empty((n, T + 1), dtype=torch.float64)
    terms[:, T] = prior_kl(x, schedule).cpu()
    done = 0
    for start in range(0, T, batch_t):
        ts = torch.arange(start, min(start + batch_t, T))
        m = ts.numel()
        noise = randn((n, m, *x.shape[1:]), generator, x.device, x.dtype).transpose(0, 1).reshape(m * n, *x.shape[1:])
        t = ts.repeat_interleave(n).to(x.device)
        x0 = x.repeat(m, *([1] * (x.dim() - 1)))
        x_t = q_sample(schedule, x0, t, noise)
        yy = None if y is None else y.repeat(m)
        eps = denoiser(x_t, t, yy)
        v_raw = learned_variance(x_t, t, yy) if learned else None
        out = torch.empty(m * n, dtype=torch.float64, device=x.device)
        first = t == 0
        if first.any():
            out[first] = decoder_nll(
                x0[first], x_t[first], eps[first], schedule, discretized, v_raw[first] if learned else None
            )
        rest = ~first
        if rest.any():
            out[rest] = kl_terms(
                x0[rest], x_t[rest], eps[rest], t[rest], schedule, variance, v_raw[rest] if learned else None
            )
        terms[:, start : start + m] = out.view(m, n).T.cpu()
        done += m
        if progress is not None:
            progress(done, T)
    return terms


def vlb_nll(
    denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    y=None,
    generator: Generator = None,
    variance: str = "beta_tilde",
    batch_t: int = 8,
    progress: Progress = None,
    learned_variance=None,
) -> torch.Tensor:
    """The variational bound on -log p(x) of continuous data, nats/dim (Gaussian decoder density)."""
    terms = vlb_terms(
        denoiser,
        x,
        schedule,
        y=y,
        generator=generator,
        variance=variance,
        discretized=False,
        batch_t=batch_t,
        progress=progress,
        learned_variance=learned_variance,
    )
    return terms.sum(1) / _dim(x)


def vlb_bpd(
    denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    y=None,
    generator: Generator = None,
    variance: str = "beta_tilde",
    batch_t: int = 8,
    progress: Progress = None,
    learned_variance=None,
) -> torch.Tensor:
    """The variational bound on -log2 P(x) of 8-bit data, bits/dim (discretized decoder, Ho et al. section 3.3)."""
    terms = vlb_terms(
        denoiser,
        x,
        schedule,
        y=y,
        generator=generator,
        variance=variance,
        discretized=True,
        batch_t=batch_t,
        progress=progress,
        learned_variance=learned_variance,
    )
    return terms.sum(1) / (_dim(x) * LN2)


# ------------------------------------------------------------------------------------- the probability-flow ODE


def _probes(x: torch.Tensor, hutchinson: int, probe: str, generator: Generator) -> torch.Tensor:
    """(R * N, ...) probe vectors, replica-major: Hutchinson's R = hutchinson random vectors per example, or the
    R = D basis vectors (hutchinson=0, the exact trace, for small D)."""
    n, d = x.shape[0], _dim(x)
    if hutchinson == 0:
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        return eye[:, None, :].expand(d, n, d).reshape(d * n, *x.shape[1:])
    z = randn((n, hutchinson, *x.shape[1:]), generator, x.device, x.dtype).transpose(0, 1)
    if probe == "rademacher":
        z = torch.where(z >= 0, 1.0, -1.0).to(x.dtype)
    return z.reshape(hutchinson * n, *x.shape[1:])


def _attention_for_jvp(x: torch.Tensor):
    """Forward-mode AD through scaled_dot_product_attention needs the math kernel on CUDA (the fused ones have
    no forward derivative); the CPU already uses it."""
    if x.device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def ode_nll(
    denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    y=None,
    generator: Generator = None,
    hutchinson: int = 1,
    probe: str = "rademacher",
    steps: int = 64,
    sigma_min: float = 1e-3,
    progress: Progress = None,
) -> torch.Tensor:
    """-log p(x) of continuous data, nats/dim, by the probability-flow ODE (Song et al. 2021, eq. 13 and 39).

    Variance-exploding form: with x~ = x_t / sqrt(alpha_bar_t) and sigma = sqrt((1 - alpha_bar_t)/alpha_bar_t),
        dx~/dsigma = eps(x~, sigma)                       d log p_sigma(x~(sigma)) / dsigma = -tr(d eps / d x~)
    so log p_0(x) = log N(x_T; 0, I) - D/2 log(1 + sigma_max^2) + int_0^sigma_max tr(d eps / d x~) dsigma, where
    x_T = x~(sigma_max) / sqrt(1 + sigma_max^2) is the ODE's end point at step T-1.

    Solver: classical RK4 with `steps` equal steps in log sigma from sigma_min to sigma_max = sigma(T-1) (4 steps
    NFE each, every one a jvp). Start: the schedule's first step has sigma_0 = sqrt(beta_0 / (1 - beta_0)) (0.01
    for the linear schedule), not 0; the path starts at sigma_min below it, in the schedule's continuous
    extension t in [-1, 0) (schedule.py), so the density is the data's own, not the data's smoothed by sigma_0.
    Starting at sigma_min instead of 0 changes the mean nll only by O((sigma_min / data scale)^4): a second-order
    effect, since the data then stands in for the density smoothed by sigma_min at its own points.
    A network never trained below t = 0 extrapolates there; sigma_min = sigma_0 keeps it inside its range.

    Trace: Hutchinson's estimator v^T (d eps / d x~) v with `hutchinson` probes per example (Rademacher or
    Gaussian), the same probes along the whole path (Grathwohl et al. 2019), by forward-mode AD (torch.func.jvp)
    through the denoiser; hutchinson=0 takes the exact trace with D jvps (for small images). Rademacher probes
    have the lower variance (none on the diagonal of the Jacobian): on the oracle mixture, 0.13 nats/dim per
    example against 2.7 for Gaussian ones (bench/likelihood_table.py).
    The denoiser must admit forward-mode AD: a NetworkDenoiser works (its no_grad does not stop jvp), but not
    under autocast (forward AD then meets mixed dtypes); build it with autocast_dtype=None for this.
    """
    if isinstance(hutchinson, bool) or not isinstance(hutchinson, int) or hutchinson < 0:
        raise UserError(f"hutchinson={hutchinson!r} is not allowed: the number of probes, >= 1 (0 = exact trace)")
    if probe not in PROBES:
        raise UserError(f"probe={probe!r} is not allowed: choose one of {', '.join(PROBES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps={steps!r} is not allowed: it must be a positive integer")
    sigma_max = float(schedule.sigmas[-1])
    if not 0 < sigma_min < sigma_max:
        raise UserError(f"sigma_min={sigma_min!r} is not allowed: it must be in (0, {sigma_max:.4g})")
    n, d = x.shape[0], _dim(x)
    v = _probes(x, hutchinson, probe, generator)
    reps = v.shape[0] // n
    y_rep = None if y is None else y.repeat(reps)

    def deriv(xs: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx~/dlog sigma, d(log p change)/dlog sigma) = (sigma eps, sigma tr(d eps/d x~)) at sigma = e^lam."""
        sigma = math.exp(lam)
        t = float(schedule.t_from_sigma(torch.tensor([sigma], dtype=torch.float64))[0])
        tt = torch.full((reps * n,), t, dtype=torch.float64, device=x.device)
        scale = (1 + sigma**2) ** -0.5

        def eps_of(z):
            return denoiser(z * scale, tt, y_rep)

        with _attention_for_jvp(x):
            eps, jv = torch.func.jvp(eps_of, (xs.repeat(reps, *([1] * (x.dim() - 1))),), (v,))
        quad = (v * jv).flatten(1).sum(1).to(torch.float64).view(reps, n)
        trace = quad.sum(0) if hutchinson == 0 else quad.mean(0)
        return sigma * eps[:n].to(x.dtype), sigma * trace

    lams = torch.linspace(math.log(sigma_min), math.log(sigma_max), steps + 1, dtype=torch.float64).tolist()
    xs = x.detach().clone()
    delta = torch.zeros(n, dtype=torch.float64, device=x.device)
    for i in range(steps):
        l0, h = lams[i], lams[i + 1] - lams[i]
        k1, c1 = deriv(xs, l0)
        k2, c2 = deriv(xs + 0.5 * h * k1, l0 + 0.5 * h)
        k3, c3 = deriv(xs + 0.5 * h * k2, l0 + 0.5 * h)
        k4, c4 = deriv(xs + h * k3, l0 + h)
        xs = xs + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + (h / 6) * (c1 + 2 * c2 + 2 * c3 + c4)
        if progress is not None:
            progress(i + 1, steps)
    x_T = xs.to(torch.float64).flatten(1) * (1 + sigma_max**2) ** -0.5
    log_prior = -0.5 * (x_T**2).sum(1) - 0.5 * d * math.log(2 * math.pi) - 0.5 * d * math.log1p(sigma_max**2)
    return (-(log_prior + delta) / d).cpu()


def ode_bpd(
    denoiser, x: torch.Tensor, schedule: Schedule, *, y=None, generator: Generator = None, **ode_kwargs
) -> torch.Tensor:
    """Bits/dim of 8-bit data by the ODE: dequantize (drawn first from `generator`), ode_nll, then the offset
    log2(256/2) of the bins' width 2/256. An upper bound on -log2 P(x) in expectation over the dequantization."""
    z = dequantize(x, generator)
    return bpd_from_dequantized_nll(ode_nll(denoiser, z, schedule, y=y, generator=generator, **ode_kwargs))


# --------------------------------------------------------------------------------------- scoring a held-out set

METHODS = ("vlb", "ode")


def check_likelihood_config(lc: dict) -> dict:
    """The `likelihood` group, checked before any work; methods as a list without repeats."""
    from diffuse.validate import check_choice, check_number

    lc = dict(lc)
    if lc["n"] is not None:
        check_number("likelihood.n", lc["n"], minimum=1, integer=True)
    for key in ("batch_size", "batch_t", "ode_steps"):
        check_number(f"likelihood.{key}", lc[key], minimum=1, integer=True)
    check_number("likelihood.hutchinson", lc["hutchinson"], minimum=0, integer=True)
    check_number("likelihood.seed", lc["seed"], integer=True)
    check_number("likelihood.sigma_min", lc["sigma_min"], minimum=0, exclusive_min=True)
    methods = [lc["methods"]] if isinstance(lc["methods"], str) else list(lc["methods"] or [])
    if not methods or any(m not in METHODS for m in methods):
        raise UserError(f"likelihood.methods={methods!r} is not allowed: a list of {', '.join(METHODS)}")
    lc["methods"] = list(dict.fromkeys(methods))
    if lc["variance"] is not None:
        check_choice("likelihood.variance", lc["variance"], VARIANCES + ("learned",))
    check_choice("likelihood.probe", lc["probe"], PROBES)
    return lc


def resolve_variance(variance: str | None, learned_variance) -> str:
    """likelihood.variance: null means the model's own, learned if it learned them, else beta-tilde."""
    if variance is None:
        return "learned" if learned_variance is not None else "beta_tilde"
    if variance == "learned" and learned_variance is None:
        raise UserError(
            "likelihood.variance=learned needs a model trained with objective.learn_sigma=true: this one "
            f"has fixed variances; choose {' or '.join(VARIANCES)} (or null)"
        )
    return variance


def score(
    denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    kind: str,
    lc: dict,
    y_null: int | None,
    d,
    device,
    learned_variance=None,
) -> dict[str, float]:
    """bits/dim of 8-bit data (kind="bpd") or nats/dim of continuous data (kind="nll") of the examples x (in [-1, 1]),
    by each of lc["methods"], sharded over torchrun ranks (`d`), with the standard error of each mean. Example i's
    noise, probes and dequantization depend only on (lc["seed"], i): the figures do not depend on the batch size
    or the number of ranks. y_null: the null label that scores a class-conditional network unconditionally."""
    from diffuse import distributed
    from diffuse.console import progress_bar
    from diffuse.diffusion.noise import PerSample

    if kind == "bpd":  # the 8-bit grid: continuous data (gmm) is quantized first, as an image file would be
        from diffuse.images import from_uint8, to_uint8

        x = from_uint8(to_uint8(x))
    bs, methods = lc["batch_size"], lc["methods"]
    variance = resolve_variance(lc["variance"], learned_variance)
    mine = list(range(d.rank, x.shape[0], d.world))
    per: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    with progress_bar(d.main) as bar:
        tasks = {
            m: bar.add_task(
                f"{kind} by the {'variational bound' if m == 'vlb' else 'probability-flow ODE'}", total=x.shape[0]
            )
            for m in methods
        }
        for s in range(0, len(mine), bs):
            idx = mine[s : s + bs]
            xb = x[idx].to(device)
            y = None if y_null is None else torch.full((len(idx),), y_null, dtype=torch.long, device=device)
            for m in methods:
                gen = PerSample(lc["seed"], idx)
                if m == "vlb":
                    fn = vlb_bpd if kind == "bpd" else vlb_nll
                    v = fn(
                        denoiser,
                        xb,
                        schedule,
                        y=y,
                        generator=gen,
                        variance=variance,
                        batch_t=lc["batch_t"],
                        learned_variance=learned_variance,
                    )
                else:
                    fn = ode_bpd if kind == "bpd" else ode_nll
                    v = fn(
                        denoiser,
                        xb,
                        schedule,
                        y=y,
                        generator=gen,
                        hutchinson=lc["hutchinson"],
                        probe=lc["probe"],
                        steps=lc["ode_steps"],
                        sigma_min=lc["sigma_min"],
                    )
                per[m].append(v)
                bar.advance(tasks[m], len(idx) * d.world)
    out: dict[str, float] = {}
    for m in methods:
        mine_v = torch.cat(per[m]) if per[m] else torch.empty(0, dtype=torch.float64)
        allv = torch.cat(distributed.gather(mine_v, d))
        out[f"{kind}_{m}"] = float(allv.mean())
        out[f"{kind}_{m}_sem"] = float(allv.std() / allv.numel() ** 0.5) if allv.numel() > 1 else float("nan")
    return out
