"""Classifier guidance against the exact answer: the unconditional mixture oracle (model=oracle, guidance.cfg_scale=0)
guided by the mixture's exact classifier (guidance.classifier=oracle) at several scales.

At scale 1, p(x_t) p(y | x_t) = p(x_t | y) p(y) at every noise level, so the guided sampler draws component y
exactly; below 1 the other components keep some mass. Above 1 nothing more happens on this mixture: once x_t is
inside component y, p(y | x_t) is 1 and its gradient 0, so larger scales only decide the component earlier.
Default mixture (4 components over 3 x 8 x 8, stds 0.05-0.2, weights 0.2/0.3/0.25/0.25), linear schedule, ancestral
DDPM over all 1000 levels (variance beta), n images per label, every label. Per scale: the frequency of the chosen
component (worst label and mean over labels), and for it the worst mean error (RMS, in its stds) and the range of
its std ratio; the floor row is what n exact draws of the component show.

    OMP_NUM_THREADS=1 python -m bench.classifier_guidance [N] [--markdown]
"""

import sys
import time

import torch

from diffuse.data.gmm import default_mixture
from diffuse.diffusion.guidance import cfg_denoiser, classifier_guided, mean_shift_factors
from diffuse.diffusion.oracle import GMMClassifier, GMMDenoiser
from diffuse.diffusion.samplers import ddpm
from diffuse.diffusion.schedule import make_schedule
from diffuse.metrics.mixture import mixture_fit

SCALES = (0.5, 1.0, 2.0)


def guided_samples(mixture, schedule, scale, labels, seed, mode="eps"):
    """One image per entry of `labels`, all labels in one batch (the sampler's loop costs the same for any batch)."""
    timesteps = torch.arange(schedule.T - 1, -1, -1)
    factors = mean_shift_factors(timesteps, schedule, "beta") if mode == "mean" else None
    den = classifier_guided(
        cfg_denoiser(GMMDenoiser(mixture, schedule), 0.0, mixture.K),
        GMMClassifier(mixture, schedule).grad,
        scale,
        schedule,
        factors=factors,
    )
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(labels), *mixture.shape), generator=g, dtype=torch.float64)
    return ddpm(den, x_T, timesteps, schedule, variance="beta", generator=g, y=labels)


def row(mixture, x, labels):
    freqs, errs, ratios = [], [], []
    for k in range(mixture.K):
        fit = mixture_fit(mixture, x[labels == k])[k]
        freqs.append(fit["n"] / int((labels == k).sum()))
        errs.append(fit["mean_err"])
        ratios.append(fit["std_ratio"])
    return min(freqs), sum(freqs) / len(freqs), max(errs), min(ratios), max(ratios)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 2000
    mixture, schedule = default_mixture(), make_schedule("linear")
    g = torch.Generator().manual_seed(99)
    labels = torch.arange(mixture.K).repeat_interleave(n)
    exact = mixture.means[labels] + mixture.stds[labels].view(-1, 1, 1, 1) * torch.randn(
        (len(labels), *mixture.shape), generator=g, dtype=torch.float64
    )
    rows = [("floor: exact draws of the component", "", row(mixture, exact, labels))]
    for mode in ("eps", "mean"):
        for s in SCALES:
            t0 = time.perf_counter()
            rows.append(
                (
                    f"scale {s:g}",
                    mode,
                    row(mixture, guided_samples(mixture, schedule, s, labels, seed=1, mode=mode), labels),
                )
            )
            print(f"# mode {mode} scale {s:g}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    head = "| classifier scale | mode | freq of chosen (worst / mean) | worst mean err | std ratio |"
    print(head)
    print("| --- | --- | --- | --- | --- |")
    for name, mode, (fmin, fmean, err, rlo, rhi) in rows:
        print(f"| {name} | {mode} | {fmin:.4f} / {fmean:.4f} | {err:.3f} | {rlo:.3f} - {rhi:.3f} |")


if __name__ == "__main__":
    main()
