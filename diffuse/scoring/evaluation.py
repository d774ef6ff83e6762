"""What diffuse eval's metrics draw on (`Evaluation`), each part built on first use and then kept: the samples' features
(read from samples= or generated, kept in features/ as they are drawn for resume=true), the reference and its
statistics, the likelihood model and its held-out data. Under torchrun every rank builds the parts in the same
order, so the collective steps inside them line up."""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from diffuse import distributed
from diffuse.console import console
from diffuse.errors import UserError
from diffuse.images import describe_shape, from_uint8, open_images, sample_info, to_uint8
from diffuse.metrics import image_scores
from diffuse.metrics.extraction import FeatureStore, assemble, cat, features_in_chunks, sample_features
from diffuse.metrics.features import build_extractor, check_metrics_config
from diffuse.metrics.likelihood.scoring import check_likelihood_config
from diffuse.metrics.references import Reference, reference_stats, resolve_reference
from diffuse.pipeline.config import dataset_config, job_of, model_of, to_dict
from diffuse.pipeline.runtime import Runtime
from diffuse.pipeline.sampling import CountingDenoiser
from diffuse.signals import Stopped, StopRequest
from diffuse.validate import check_number


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
                f"the samples are {describe_shape(self.shape)}, the reference {ref.desc} is "
                f"{describe_shape(ref.shape)}: "
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
        return check_likelihood_config(to_dict(self.cfg.likelihood))

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
                f"dataset={dcfg['name']} is {describe_shape((c, r, r))}, the model takes "
                f"{describe_shape(self.likelihood_model.shape)}: they must match"
            )
        ds = build_dataset(dcfg)
        n = self.likelihood_config["n"]
        if n is not None and n > len(ds):
            raise UserError(f"likelihood.n={n} is more than the {len(ds)} images of dataset {dcfg['name']} ({what})")
        images = ds.images[: n or len(ds)]
        return (from_uint8(images) if ds.is_8bit else images.float()), f"dataset {dcfg['name']} ({what})"


def _with_seed(job, seed: int):
    """The sampling job drawing with another seed (a cascade's seed is its base stage's)."""
    if any(f.name == "seed" for f in dataclasses.fields(job)):
        return dataclasses.replace(job, seed=seed)
    return dataclasses.replace(job, base=dataclasses.replace(job.base, seed=seed))
