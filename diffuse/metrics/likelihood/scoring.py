"""A held-out set scored by the bound and the ODE for diffuse eval: the `likelihood` config group checked, the
examples sharded over torchrun ranks, each method's mean and its standard error."""

from __future__ import annotations

import torch

from diffuse.diffusion.schedule import Schedule
from diffuse.errors import UserError
from diffuse.metrics.likelihood.ode import PROBES, ode_bpd, ode_nll
from diffuse.metrics.likelihood.vlb import VARIANCES, vlb_bpd, vlb_nll

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


def _estimate(method: str, kind: str, denoiser, x, schedule, y, generator, lc: dict, variance, learned_variance):
    """One batch's per-example figures by one method, with the `likelihood` group's settings for it."""
    if method == "vlb":
        fn = vlb_bpd if kind == "bpd" else vlb_nll
        opts = {"variance": variance, "batch_t": lc["batch_t"], "learned_variance": learned_variance}
    else:
        fn = ode_bpd if kind == "bpd" else ode_nll
        opts = {
            "hutchinson": lc["hutchinson"],
            "probe": lc["probe"],
            "steps": lc["ode_steps"],
            "sigma_min": lc["sigma_min"],
        }
    return fn(denoiser, x, schedule, y=y, generator=generator, **opts)


def _mean_and_sem(name: str, mine: list[torch.Tensor], d) -> dict[str, float]:
    """Every rank's figures gathered: their mean under `name` and its standard error under `name`_sem."""
    from diffuse import distributed

    mine_v = torch.cat(mine) if mine else torch.empty(0, dtype=torch.float64)
    allv = torch.cat(distributed.gather(mine_v, d))
    return {
        name: float(allv.mean()),
        f"{name}_sem": float(allv.std() / allv.numel() ** 0.5) if allv.numel() > 1 else float("nan"),
    }


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
                per[m].append(_estimate(m, kind, denoiser, xb, schedule, y, gen, lc, variance, learned_variance))
                bar.advance(tasks[m], len(idx) * d.world)
    out: dict[str, float] = {}
    for m in methods:
        out.update(_mean_and_sem(f"{kind}_{m}", per[m], d))
    return out
