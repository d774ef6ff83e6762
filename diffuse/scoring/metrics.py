"""diffuse eval's metrics: a dict name -> function(Evaluation) -> {column: value}, each taking what it needs from
the Evaluation's parts; and the metrics of several sample sets (metrics.seeds) reported as their min and mean."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from diffuse.console import console
from diffuse.errors import UserError
from diffuse.metrics import image_scores, manifold
from diffuse.metrics.likelihood import scoring
from diffuse.pipeline.config import to_dict
from diffuse.scoring.evaluation import Evaluation


def _fid(ev: Evaluation) -> dict[str, float]:
    feats, dim = ev.features["pool"], ev.extractor.dim
    if ev.d.main and min(len(feats), ev.ref_stats.n) <= dim:
        console.print(
            f"warning: FID from {min(len(feats), ev.ref_stats.n)} images of {dim}-d features: the covariance is "
            f"singular and the value unreliable; use more than {dim} images (50000 is the standard)",
            markup=False,
        )
    return {"fid": image_scores.fid(ev.ref_stats, feats)}


def _kid(ev: Evaluation) -> dict[str, float]:
    mean, std, size = image_scores.kid(
        ev.ref_stats.features,
        ev.features["pool"],
        subsets=ev.m["kid_subsets"],
        subset_size=ev.m["kid_subset_size"],
        seed=ev.m["seed"],
    )
    return {"kid": mean, "kid_std": std, "kid_subset_size": size}


def _is(ev: Evaluation) -> dict[str, float]:
    mean, std = image_scores.inception_score(ev.features["logits"], splits=ev.m["is_splits"], seed=ev.m["seed"])
    return {"is": mean, "is_std": std}


def _fd(ev: Evaluation) -> dict[str, float]:
    """The Fréchet distance in the chosen feature space, named after it: --metric fd metrics.features=dinov2 is
    Stein et al.'s FD_DINOv2 (--metric fid computes the same number, under the name FID)."""
    return {f"fd_{ev.extractor.name}": _fid(ev)["fid"]}


def _manifold_sets(ev: Evaluation) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference subset kept with its statistics (metrics.kid_ref_max images) and the samples, the larger cut
    to the smaller's size (its first images): each side's k-NN radii must come from a set of the same size."""
    real, fake = ev.ref_stats.features, ev.features["pool"]
    m = min(len(real), len(fake))
    ev.info["manifold_n"] = m
    return real[:m], fake[:m]


def _pr(ev: Evaluation) -> dict[str, float]:
    p, r = manifold.precision_recall(*_manifold_sets(ev), k=ev.m["pr_k"], device=ev.rt.device)
    return {"precision": p, "recall": r}


def _dc(ev: Evaluation) -> dict[str, float]:
    dens, cov = manifold.density_coverage(*_manifold_sets(ev), k=ev.m["dc_k"], device=ev.rt.device)
    return {"density": dens, "coverage": cov}


def _likelihood(ev: Evaluation, kind: str) -> dict[str, float]:
    lc, model = ev.likelihood_config, ev.likelihood_model
    x, desc = ev.likelihood_data
    # Class-conditional networks are scored unconditionally: the null label.
    y_null = model.num_classes if (model.num_classes and not model.is_oracle) else None
    learned = model.learned_variance
    out = scoring.score(
        model.denoiser,
        x,
        model.schedule,
        kind=kind,
        lc=lc,
        y_null=y_null,
        d=ev.d,
        device=ev.rt.device,
        learned_variance=learned,
    )
    if kind == "nll" and model.is_oracle:
        from diffuse.data import build_mixture
        from diffuse.metrics.mixture import mixture_nll

        out["nll_exact"] = float(mixture_nll(build_mixture(to_dict(ev.cfg.dataset)), x).mean())
    ev.info["likelihood"] = {
        "data": desc,
        "n": int(x.shape[0]),
        **{k: lc[k] for k in ("methods", "ode_steps", "hutchinson", "probe", "sigma_min", "seed")},
        "variance": scoring.resolve_variance(lc["variance"], learned),
    }
    return out


METRICS: dict[str, Callable[[Evaluation], dict[str, float]]] = {
    "fid": _fid,
    "kid": _kid,
    "is": _is,
    "fd": _fd,
    "pr": _pr,
    "dc": _dc,
    "bpd": lambda ev: _likelihood(ev, "bpd"),
    "nll": lambda ev: _likelihood(ev, "nll"),
}
LIKELIHOOD_METRICS = {"bpd", "nll"}
# Their reference, shapes and extractor are checked before any work.
FEATURE_METRICS = {"fid", "kid", "is", "fd", "pr", "dc"}
NEEDS_REFERENCE = {"fid", "kid", "fd", "pr", "dc"}


def metric_names(value: Any) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if not names:
        raise UserError(f"no metric given: use --metric with one of {', '.join(METRICS)}")
    for name in names:
        if name not in METRICS:
            raise UserError(f"--metric {name} is not allowed: choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def score_sets(ev: Evaluation, names: list[str], seeds: int) -> dict[str, Any]:
    """Every metric on sample set 0; with metrics.seeds = S > 1 also on sets 1..S-1 (drawn with seed + k), each
    sample metric then reported as its min and mean over the S sets, and each set's own values under `sets` in
    metrics.json: the protocol of Karras et al. 2022 (EDM), who report the minimum FID of three sets of 50000.
    A likelihood draws no samples: it is computed once."""
    per_set = []
    for k in range(seeds):
        evk = ev if k == 0 else ev.another_set(k)
        values: dict[str, Any] = {}
        for name in names:
            if k == 0 or name not in LIKELIHOOD_METRICS:
                values.update(METRICS[name](evk))
        per_set.append((evk, values))
    if seeds == 1:
        return per_set[0][1]
    sample_keys = list(per_set[1][1])  # the later sets computed the sample metrics only
    out: dict[str, Any] = {k: v for k, v in per_set[0][1].items() if k not in sample_keys}
    for key in sample_keys:
        if key.endswith("_subset_size"):
            out[key] = per_set[0][1][key]
            continue
        vals = [v[key] for _, v in per_set]
        out[f"{key}_min"], out[f"{key}_mean"] = min(vals), math.fsum(vals) / len(vals)
    ev.info["seeds"] = [evk.info["seed"] for evk, _ in per_set]
    ev.info["sets"] = [
        {"seed": evk.info["seed"], "nfe": evk.info.get("nfe"), "metrics": {k: v[k] for k in sample_keys}}
        for evk, v in per_set
    ]
    return out
