"""diffuse eval: samples (generated from ckpt=/model=oracle, or read from samples=) + reference -> features ->
FID / KID / IS -> metrics.json and a table; or a model + the dataset's held-out split -> bits/dim (bpd) or
nats/dim (nll) by the variational bound and the probability-flow ODE.

Metrics are a dict name -> function(Evaluation) -> {column: value}; each takes what it needs from the
Evaluation's parts, built on first use (sample features, reference statistics, the likelihood model). Under
torchrun every rank runs them in the same order, so the collective steps inside those parts line up; rank 0 writes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import distributed
from diffuse.console import console
from diffuse.errors import UserError
from diffuse.images import describe_shape, from_uint8, open_images, sample_info, to_uint8
from diffuse.io import write_json
from diffuse.metrics import image_scores, likelihood, manifold
from diffuse.metrics.extraction import FeatureStore, assemble, cat, features_in_chunks, sample_features
from diffuse.metrics.features import build_extractor, check_metrics_config
from diffuse.metrics.references import Reference, reference_stats, resolve_reference
from diffuse.pipeline.runtime import Runtime
from diffuse.pipeline.sampling import CountingDenoiser
from diffuse.rundir.outputs import check_file_target
from diffuse.signals import Stopped, StopRequest
from diffuse.tasks.common import dataset_config, job_of, model_of, runtime_of, save_resolved_config, to_dict
from diffuse.validate import check_number

# n=null with a model: the standard sample count of published FIDs (50000 samples against the training set).
STANDARD_N = 50000


class Evaluation:
    """What the metrics draw on, each part built on first use and then kept."""

    def __init__(
        self,
        cfg: DictConfig,
        rt: Runtime,
        d: distributed.Dist,
        n: int | None,
        *,
        out: Path | None = None,
        stop: StopRequest | None = None,
        resume: bool = False,
    ):
        self.cfg, self.rt, self.d, self.n = cfg, rt, d, n
        # out: where generated samples' features are kept as they are computed (None: not kept); stop: looked at
        # between sampling batches; resume: go on from the features kept in out.
        self.out, self.stop, self.resume = out, stop, resume
        # Where the generated samples' features are kept; another sample set (metrics.seeds) keeps its own below it.
        self.features_dir = out / "features" if out is not None else None
        self.m = check_metrics_config(to_dict(cfg.metrics))
        self.info: dict[str, Any] = {}
        self.samples = self.job = None
        self.shape: tuple | None = None
        if cfg.samples not in (None, ""):
            self.samples = open_images(cfg.samples, "samples")
            if n is not None and n > self.samples.n:
                raise UserError(f"n={n} is more than the {self.samples.n} images in samples={self.samples.desc}")
            self.n, self.shape = n or self.samples.n, self.samples.shape
            self.info.update({"samples": self.samples.desc, **sample_info(Path(str(cfg.samples)).expanduser())})
        elif n is not None:
            check_number("batch_size", cfg.batch_size, minimum=1, integer=True)
            self.job = job_of(cfg, rt, n)
            self.shape = self.job.model.image_shape  # a latent model's samples are decoded: FID is on images
            self.info.update(self.job.info())

    @cached_property
    def extractor(self):
        return build_extractor(self.m, self.rt.device)

    @cached_property
    def reference(self) -> Reference:
        def named_dataset(name: str) -> dict:
            # ref=NAME of a dataset drawn at any size (shapes, the padded/resized ones): at the samples' resolution,
            # as a model trained on it at dataset.resolution=N makes them; dataset=NAME dataset.resolution=M overrides.
            dcfg = dataset_config(name)
            if self.shape is not None and "resolution" in dcfg:
                dcfg["resolution"] = int(self.shape[-1])
            return dcfg

        ref = resolve_reference(self.cfg.ref, to_dict(self.cfg.dataset), named_dataset)
        if self.shape is not None and ref.shape is not None and tuple(ref.shape) != tuple(self.shape):
            raise UserError(
                f"the samples are {describe_shape(self.shape)}, the reference {ref.desc} is {describe_shape(ref.shape)}: "
                "samples and reference must have the same resolution and channel count"
            )
        if ref.shape is not None:
            self.extractor.check_shape(ref.shape[0], ref.shape[1])
        return ref

    @cached_property
    def ref_stats(self) -> image_scores.RefStats:
        return reference_stats(self.reference, self.extractor, self.m, self.d)

    @cached_property
    def features(self) -> dict[str, torch.Tensor]:
        """Features of the n samples, in index order, on every rank."""
        bs = int(self.m["batch_size"])
        if self.samples is not None:
            return sample_features(
                self.extractor, self.samples, self.n, self.d, bs, f"sample features ({self.n} images)"
            )
        mine = list(range(self.d.rank, self.n, self.d.world))
        store = FeatureStore(self.features_dir, self.extractor) if self.features_dir is not None else None
        kept_idx, kept, kept_nfe = store.load(mine) if store and self.resume else ([], {}, 0)
        if store and not self.resume:
            if self.d.main:
                store.clear()
            distributed.any_rank(False, self.d, self.rt.device)  # no rank writes before the clearing is done
        done = set(kept_idx)
        todo = [i for i in mine if i not in done]
        if self.resume and self.d.main:
            console.print(f"resume: features of {len(done)} image(s) kept, {len(todo)} to draw")
        indices, chunks = list(kept_idx), [kept] if kept_idx else []
        counter = CountingDenoiser(self.job.denoiser)
        calls_before = [0]

        def on_batch(start: int, x0: torch.Tensor) -> None:
            idx = todo[start : start + len(x0)]
            feats = features_in_chunks(self.extractor, to_uint8(x0), bs)
            if store:
                store.add(idx, feats, counter.calls - calls_before[0])
            calls_before[0] = counter.calls
            indices.extend(idx)
            chunks.append(feats)

        job = dataclasses.replace(self.job, denoiser=counter)
        with self.stop.deferred() if self.stop else nullcontext():
            drawn = job.generate(
                todo,
                device=self.rt.device,
                batch_size=self.cfg.batch_size,
                progress=self.d.main,
                keep=False,
                fixed_shape=self.rt.compile and not self.job.model.is_oracle,
                on_batch=on_batch,
                stop=self.stop,
            )
            # Every rank stops if one does, before the gather they would share; the finished batches are kept.
            if distributed.any_rank(drawn.stopped, self.d, self.rt.device):
                raise Stopped("sampling")
        parts = distributed.gather((indices, cat(chunks), max(drawn.nfe, kept_nfe)), self.d)
        self.info["nfe"] = max(p[2] for p in parts)  # a rank that found all its features kept drew none
        return assemble([(i, f) for i, f, _ in parts], self.n)

    def another_set(self, k: int) -> Evaluation:
        """Sample set k of metrics.seeds: the same model, sampler and reference (extractor and statistics shared),
        its images drawn with seed + k, its features kept in features/set{k}."""
        ev = copy.copy(self)
        ev.__dict__.pop("features", None)
        ev.info = dict(self.info)
        ev.job = _with_seed(self.job, self.job_seed + k)
        ev.info["seed"] = self.job_seed + k
        ev.features_dir = self.features_dir / f"set{k}" if self.features_dir is not None else None
        return ev

    @property
    def job_seed(self) -> int:
        return int(self.job.seed if hasattr(self.job, "seed") else self.job.base.seed)

    @cached_property
    def likelihood_config(self) -> dict:
        return likelihood.check_likelihood_config(to_dict(self.cfg.likelihood))

    @cached_property
    def likelihood_model(self):
        """The model in float32, uncompiled: forward-mode AD (the ODE's traces) goes through neither autocast nor
        a compiled graph, and the bound's small-t terms are sensitive to eps errors."""
        if self.cfg.ckpt in (None, "") and self.cfg.model is None:
            raise UserError("--metric bpd/nll needs the model: ckpt=FILE|RUN_DIR (or model=oracle dataset=gmm)")
        model = model_of(self.cfg, dataclasses.replace(self.rt, autocast=None, compile=False, cuda_graphs=False))
        if model.autoencoder is not None:
            raise UserError(
                f"--metric bpd/nll is not defined for a latent model (ckpt={self.cfg.ckpt}): its bound is on the "
                "latents, not on the images' pixels; score it with --metric fid/kid"
            )
        return model

    @cached_property
    def likelihood_data(self) -> tuple[torch.Tensor, str]:
        """The dataset's held-out data in [-1, 1]: split=test where the dataset has splits; for the generated
        datasets (gmm, shapes) a fresh draw with seed + 1, which training (seed) never saw; a folder as it is."""
        from diffuse.data import build_dataset, dataset_shape, held_out

        if self.cfg.dataset is None:
            raise UserError(
                "--metric bpd/nll needs dataset=NAME: the data whose likelihood is measured (its test split)"
            )
        dcfg, what = held_out(to_dict(self.cfg.dataset))
        c, r, _ = dataset_shape(dcfg)
        if (c, r, r) != tuple(self.likelihood_model.shape):
            raise UserError(
                f"dataset={dcfg['name']} is {describe_shape((c, r, r))}, the model takes {describe_shape(self.likelihood_model.shape)}: they must match"
            )
        ds = build_dataset(dcfg)
        n = self.likelihood_config["n"]
        if n is not None and n > len(ds):
            raise UserError(f"likelihood.n={n} is more than the {len(ds)} images of dataset {dcfg['name']} ({what})")
        images = ds.images[: n or len(ds)]
        return (from_uint8(images) if ds.is_8bit else images.float()), f"dataset {dcfg['name']} ({what})"


# ------------------------------------------------------------------------------------------------------ metrics


def _fid(ev: Evaluation) -> dict[str, float]:
    feats, dim = ev.features["pool"], ev.extractor.dim
    if ev.d.main and min(len(feats), ev.ref_stats.n) <= dim:
        console.print(
            f"warning: FID from {min(len(feats), ev.ref_stats.n)} images of {dim}-d features: the covariance is singular "
            f"and the value unreliable; use more than {dim} images (50000 is the standard)",
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
    out = likelihood.score(
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
        "variance": likelihood.resolve_variance(lc["variance"], learned),
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
FEATURE_METRICS = {
    "fid",
    "kid",
    "is",
    "fd",
    "pr",
    "dc",
}  # their reference, shapes and extractor are checked before any work
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


def _with_seed(job, seed: int):
    """The sampling job drawing with another seed (a cascade's seed is its base stage's)."""
    if any(f.name == "seed" for f in dataclasses.fields(job)):
        return dataclasses.replace(job, seed=seed)
    return dataclasses.replace(job, base=dataclasses.replace(job.base, seed=seed))


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
            "nothing to evaluate: give ckpt=FILE|RUN_DIR (or model=oracle dataset=gmm) to generate samples, or samples=DIR|FILE.npz"
        )
    if "is" in names and cfg.metrics.features != "inception":
        raise UserError(
            f"--metric is needs metrics.features=inception (the ImageNet classifier's logits), not {cfg.metrics.features!r}"
        )
    n = None if cfg.n is None else check_number("n", cfg.n, minimum=1, integer=True)
    if not isinstance(cfg.resume, bool):
        raise UserError(f"resume={cfg.resume!r} is not allowed: true or false")
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


# What must be the same for resume=true to keep the features of an earlier run's samples (n and batch_size may
# change: image i depends only on (seed, i)); the feature extractor is checked on each kept file.
RESUME_KEYS = (
    "ckpt",
    "seed",
    "label",
    "labels",
    "use_ema",
    "sampler",
    "steps",
    "guidance",
    "model",
    "schedule",
    "cascade",
    "condition",
)


def check_resume(cfg: DictConfig, out: Path) -> None:
    old_path = out / "config.yaml"
    if not old_path.is_file():
        return
    old, new = to_dict(OmegaConf.load(old_path)), to_dict(cfg)
    # A run dir from before cascades has no cascade/condition keys: it drew without them, as the defaults do.
    keys = [
        (k, old.get(k, new.get(k)) if k in ("cascade", "condition") else old.get(k), new.get(k)) for k in RESUME_KEYS
    ]
    if cfg.model is not None:  # model=oracle is the dataset's mixture; with a checkpoint, dataset is the reference only
        keys.append(("dataset", old.get("dataset"), new.get("dataset")))
    keys.append(("runtime.precision", (old.get("runtime") or {}).get("precision"), new["runtime"]["precision"]))
    for key, before, now in keys:
        if before != now:
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
    samples or the sampling job (the model loaded on the CPU). cli.check_overrides runs it for every job of a -m
    sweep before the first job starts. Keep it in step with score()."""
    from diffuse.tasks.common import checking_runtime

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
