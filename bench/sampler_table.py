"""Every solver x noise-level spacing x NFE on the exact denoiser of a Gaussian mixture, beside diffusers'
multistep schedulers driven by the same denoiser in the same run, and the floor exact samples give.

The mixture: four components over 1 x 8 x 8 (stds 0.05, 0.1, 0.15, 0.2; weights 0.2, 0.3, 0.25, 0.25), the linear
schedule (T = 1000), n x_T in float64 from one seed, shared by every run. Per run, over the components:
    z      max |freq z|: a component frequency's z-score against its weight
    mean   the worst RMS error of a component's sample mean, in units of its std
    std    the worst |sample std / true std - 1|
The floor row is the same figures for n exact mixture samples: no solver can show less than sampling error.
NFE is counted by wrapping the denoiser. "tuned" rows use levels from diffuse.pipeline.tuning (the search
`diffuse tune-schedule` runs, tune.loss=logrms), tuned on 512 other x_T against dpm_solver_3m at 500 steps. Each of
our solvers runs with the options its config gives it (conf/sampler/NAME.yaml: UniPC order 2 bh2, iPNDM order 3, ...).

    python -m bench.sampler_table [--n 20000] [--nfe 5 10 15 20 50] [--markdown] [--no-tuned]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from diffuse.data.gmm import default_mixture
from diffuse.diffusion.oracle import GMMDenoiser
from diffuse.diffusion.samplers import SAMPLERS, STOCHASTIC
from diffuse.diffusion.samplers.common import sigma_of, time_list
from diffuse.diffusion.schedule import make_schedule
from diffuse.diffusion.timesteps import sampler_timesteps, sigma_timesteps
from diffuse.metrics.mixture import mixture_fit
from diffuse.pipeline.sampling import CountingDenoiser
from diffuse.pipeline.tuning import sigmas_of, tune_levels

SPACINGS = {"karras": 7.0, "logsnr": 1.0, "polyexp": 2.0, "trailing": None}
TUNED = ("dpm_solver", "dpm_solver_3m", "unipc", "ipndm", "deis")


def summary(mixture, x: torch.Tensor) -> tuple[float, float, float]:
    rows = mixture_fit(mixture, x)
    return (
        max(abs(r["freq_z"]) for r in rows),
        max(r["mean_err"] for r in rows),
        max(abs(r["std_ratio"] - 1) for r in rows),
    )


def steps_for(name: str, nfe: int, afs: bool) -> int:
    """Steps of `name` that cost `nfe` evaluations: heun pays 2 per step but 1 for the last; AFS saves one."""
    if name == "heun":
        return (nfe + 1) // 2
    return nfe + 1 if afs else nfe


def config_options(name: str) -> dict:
    """The sampler's options as `sampler=NAME` configures them (conf/sampler/NAME.yaml), without the level keys."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from diffuse.pipeline.sampling import SAMPLER_META

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        cfg = OmegaConf.to_container(compose(config_name="sample", overrides=[f"sampler={name}"]).sampler)
    return {k: v for k, v in cfg.items() if k not in SAMPLER_META}


def ours(den, x_T, schedule, name: str, timesteps, **options) -> tuple[torch.Tensor, int]:
    counter = CountingDenoiser(den)
    g = torch.Generator().manual_seed(1)
    x = SAMPLERS[name](counter, x_T, timesteps, schedule, generator=g, **options)
    return x, counter.calls


def diffusers_run(make, den, x_T, steps: int, to_ours=None) -> tuple[torch.Tensor, int]:
    """diffusers' own loop (set_timesteps, then step) with our exact denoiser as the model; `to_ours` maps a
    scheduler's timestep to ours when it lives on another clock (IPNDM's trigonometric t in [0, 1])."""
    sched = make()
    sched.set_timesteps(steps)
    x, calls = x_T.clone(), 0
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), float(to_ours(t)) if to_ours else float(t), dtype=torch.float64)
        eps = den(x, tt)
        calls += 1
        x = sched.step(eps, t, x).prev_sample.to(torch.float64)
    return x, calls


def diffusers_rows(schedule):
    from diffusers import DPMSolverMultistepScheduler, IPNDMScheduler, UniPCMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    rows = []
    for order in (2, 3):
        for lam, kw in (("karras", {"use_karras_sigmas": True}), ("lu lambdas", {"use_lu_lambdas": True})):
            rows.append(
                (
                    f"diffusers DPMSolver++({order}M), {lam}",
                    lambda o=order, k=kw: DPMSolverMultistepScheduler(**common, solver_order=o, **k),
                    None,
                )
            )
    for order in (2, 3):
        rows.append(
            (f"diffusers UniPC-{order} (bh2)", lambda o=order: UniPCMultistepScheduler(**common, solver_order=o), None)
        )
        rows.append(
            (
                f"diffusers UniPC-{order} (bh2), karras",
                lambda o=order: UniPCMultistepScheduler(**common, solver_order=o, use_karras_sigmas=True),
                None,
            )
        )

    def trig_to_ours(t):  # IPNDM's process: alpha = cos(t pi / 2), sigma = sin(t pi / 2)
        sigma = torch.tan(torch.as_tensor(float(t), dtype=torch.float64) * math.pi / 2).clamp(
            max=float(schedule.sigmas[-1])
        )
        return float(schedule.t_from_sigma(sigma.reshape(1)).clamp(0, schedule.T - 1)[0])

    rows.append(("diffusers IPNDM", lambda: IPNDMScheduler(num_train_timesteps=1000), trig_to_ours))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 15, 20, 50])
    ap.add_argument(
        "--samplers", nargs="+", default=None, help="ours to run (default: every deterministic and stochastic one)"
    )
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-tuned", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = ap.parse_args()
    mixture, schedule = default_mixture(channels=1, resolution=8), make_schedule("linear")
    den = GMMDenoiser(mixture, schedule)
    x_T = torch.randn((args.n, *mixture.shape), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    results: dict[str, dict[int, tuple]] = {}

    def record(label: str, nfe: int, x: torch.Tensor) -> None:
        z, m, s = summary(mixture, x)
        results.setdefault(label, {})[nfe] = (z, m, s)
        print(f"{label:<44} NFE {nfe:>3}  z {z:6.2f}  mean {m:6.3f}  std {s:6.3f}", flush=True)

    exact, _ = mixture.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 7))
    record("floor: exact samples", 0, exact)
    names = args.samplers or [n for n in SAMPLERS if n != "adaptive"]
    t0 = time.time()
    for name in names:
        defaults = config_options(name)
        for afs in (False, True) if "afs" in defaults else (False,):
            for spacing, rho in SPACINGS.items():
                label = f"{name}{' +afs' if afs else ''}, {spacing}"
                for nfe in args.nfe:
                    steps = steps_for(name, nfe, afs)
                    if steps < 1 or (name == "ddpm" and spacing != "trailing"):
                        continue
                    ts = (
                        sampler_timesteps(schedule, steps, spacing, rho)
                        if rho
                        else sampler_timesteps(schedule, steps, spacing)
                    )
                    x, calls = ours(
                        den, x_T, schedule, name, ts, **{**defaults, "afs": afs} if "afs" in defaults else defaults
                    )
                    record(label, calls, x)
    if "adaptive" in SAMPLERS and args.samplers is None:
        for order in (2, 3):
            for rtol in (0.1, 0.05, 0.02):
                ts = sampler_timesteps(schedule, 2, "logsnr")
                x, calls = ours(
                    den, x_T, schedule, "adaptive", ts, **{**config_options("adaptive"), "order": order, "rtol": rtol}
                )
                record(f"adaptive order {order}, rtol {rtol}", calls, x)
    if not args.no_tuned:
        x_tune = torch.randn(
            (512, *mixture.shape), generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64
        )
        ref = ours(
            den,
            x_tune,
            schedule,
            "dpm_solver_3m" if "dpm_solver_3m" in SAMPLERS else "dpm_solver",
            sampler_timesteps(schedule, 500, "logsnr"),
        )[0]
        for name in [n for n in TUNED if n in SAMPLERS and n not in STOCHASTIC]:
            defaults = config_options(name)
            for nfe in [v for v in args.nfe if v <= 20]:
                steps = steps_for(name, nfe, False)
                start = sampler_timesteps(schedule, steps, "logsnr")
                start_sigmas = torch.tensor([sigma_of(schedule, t) for t in time_list(start)], dtype=torch.float64)

                def solve(sigmas, x=x_tune, name=name, opts=defaults):
                    return ours(den, x, schedule, name, sigma_timesteps(schedule, sigmas), **opts)[0]

                state = tune_levels(solve, ref, schedule, start_sigmas, delta=0.5, min_delta=0.01, iterations=40)
                x, calls = ours(
                    den, x_T, schedule, name, sigma_timesteps(schedule, sigmas_of(state.params, schedule)), **defaults
                )
                record(f"{name}, tuned", calls, x)
    if not args.no_diffusers:
        for label, make, to_ours in diffusers_rows(schedule):
            for nfe in args.nfe:
                x, calls = diffusers_run(make, den, x_T, nfe, to_ours)
                record(label, calls, x)
    print(f"({time.time() - t0:.0f} s)")
    if args.markdown:
        nfes = sorted(args.nfe)
        print("\n| solver, levels | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
        print("| --- |" + " --- |" * len(nfes))
        print(
            f"| floor: {args.n} exact samples | "
            + " | ".join(["{:.2f} / {:.3f} / {:.3f}".format(*results["floor: exact samples"][0])] * len(nfes))
            + " |"
        )
        for label, r in results.items():
            if label.startswith("floor"):
                continue
            cells = ["{:.2f} / {:.3f} / {:.3f}".format(*r[k]) if k in r else "" for k in nfes]
            extra = [f"{k}: " + "{:.2f} / {:.3f} / {:.3f}".format(*v) for k, v in r.items() if k not in nfes]
            print(f"| {label} | " + " | ".join(cells) + " |" + (f" ({'; '.join(extra)})" if extra else ""))


if __name__ == "__main__":
    main()
