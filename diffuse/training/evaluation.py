"""trainer.eval_every=K: the EMA model scored every K steps, by the same parts `diffuse eval` uses (the metrics group's
extractor, the training dataset's reference statistics, its cache, the FID), on samples drawn through the
pipeline's generate. Under torchrun every rank draws and extracts its share (images r, r + world, ...) and every
rank gets the score; rank 0 writes it."""

from __future__ import annotations

import time

import torch

from diffuse import distributed
from diffuse.console import console
from diffuse.errors import UserError
from diffuse.images import to_uint8
from diffuse.pipeline.sampling import generate, plan_sampler
from diffuse.validate import check_number

# Below this many samples per feature dimension FID's small-sample bias dominates differences between checkpoints
# (it falls like 1/n); at or below one per dimension the sample covariance is singular.
SAMPLES_PER_DIM = 5


def check_eval_config(t: dict, metrics: dict | None) -> None:
    every = check_number("trainer.eval_every", t["eval_every"], minimum=0, integer=True)
    seeds = metrics["seeds"] if metrics is not None else 1  # diffuse train alone has the metrics group
    if seeds != 1:  # the metrics group is eval's; this one key has no meaning in training, and silence would mislead
        raise UserError(
            f"metrics.seeds={seeds!r} is diffuse eval's protocol (min and mean over sample sets): the in-training "
            "evaluation draws one set from fixed seeds; leave it 1 here"
        )
    if not every:
        return
    check_number("trainer.eval_n", t["eval_n"], minimum=2, integer=True)
    check_number("trainer.eval_batch_size", t["eval_batch_size"], minimum=1, integer=True)
    if t["eval_steps"] is not None:
        check_number("trainer.eval_steps", t["eval_steps"], minimum=1, integer=True)
    if metrics is None:
        raise UserError(
            f"trainer.eval_every={every} is not available in this command: in-training evaluation is diffuse train's"
        )
    from diffuse.metrics.features import check_metrics_config

    check_metrics_config(metrics)


class InTrainingEval:
    """FID (with metrics.features' extractor) of trainer.eval_n EMA samples against the training data."""

    def __init__(self, trainer, metrics: dict, extractor):
        from diffuse.data import dataset_shape
        from diffuse.diffusion.inpainting import MaskConditioned
        from diffuse.metrics.references import dataset_reference, reference_stats

        t = trainer.tcfg
        self.trainer, self.m = trainer, metrics
        self.n, self.batch_size = int(t["eval_n"]), int(t["eval_batch_size"])
        # The EMA network is updated in place: its denoiser is built once.
        self.denoiser = trainer.objective.denoiser(
            MaskConditioned(trainer.ema) if trainer.mask_probs is not None else trainer.ema, trainer.amp
        )
        steps = t["eval_steps"] or trainer.objective.grid_steps(trainer.step) or t["sample_steps"]
        learned = (
            getattr(self.denoiser, "variance_output", None) if getattr(self.denoiser, "learn_sigma", False) else None
        )
        extra = {"learned_variance": learned} if learned is not None else {}
        self.plan = plan_sampler(trainer.sampler_cfg, steps, trainer.schedule, trainer.data.is_8bit, **extra)
        # Latent diffusion draws latents and scores the images they decode to, against the image dataset.
        self.latent = getattr(trainer, "latent", None)
        channels, resolution, _ = dataset_shape(trainer.config["dataset"])
        self.extractor = extractor
        self.extractor.check_shape(channels, resolution)
        main = trainer.dist.main
        if main:
            console.print(
                f"in-training evaluation every {t['eval_every']} steps: FID of {self.n} EMA samples "
                f"({self.plan.name}, {self.plan.describe_steps()}), {self.extractor.name} features",
                markup=False,
            )
        self.ref_stats = reference_stats(
            dataset_reference(trainer.config["dataset"]), self.extractor, metrics, trainer.dist
        )
        dim, ref_n = self.extractor.dim, self.ref_stats.n
        if main and min(self.n, ref_n) <= dim:
            console.print(
                f"warning: trainer.eval_n={self.n} (reference {ref_n} images) with {dim}-d {self.extractor.name} "
                f"features: the covariance is singular and the FID unreliable; use more than {dim}",
                markup=False,
            )
        elif main and self.n < SAMPLES_PER_DIM * dim:
            console.print(
                f"warning: trainer.eval_n={self.n} is under {SAMPLES_PER_DIM}x the {dim} feature dimensions: FID is "
                f"biased upward at small n, so compare it only between evaluations of the same n (diffuse eval "
                f"with n=50000 gives the standard figure)",
                markup=False,
            )

    @torch.no_grad()
    def __call__(self) -> dict:
        """{"fid", "n", "features", "sampler", "steps", "nfe", "seconds"}; the training's random streams are left
        as they were (a resumed run is bit for bit the same with or without evaluations)."""
        from diffuse.metrics.extraction import assemble, cat, features_in_chunks
        from diffuse.metrics.image_scores import fid

        tr, d = self.trainer, self.trainer.dist
        start = time.perf_counter()
        devices = [tr.device] if tr.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            mine = list(range(d.rank, self.n, d.world))
            k = tr.data.num_classes if tr.net.num_classes else 0
            labels = (
                torch.tensor([i % k for i in mine]) if k else None
            )  # the classes in turn, as the sample grid has them
            chunks: list[dict] = []
            extra = {"decode": self.latent.decode} if self.latent is not None else {}
            drawn = generate(
                self.denoiser,
                self.plan,
                shape=(tr.data.channels, tr.data.resolution, tr.data.resolution),
                seed=tr.tcfg["seed"],
                device=tr.device,
                batch_size=self.batch_size,
                indices=mine,
                labels=labels,
                progress=False,
                keep=False,
                **extra,
                on_batch=lambda s, x0: chunks.append(
                    features_in_chunks(self.extractor, to_uint8(x0), int(self.m["batch_size"]))
                ),
            )
            feats = assemble(distributed.gather((mine, cat(chunks)), d), self.n)
        return {
            "fid": fid(self.ref_stats, feats["pool"]),
            "n": self.n,
            "features": self.extractor.name,
            "sampler": self.plan.name,
            "steps": self.plan.steps,
            "nfe": drawn.nfe,
            "seconds": round(time.perf_counter() - start, 3),
        }


# Extractors whose weights are the user's own checkpoint: any trouble with them is a refusal, not a skipped evaluation.
OWN_WEIGHTS = ("checkpoint", "classifier")


def build_eval(trainer, metrics: dict | None) -> InTrainingEval | None:
    """The evaluation of trainer.eval_every, or None: when it is 0, or when a pretrained extractor's weights (the
    FID Inception's) cannot be had offline, which leaves the run training without it (one line says so, at the
    start, as diffuse eval refuses in one line)."""
    from diffuse.metrics.features import build_extractor

    every = trainer.tcfg["eval_every"]
    if not every:
        return None
    try:
        extractor = build_extractor(metrics, trainer.device)
    except UserError as e:
        # a weights file the user named (metrics.inception_weights=, metrics.dinov2_weights=) is theirs as well
        named = metrics.get(f"{metrics['features']}_weights") not in (None, "")
        if metrics["features"] in OWN_WEIGHTS or named:
            raise
        if trainer.dist.main:
            console.print(
                f"warning: trainer.eval_every={every}: no in-training evaluation in this run: {e}; or "
                "metrics.features=classifier metrics.features_ckpt=RUN for data far from ImageNet",
                markup=False,
            )
        return None
    return InTrainingEval(trainer, metrics, extractor)
