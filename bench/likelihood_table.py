"""Likelihood estimates against the exact answer of a Gaussian mixture (model=oracle, the default pattern mixture).

Continuous data (nats/dim): the mixture's exact nll vs the probability-flow ODE (RK4 steps, exact trace or
Hutchinson probes, the start at sigma_min = 1e-3 in the schedule's extension or at sigma_0 without it) vs the
variational bound (both reverse variances); then a narrower mixture, where starting the ODE at the schedule's
first noise level sigma_0 instead of near zero shows. 8-bit data (the samples quantized, bits/dim): the exact discrete nll
over the dequantization bins and over the decoder's centred bins vs ode_bpd and vlb_bpd.
Per row: the mean, its difference from the exact value with the standard error of that difference, the
network calls (NFE, a jvp counted as one) and the CPU seconds.

    python -m bench.likelihood_table [N] [CHANNELS] [RESOLUTION]
"""

import math
import sys
import time

import torch

from diffuse.data.gmm import GaussianMixture, default_mixture
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.schedule import make_schedule
from diffuse.metrics.likelihood.ode import ode_bpd, ode_nll
from diffuse.metrics.likelihood.units import LN2
from diffuse.metrics.likelihood.vlb import vlb_bpd, vlb_nll
from diffuse.metrics.mixture import mixture_interval_nll, mixture_nll


def gen(seed):
    return torch.Generator().manual_seed(seed)


def row(name, values, exact, nfe, secs):
    diff = values - exact
    se = float(diff.std()) / math.sqrt(diff.numel())
    return f"{name:<34} {float(values.mean()):>9.4f} {float(diff.mean()):>+9.4f} {se:>8.4f} {nfe:>6} {secs:>7.2f}"


def timed(fn):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def main(n: int, channels: int, res: int):
    torch.set_num_threads(1)
    mix = default_mixture(channels=channels, resolution=res)
    sched = make_schedule("linear")
    den = GMMDenoiser(mix, sched)
    x = mix.sample(n, gen(0))[0]
    d = mix.dim
    exact = mixture_nll(mix, x)
    head = f"{'estimate':<34} {'mean':>9} {'- exact':>9} {'s.e.':>8} {'NFE':>6} {'cpu s':>7}"
    print(
        f"oracle mixture K={mix.K}, {channels}x{res}x{res} (D={d}), stds {mix.stds.tolist()}, linear schedule "
        f"T={sched.T}, N={n}, float64, 1 thread"
    )
    print("\ncontinuous data, nats/dim\n" + head)
    print(f"{'exact mixture nll':<34} {float(exact.mean()):>9.4f}")
    for steps in (8, 16, 32, 64):
        v, s = timed(lambda: ode_nll(den, x, sched, hutchinson=0, steps=steps))
        print(row(f"ode exact trace, RK4 {steps} steps", v, exact, f"{4 * steps}x{d}", s))
    for probe, k in (("rademacher", 1), ("rademacher", 4), ("gaussian", 1)):
        v, s = timed(lambda: ode_nll(den, x, sched, hutchinson=k, probe=probe, steps=32, generator=gen(1)))
        print(row(f"ode {probe} x{k}, 32 steps", v, exact, f"{4 * 32}x{k}", s))
    sigma_0 = float(sched.sigmas[0])
    v, s = timed(lambda: ode_nll(den, x, sched, hutchinson=0, steps=64, sigma_min=sigma_0))
    print(row(f"ode exact, 64 st, from sigma_0={sigma_0:.3g}", v, exact, f"{4 * 64}x{d}", s))
    for variance in ("beta_tilde", "beta"):
        v, s = timed(lambda: vlb_nll(den, x, sched, generator=gen(2), variance=variance, batch_t=50))
        print(row(f"vlb, variance {variance}", v, exact, sched.T, s))

    # The same mixture with stds / 5 (0.01-0.04): structure at the scale of sigma_0, where the start matters.
    narrow = GaussianMixture(mix.means, mix.stds / 5, mix.weights)
    den_n = GMMDenoiser(narrow, sched)
    xn = narrow.sample(n, gen(5))[0]
    exact_n = mixture_nll(narrow, xn)
    print(f"\nthe mixture with stds / 5 ({', '.join(f'{v:.2g}' for v in narrow.stds.tolist())}), nats/dim\n" + head)
    print(f"{'exact mixture nll':<34} {float(exact_n.mean()):>9.4f}")
    for sigma_min in (1e-3, sigma_0):
        v, s = timed(lambda: ode_nll(den_n, xn, sched, hutchinson=0, steps=64, sigma_min=sigma_min))
        print(row(f"ode exact, 64 st, sigma_min={sigma_min:.3g}", v, exact_n, f"{4 * 64}x{d}", s))

    k = ((x + 1) * 127.5).round().clamp(0, 255)
    xq = k / 127.5 - 1
    deq = mixture_interval_nll(mix, k / 128 - 1, (k + 1) / 128 - 1) / LN2
    cent = (
        mixture_interval_nll(
            mix, torch.where(k == 0, -math.inf, xq - 1 / 255), torch.where(k == 255, math.inf, xq + 1 / 255)
        )
        / LN2
    )
    print(
        "\n8-bit data (samples quantized), bits/dim; ode rows against the dequantization bins, vlb rows against"
        "\nthe decoder's centred bins\n" + head
    )
    print(f"{'exact, bins [k, k+1)/128 - 1':<34} {float(deq.mean()):>9.4f}")
    print(f"{'exact, bins 2k/255 - 1 +- 1/255':<34} {float(cent.mean()):>9.4f}")
    v, s = timed(lambda: ode_bpd(den, xq, sched, hutchinson=0, steps=64, generator=gen(3)))
    print(row("ode_bpd exact trace, 64 steps", v, deq, f"{4 * 64}x{d}", s))
    v, s = timed(lambda: ode_bpd(den, xq, sched, hutchinson=1, steps=32, generator=gen(3)))
    print(row("ode_bpd rademacher x1, 32 steps", v, deq, f"{4 * 32}x1", s))
    for variance in ("beta_tilde", "beta"):
        v, s = timed(lambda: vlb_bpd(den, xq, sched, generator=gen(4), variance=variance, batch_t=50))
        print(row(f"vlb_bpd, variance {variance}", v, cent, sched.T, s))


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*(args + [500, 1, 4][len(args) :]))
