"""diffuse eval: samples (generated from ckpt=/model=oracle, or read from samples=) + reference -> features ->
FID / KID / IS -> metrics.json and a table; or a model + the dataset's held-out split -> bits/dim (bpd) or
nats/dim (nll) by the variational bound and the probability-flow ODE.

The command: its refusals, the order of the phases, the stop and resume rules and the outputs. What the metrics draw
on is an evaluation.Evaluation, the metrics themselves are eval_metrics'; under torchrun rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffuse import distributed
from diffuse.console import console
from diffuse.errors import UserError
from diffuse.io import save_resolved_config, write_json
from diffuse.metrics import image_scores
from diffuse.metrics.extraction import FeatureStore
from diffuse.pipeline.config import runtime_of, to_dict
from diffuse.pipeline.resume import SAMPLING_KEYS, first_change
from diffuse.rundir.outputs import check_file_target
from diffuse.scoring.evaluation import Evaluation
from diffuse.scoring.metrics import FEATURE_METRICS, LIKELIHOOD_METRICS, NEEDS_REFERENCE, metric_names, score_sets
from diffuse.signals import Stopped, StopRequest
from diffuse.validate import check_flag, check_number

# n=null with a model: the standard sample count of published FIDs (50000 samples against the training set).
STANDARD_N = 50000

# ---------------------------------------------------------------------------------------------------------- run


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    with StopRequest() as stop:  # from the start: nothing in an evaluation swallows a signal
        return score(cfg, out, stop)


def prepare(cfg: DictConfig, out: Path):
    """What score() refuses from the config alone: (metric names, whether it generates samples, n)."""
    names = metric_names(to_dict(cfg.metric))
    has_model = cfg.ckpt not in (None, "") or cfg.model is not None or cfg.get("cascade") not in (None, "")
    scoring_samples = bool(set(names) & FEATURE_METRICS) or cfg.samples not in (None, "")
    if cfg.samples not in (None, "") and has_model:
        raise UserError("samples= and ckpt=/model= cannot both be given: score existing samples or generate new ones")
    if cfg.samples in (None, "") and not has_model and not cfg.save_ref:
        raise UserError(
            "nothing to evaluate: give ckpt=FILE|RUN_DIR (or model=oracle dataset=gmm) to generate samples, "
            "or samples=DIR|FILE.npz"
        )
    if "is" in names and cfg.metrics.features != "inception":
        raise UserError(
            "--metric is needs metrics.features=inception (the ImageNet classifier's logits), "
            f"not {cfg.metrics.features!r}"
        )
    n = None if cfg.n is None else check_number("n", cfg.n, minimum=1, integer=True)
    check_flag("resume", cfg.resume)
    generating = has_model and scoring_samples
    seeds = check_number("metrics.seeds", cfg.metrics.seeds, minimum=1, integer=True)
    if seeds > 1 and not (has_model and set(names) & FEATURE_METRICS):
        raise UserError(
            f"metrics.seeds={seeds} scores {seeds} sample sets drawn from a model: it needs ckpt= (or model=oracle) "
            f"and a sample metric ({', '.join(sorted(FEATURE_METRICS))}), not samples= or a likelihood alone"
        )
    for metric, key in (("pr", "pr_k"), ("dc", "dc_k")):  # before any sampling: the sets are cut to at most n
        k = cfg.metrics.get(key)
        if (
            metric in names
            and generating
            and n is not None
            and isinstance(k, int)
            and not isinstance(k, bool)
            and k >= n
        ):
            raise UserError(
                f"metrics.{key}={k} is not allowed with n={n}: --metric {metric}'s k-NN radii need more than k "
                f"images in each set (n={k + 1} or more, or a smaller metrics.{key})"
            )
    if cfg.resume and generating:
        check_resume(cfg, out)
    return names, generating, n


def score(cfg: DictConfig, out: Path, stop: StopRequest) -> dict[str, Any]:
    names, generating, n = prepare(cfg, out)
    rt = runtime_of(cfg, images=(n or STANDARD_N) if generating else 0)
    d = distributed.setup(rt.device.type)
    try:
        # Sampling batches are the safe points (their features are kept); any other phase is stopped where it is.
        with stop.immediately():
            ev = Evaluation(
                cfg, rt, d, (n or STANDARD_N) if generating else n, out=out, stop=stop, resume=bool(cfg.resume)
            )
            # Everything that can be refused is checked before the first image is drawn.
            if cfg.save_ref or (ev.shape is not None and set(names) & NEEDS_REFERENCE):
                ev.reference  # noqa: B018
            if ev.shape is not None and set(names) & FEATURE_METRICS:
                ev.extractor.check_shape(ev.shape[0], ev.shape[1])
            if set(names) & LIKELIHOOD_METRICS:
                ev.likelihood_config, ev.likelihood_data  # noqa: B018
            save_resolved_config(cfg, out)
            if cfg.save_ref:
                save_reference(ev, Path(str(cfg.save_ref)).expanduser())
            if ev.shape is None and not set(names) & LIKELIHOOD_METRICS:
                return {}
            values = score_sets(ev, names, int(ev.m["seeds"]) if generating else 1)
    except Stopped:
        return stopped_early(out, stop, d, (n or STANDARD_N) * int(cfg.metrics.seeds) if generating else None)
    finally:
        distributed.teardown(d)
    if not d.main:
        return {}
    result = {"metrics": values, **({"n": ev.n} if ev.shape is not None else {}), **ev.info}
    if not set(names) & FEATURE_METRICS:  # likelihood alone draws no samples: no sampler, steps or n of samples
        result = {
            k: v for k, v in result.items() if k not in ("n", "sampler", "steps", "seed", "nfe", "guidance_scale")
        }
    else:
        result.update({"features": ev.extractor.name, "weights_sha256": ev.extractor.sha256})
    if set(names) & NEEDS_REFERENCE:
        result["reference"] = {
            "source": ev.reference.desc,
            "n": ev.ref_stats.n,
            "kid_features": int(ev.ref_stats.features.shape[0]),
        }
    write_json(out / "metrics.json", result)
    if generating:
        FeatureStore(out / "features").clear()
    print_table(result)
    return result


def check_resume(cfg: DictConfig, out: Path) -> None:
    old_path = out / "config.yaml"
    if not old_path.is_file():
        return
    old, new = to_dict(OmegaConf.load(old_path)), to_dict(cfg)
    # model=oracle is the dataset's mixture; with a checkpoint, dataset is the reference only
    keys = [k for k in SAMPLING_KEYS if k != "dataset"] + (["dataset"] if cfg.model is not None else [])
    precision = ("runtime.precision", (old.get("runtime") or {}).get("precision"), new["runtime"]["precision"])
    change = first_change(old, new, keys, precision)
    if change is not None:
        key, before, now = change
        raise UserError(
            f"resume=true but {old_path} has {key}={before!r} and this run {key}={now!r}: "
            "the features kept would not be this run's samples' (use another hydra.run.dir)"
        )


def stopped_early(out: Path, stop: StopRequest, d: distributed.Dist, n_generated: int | None) -> dict[str, Any]:
    """The line of an evaluation a signal stopped: what it kept (generated samples' features) and how to go on."""
    if not d.main:
        return {"stopped": True}
    if n_generated is None:
        console.print(stop.line("nothing of this evaluation is kept: run it again"), markup=False)
        return {"stopped": True}
    kept = sum(FeatureStore(p).count() for p in [out / "features", *sorted((out / "features").glob("set*"))])
    console.print(
        stop.line(
            f"features of {kept} of {n_generated} generated images kept in {out / 'features'}", "eval", out.resolve()
        ),
        markup=False,
    )
    return {"stopped": True, "kept": kept}


def save_reference(ev: Evaluation, path: Path) -> None:
    """--save-ref PATH: the reference statistics as a file to pass as ref=PATH later."""
    stats = ev.ref_stats  # every rank takes part in computing them
    if ev.d.main:
        image_scores.save_stats(path, stats)
        console.print(f"wrote reference statistics of {ev.reference.desc} ({stats.n} images) to {path}")


def print_table(result: dict) -> None:
    from rich.table import Table

    m = result["metrics"]
    table = Table(title="diffuse eval", title_justify="left")
    for col, justify in (("metric", "left"), ("value", "right"), ("std", "right"), ("s.e. of mean", "right")):
        table.add_column(col, justify=justify)
    for name in [k for k in m if not k.endswith(("_std", "_sem", "_subset_size"))]:
        std, sem = m.get(f"{name}_std"), m.get(f"{name}_sem")
        table.add_row(name, f"{m[name]:.6g}", "" if std is None else f"{std:.3g}", "" if sem is None else f"{sem:.3g}")
    console.print(table)
    bits = [f"n={result['n']}"] if "n" in result else []
    if "likelihood" in result:
        lk = result["likelihood"]
        bits.append(f"likelihood of {lk['data']}: n={lk['n']}, methods={'+'.join(lk['methods'])}")
    bits += [f"{key}={result[key]}" for key in ("features", "sampler", "steps", "nfe", "seed") if key in result]
    if "reference" in result:
        bits.append(f"reference={result['reference']['source']} ({result['reference']['n']} images)")
    console.print(", ".join(bits), markup=False)


def check(cfg: DictConfig, out: Path) -> None:
    """What score() refuses before it computes anything, as far as it goes without the feature extractor and the
    reference (the same for every job of a sweep; the first job checks them before its work): the metrics, the
    samples or the sampling job (the model loaded on the CPU). overrides.check_overrides runs it for every job of a -m
    sweep before the first job starts. Keep it in step with score()."""
    from diffuse.pipeline.config import checking_runtime

    names, generating, n = prepare(cfg, out)
    rt = checking_runtime(runtime_of(cfg, images=(n or STANDARD_N) if generating else 0))
    ev = Evaluation(cfg, rt, distributed.Dist(), (n or STANDARD_N) if generating else n)
    if set(names) & LIKELIHOOD_METRICS:
        ev.likelihood_config  # noqa: B018


# What the command writes into its run dir, and a -m sweep into its sweep dir besides Hydra's multirun.yaml (the
# summary of tasks/sweep_summary.py); rundir.outputs checks them before the work starts.
OUTPUTS = ("features/", "config.yaml", "metrics.json")
SWEEP_OUTPUTS = ("summary.csv", "summary.md", "*_vs_nfe.png")


def check_targets(cfg: DictConfig, out: Path) -> None:
    if cfg.save_ref not in (None, ""):
        check_file_target(Path(str(cfg.save_ref)).expanduser(), "--save-ref")
