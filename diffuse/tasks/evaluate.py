"""diffuse eval: samples (generated from ckpt=/model=oracle, or read from samples=) + reference -> features ->
FID / KID / IS -> metrics.json and a table; or a model + the dataset's held-out split -> bits/dim (bpd) or
nats/dim (nll) by the variational bound and the probability-flow ODE.

Metrics are a dict name -> function(Evaluation) -> {column: value}; the function takes what it needs from the
Evaluation's lazily computed parts (sample features, reference statistics, the denoiser, ...). Under torchrun
every rank runs them in the same order, so the collective steps inside those parts line up; rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffuse import distributed
from diffuse.errors import UserError
from diffuse.images import to_uint8
from diffuse.tasks.common import autocast_dtype, check_number, console, pick_device, save_resolved_config, to_dict, write_json

STATS_VERSION = 1
DEFAULT_N = 50000


# ----------------------------------------------------------------------------------------------- image sources

@dataclass
class ImageSource:
    """uint8 images C x H x W by index, from an array in memory or files read on demand."""

    desc: str
    n: int
    shape: tuple[int, int, int]
    array: Optional[torch.Tensor] = None  # N x C x H x W uint8
    files: Optional[list[Path]] = None

    def batch(self, idx: list[int]) -> torch.Tensor:
        if self.array is not None:
            return self.array[idx]
        return torch.stack([_read_png(self.files[i], self.shape[0]) for i in idx])


def _read_png(path: Path, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    t = torch.from_numpy(arr.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def open_images(value: Any, what: str) -> ImageSource:
    """A samples.npz (ADM style), a folder of PNGs, or a `diffuse sample` run dir (its samples.npz, else images/)."""
    p = Path(str(value)).expanduser()
    if not p.exists():
        raise UserError(f"{what}={str(value)!r} does not exist")
    if p.is_dir():
        if (p / "samples.npz").is_file():
            return read_npz(p / "samples.npz")
        if (p / "images").is_dir() and not _pngs(p):
            p = p / "images"
        return read_png_folder(p, what)
    if p.suffix.lower() == ".npz":
        return read_npz(p)
    raise UserError(f"{what}={str(value)!r} is neither a .npz file nor a folder of PNG images")


def read_npz(path: Path) -> ImageSource:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise UserError(f"{path}: no arr_0 in the npz (ADM-style samples: arr_0 uint8 N x H x W x C)")
            a = z["arr_0"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if a.dtype != np.uint8:
        raise UserError(f"{path}: arr_0 is {a.dtype}; samples must be uint8 N x H x W x C (as diffuse sample save_npz=true writes)")
    if a.ndim == 3:  # N x H x W: grayscale without a channel axis
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or a.shape[0] < 1:
        raise UserError(f"{path}: arr_0 has shape {a.shape}; samples must be uint8 N x H x W x C with C = 1 or 3")
    # Contiguous N x C x H x W: a channels-last view would send convolutions down other kernels (other rounding).
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()
    return ImageSource(f"{path}", t.shape[0], tuple(t.shape[1:]), array=t)


def _pngs(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == ".png" and f.is_file())


def read_png_folder(folder: Path, what: str) -> ImageSource:
    """Every *.png directly in `folder`, sorted by name. All must have one size and channel count (grayscale
    "L" images are 1 channel; every other mode is read as RGB, alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    files = _pngs(folder)
    if not files:
        raise UserError(f"{what}={str(folder)!r} holds no .png images")
    shape = None
    for f in files:
        try:
            with Image.open(f) as im:
                s = (1 if im.mode == "L" else 3, im.height, im.width)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{f}: not a readable image ({type(e).__name__})") from None
        if shape is None:
            shape, first = s, f
        elif s != shape:
            raise UserError(f"{f} is {_fmt(s)} but {first.name} is {_fmt(shape)}: all images of {what}= must have one size and channel count")
    return ImageSource(f"{folder}", len(files), shape, files=files)


def _fmt(shape) -> str:
    c, h, w = shape
    return f"{h}x{w} with {c} channel{'s' if c != 1 else ''}"


# --------------------------------------------------------------------------------------------------- reference

@dataclass
class Reference:
    desc: str
    shape: Optional[tuple[int, int, int]]
    stats_file: Optional[Path] = None
    load: Optional[Callable[[], ImageSource]] = None
    key: Optional[dict] = None  # what identifies the images, for the statistics cache


def resolve_reference(cfg: DictConfig) -> Reference:
    """ref=: a statistics .safetensors, a folder of PNGs, or a dataset config name (its train split);
    null: the dataset= of this run."""
    from diffuse.data import DATASETS

    value = cfg.get("ref")
    if value in (None, ""):
        if cfg.get("dataset") is None:
            raise UserError(f"ref= is required: a dataset name ({', '.join(sorted(DATASETS))}), a folder of PNGs or a statistics .safetensors")
        return _dataset_reference(to_dict(cfg.dataset))
    text = str(value)
    p = Path(text).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        from diffuse.metrics.image_scores import stats_metadata

        meta = stats_metadata(p)  # the header only: the tensors are read when the statistics are used
        return Reference(f"{p} ({meta.get('source', '?')})", tuple(meta["shape"]) if meta.get("shape") else None, stats_file=p)
    if p.is_dir():
        src = open_images(p, "ref")
        fp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.files] if src.files else [src.desc, os.stat(src.desc).st_mtime_ns]
        key = {"folder": str(p.resolve()), "content": hashlib.sha256(json.dumps(fp).encode()).hexdigest()}
        return Reference(f"folder {p}", src.shape, load=lambda: src, key=key)
    if text in DATASETS:
        dcfg = _dataset_config(text)
        if cfg.get("dataset") is not None and cfg.dataset.get("name") == text:
            dcfg.update(to_dict(cfg.dataset))  # dataset.root=... and other overrides of this run apply
        return _dataset_reference(dcfg)
    if p.suffix == ".safetensors" or "/" in text:
        raise UserError(f"ref={text!r} does not exist")
    raise UserError(f"ref={text!r} is not allowed: give a dataset name ({', '.join(sorted(DATASETS))}), a folder of PNGs or a statistics .safetensors")


def _dataset_config(name: str) -> dict:
    from importlib.resources import files

    return dict(OmegaConf.to_container(OmegaConf.load(str(files("diffuse.conf") / "dataset" / f"{name}.yaml")), resolve=True))


def _dataset_reference(dcfg: dict) -> Reference:
    from diffuse.data import build_dataset, dataset_shape

    dcfg = {**dcfg, "flip": False}
    if "split" in dcfg:
        dcfg["split"] = "train"
    c, r, _ = dataset_shape(DictConfig(dcfg))
    # Where the files are and how they are fetched does not change the images.
    key = {"dataset": {k: v for k, v in dcfg.items() if k not in ("root", "download", "url", "flip", "verify")}}

    def load() -> ImageSource:
        ds = build_dataset(DictConfig(dcfg))
        images = ds.images if ds.is_8bit else to_uint8(ds.images)
        return ImageSource(f"dataset {dcfg['name']}", len(ds), tuple(images.shape[1:]), array=images)

    split = f", {dcfg['split']} split" if "split" in dcfg else ""
    return Reference(f"dataset {dcfg['name']}{split}", (c, r, r), load=load, key=key)


# --------------------------------------------------------------------------------------------------- evaluation

class Evaluation:
    """What the metrics draw on, each part built on first use and then kept."""

    def __init__(self, cfg: DictConfig, device: torch.device, d: distributed.Dist):
        self.cfg, self.device, self.d = cfg, device, d
        self.m = _metrics_cfg(cfg)
        self.info: dict[str, Any] = {}
        self.generator: Optional[dict] = None
        self.samples: Optional[ImageSource] = None
        if cfg.get("samples") not in (None, ""):
            self.samples = open_images(cfg.samples, "samples")
            self.n = self._n_of_samples()
            self.shape = self.samples.shape
            self.info.update({"samples": self.samples.desc, **_sample_json(Path(str(cfg.samples)).expanduser())})
        elif cfg.get("ckpt") not in (None, "") or cfg.get("model") is not None:
            self._setup_generator()
        else:
            self.shape = None

    @cached_property
    def likelihood_cfg(self) -> dict:
        return _likelihood_cfg(self.cfg)

    @cached_property
    def likelihood_model(self):
        """(denoiser in float32, schedule, null label or None, source): forward-mode AD (the ODE's traces) does
        not go through autocast, and the bound's small-t terms are sensitive to eps errors."""
        from diffuse.tasks.sample import load_denoiser

        if self.cfg.get("ckpt") in (None, "") and self.cfg.get("model") is None:
            raise UserError("--metric bpd/nll needs the model: ckpt=FILE|RUN_DIR (or model=oracle dataset=gmm)")
        den, shape, schedule, _, num_classes, source = load_denoiser(self.cfg, self.device, None)
        self.likelihood_shape = tuple(shape)
        y_null = num_classes if (num_classes and source.get("model") != "oracle") else None
        return den, schedule, y_null, source

    @cached_property
    def likelihood_mixture(self):
        from diffuse.data import build_mixture

        return build_mixture(self.cfg.dataset)

    @cached_property
    def likelihood_data(self) -> tuple[torch.Tensor, str]:
        """The dataset's held-out data in [-1, 1]: split=test where the dataset has splits; for the generated
        datasets (gmm, shapes) a fresh draw with seed + 1, which training (seed) never saw; a folder as it is."""
        from diffuse.data import build_dataset, dataset_shape
        from diffuse.images import from_uint8

        if self.cfg.get("dataset") is None:
            raise UserError("--metric bpd/nll needs dataset=NAME: the data whose likelihood is measured (its test split)")
        dcfg = {**to_dict(self.cfg.dataset), "flip": False}
        if "split" in dcfg:
            dcfg["split"] = "test"
            what = "test split"
        elif "seed" in dcfg:
            dcfg["seed"] = int(dcfg["seed"]) + 1
            what = f"held-out draw, seed {dcfg['seed']}"
        else:
            what = "all of it"
        c, r, _ = dataset_shape(DictConfig(dcfg))
        self.likelihood_model  # noqa: B018 (sets likelihood_shape)
        if (c, r, r) != self.likelihood_shape:
            raise UserError(f"dataset={dcfg['name']} is {_fmt((c, r, r))}, the model takes {_fmt(self.likelihood_shape)}: they must match")
        ds = build_dataset(DictConfig(dcfg))
        n = self.likelihood_cfg.get("n")
        if n is not None and n > len(ds):
            raise UserError(f"likelihood.n={n} is more than the {len(ds)} images of dataset {dcfg['name']} ({what})")
        images = ds.images[: n or len(ds)]
        x = from_uint8(images) if ds.is_8bit else images.float()
        return x, f"dataset {dcfg['name']} ({what})"

    def _n_of_samples(self) -> int:
        n = self.cfg.get("n")
        if n is None:
            return self.samples.n
        check_number("n", n, minimum=1, integer=True)
        if n > self.samples.n:
            raise UserError(f"n={n} is more than the {self.samples.n} images in samples={self.samples.desc}")
        return n

    def _setup_generator(self) -> None:
        from diffuse.tasks.sample import guide, load_denoiser, resolve_steps, sample_labels, sampler_call

        cfg = self.cfg
        self.n = check_number("n", cfg.n if cfg.get("n") is not None else DEFAULT_N, minimum=1, integer=True)
        check_number("batch_size", cfg.batch_size, minimum=1, integer=True)
        seed = check_number("seed", cfg.seed, integer=True)
        dtype = autocast_dtype(cfg.get("precision", "auto"), self.device)
        den, shape, schedule, clip_default, num_classes, source = load_denoiser(cfg, self.device, dtype)
        sampler_cfg = to_dict(cfg.sampler)
        steps = resolve_steps(sampler_cfg, cfg.get("steps"), schedule.T)
        sampler_call(sampler_cfg, steps, schedule, clip_default)
        labels = sample_labels(cfg, self.n, num_classes, source)
        den = guide(den, cfg, num_classes, schedule)
        self.shape = tuple(shape)
        self.generator = dict(denoiser=den, shape=tuple(shape), schedule=schedule, sampler_cfg=sampler_cfg, steps=steps,
                              seed=seed, clip_default=clip_default, labels=labels)
        self.info.update({"sampler": sampler_cfg.get("name"), "steps": steps, "seed": seed, **source})
        if labels is not None:
            self.info["guidance_scale"] = float((to_dict(cfg.get("guidance")) or {}).get("scale", 1.0))

    @cached_property
    def extractor(self):
        from diffuse.metrics import features as fx

        name = self.m["features"]
        if name == "inception":
            from diffuse.metrics.inception import find_weights, load_inception

            path = find_weights(self.m.get("inception_weights"), download=self.m.get("download", True))
            net, sha = load_inception(path, self.m.get("inception_sha256"))
            return fx.InceptionFeatures(net, sha, self.device)
        if name == "checkpoint":
            from diffuse.checkpoint import content_hash, load_checkpoint, resolve_ckpt_path
            from diffuse.tasks.sample import network_from_checkpoint

            if self.m.get("features_ckpt") in (None, ""):
                raise UserError("metrics.features=checkpoint needs metrics.features_ckpt=FILE|RUN_DIR: a diffuse checkpoint trained on the reference data")
            ckpt = load_checkpoint(resolve_ckpt_path(self.m["features_ckpt"]))
            net, _, _, _ = network_from_checkpoint(ckpt)
            return fx.NetworkFeatures(net, content_hash(net.state_dict()), self.device)
        raise UserError(f"metrics.features={name!r} is not allowed: choose one of {', '.join(fx.EXTRACTORS)}")

    @cached_property
    def reference(self) -> Reference:
        ref = resolve_reference(self.cfg)
        if self.shape is not None and ref.shape is not None and tuple(ref.shape) != tuple(self.shape):
            raise UserError(
                f"the samples are {_fmt(self.shape)}, the reference {ref.desc} is {_fmt(ref.shape)}: "
                "samples and reference must have the same resolution and channel count"
            )
        if ref.shape is not None:
            self.extractor.check_shape(ref.shape[0], ref.shape[1])
        return ref

    @cached_property
    def ref_stats(self):
        from diffuse.metrics.image_scores import RefStats, load_stats, save_stats

        ref, ex = self.reference, self.extractor
        if ref.stats_file is not None:
            stats = load_stats(ref.stats_file)
            got = (stats.meta.get("features"), stats.meta.get("weights_sha256"))
            if got != (ex.name, ex.sha256):
                raise UserError(
                    f"{ref.stats_file} was computed with features={got[0]} (weights {str(got[1])[:12]}), this run uses "
                    f"features={ex.name} (weights {ex.sha256[:12]}): recompute it with diffuse eval --save-ref"
                )
            return stats
        key = {**ref.key, "features": ex.name, "weights_sha256": ex.sha256, "kid_ref_max": self.m["kid_ref_max"],
               "seed": self.m["seed"], "version": STATS_VERSION}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        cache = Path(str(self.m["cache_dir"])).expanduser() / f"{ex.name}-{digest}.safetensors" if self.m.get("cache", True) else None
        if cache is not None and cache.is_file():
            if self.d.main:
                console.print(f"reference statistics from the cache: {cache}")
            return load_stats(cache)
        src = ref.load()
        feats, kept, acc = self._extract(src, list(range(src.n)), f"reference features ({src.n} images)", moments=True)
        mu, sigma = acc.mean_cov()
        meta = {"n": src.n, "features": ex.name, "weights_sha256": ex.sha256, "shape": list(src.shape),
                "source": ref.desc, "kid_ref_max": self.m["kid_ref_max"], "key": key}
        stats = RefStats(mu, sigma, kept, meta)
        if cache is not None and self.d.main:
            save_stats(cache, stats)
            console.print(f"reference statistics cached in {cache}")
        return stats

    @cached_property
    def features(self) -> dict[str, torch.Tensor]:
        """Features of the n samples, in index order, on every rank."""
        if self.samples is not None:
            out, _, _ = self._extract(self.samples, list(range(self.n)), f"sample features ({self.n} images)")
            return out
        if self.generator is None:
            raise UserError("nothing to evaluate: give ckpt=FILE|RUN_DIR (or model=oracle dataset=gmm) to generate samples, or samples=DIR|FILE.npz")
        from diffuse.tasks.sample import generate

        g, d = self.generator, self.d
        mine = list(range(d.rank, self.n, d.world))
        chunks: list[dict[str, torch.Tensor]] = []
        stats: dict = {}
        labels = g["labels"][mine] if g["labels"] is not None else None
        generate(g["denoiser"], n=self.n, shape=g["shape"], schedule=g["schedule"], sampler_cfg=g["sampler_cfg"], steps=g["steps"],
                 seed=g["seed"], device=self.device, batch_size=int(self.cfg.batch_size), clip_default=g["clip_default"],
                 labels=labels, indices=mine, progress=d.main, stats=stats, keep=False,
                 on_batch=lambda start, x0: chunks.append(self._features_of(to_uint8(x0))))
        self.info["nfe"] = stats.get("nfe", 0)
        return _assemble(distributed.gather((mine, _cat(chunks)), d), self.n)

    def _features_of(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [self.extractor(chunk) for chunk in images.split(int(self.m["batch_size"]))]
        return _cat(parts)

    def _extract(self, src: ImageSource, indices: list[int], label: str, moments: bool = False):
        """Features of src[indices] sharded over ranks: (all features in order or None, the KID subset, moments)."""
        from diffuse.metrics.image_scores import MomentAccumulator
        from diffuse.tasks.sample import _progress

        d, bs = self.d, int(self.m["batch_size"])
        mine = indices[d.rank :: d.world]
        keep: set[int] = set()
        if moments:  # the reference: moments over all, features kept for a seeded random subset only
            g = torch.Generator().manual_seed(int(self.m["seed"]))
            keep = set(torch.tensor(indices)[torch.randperm(len(indices), generator=g)[: int(self.m["kid_ref_max"])]].tolist())
        acc, chunks, kept_idx, kept = MomentAccumulator(), [], [], []
        with _progress(d.main) as bar:
            task = bar.add_task(label, total=len(indices))
            for s in range(0, len(mine), bs):
                idx = mine[s : s + bs]
                f = self.extractor(src.batch(idx))
                if moments:
                    acc.add(f["pool"])
                    sel = [j for j, i in enumerate(idx) if i in keep]
                    kept_idx += [idx[j] for j in sel]
                    kept.append(f["pool"][sel])
                else:
                    chunks.append(f)
                bar.advance(task, len(idx) * d.world)
        if not moments:
            return _assemble(distributed.gather((mine, _cat(chunks)), d), len(indices)), None, None
        parts = distributed.gather((acc, kept_idx, torch.cat(kept) if kept else torch.empty(0, self.extractor.dim)), d)
        total, order, rows = MomentAccumulator(), [], []
        for a, ki, kf in parts:
            total.merge(a)
            order += ki
            rows.append(kf)
        rows = torch.cat(rows)[torch.tensor(order).argsort()] if order else torch.empty(0, self.extractor.dim)
        return None, rows, total


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def _assemble(parts: list, n: int) -> dict[str, torch.Tensor]:
    """Rank r's features of images r, r + world, ... put back in index order."""
    out: dict[str, torch.Tensor] = {}
    for idx, feats in parts:
        for k, v in feats.items():
            if k not in out:
                out[k] = torch.empty(n, v.shape[1], dtype=v.dtype)
            out[k][idx] = v
    return out


def _sample_json(p: Path) -> dict:
    """sampler/steps/NFE/seed of samples written by diffuse sample (its sample.json beside them)."""
    for cand in (p / "sample.json", p.parent / "sample.json"):  # a sample run dir; its samples.npz or images/
        if cand.is_file():
            try:
                info = json.loads(cand.read_text())
            except ValueError:
                return {}
            return {k: info[k] for k in ("sampler", "steps", "nfe", "seed", "ckpt", "model", "guidance_scale") if k in info}
    return {}


# ------------------------------------------------------------------------------------------------------ metrics

def _fid(ev: Evaluation) -> dict[str, float]:
    from diffuse.metrics.image_scores import fid

    feats, dim = ev.features["pool"], ev.extractor.dim
    if ev.d.main and min(len(feats), ev.ref_stats.n) <= dim:
        console.print(f"warning: FID from {min(len(feats), ev.ref_stats.n)} images of {dim}-d features: the covariance is singular "
                      f"and the value unreliable; use more than {dim} images (50000 is the standard)", markup=False)
    return {"fid": fid(ev.ref_stats, feats)}


def _kid(ev: Evaluation) -> dict[str, float]:
    from diffuse.metrics.image_scores import kid

    mean, std, size = kid(ev.ref_stats.features, ev.features["pool"], subsets=ev.m["kid_subsets"],
                          subset_size=ev.m["kid_subset_size"], seed=ev.m["seed"])
    return {"kid": mean, "kid_std": std, "kid_subset_size": size}


def _is(ev: Evaluation) -> dict[str, float]:
    from diffuse.metrics.image_scores import inception_score

    mean, std = inception_score(ev.features["logits"], splits=ev.m["is_splits"], seed=ev.m["seed"])
    return {"is": mean, "is_std": std}


# ---------------------------------------------------------------------------------------------------- likelihood

def _likelihood(ev: Evaluation, kind: str) -> dict[str, float]:
    """bits/dim of 8-bit data (kind="bpd") or nats/dim of continuous data (kind="nll") of the dataset's held-out
    split, by the variational bound and by the probability-flow ODE (diffuse.metrics.likelihood). Example i's
    noise, probes and dequantization depend only on (likelihood.seed, i), so the figures do not depend on the
    batch size or the number of ranks. Class-conditional networks are scored unconditionally (the null label)."""
    from diffuse.diffusion.noise import PerSample
    from diffuse.metrics import likelihood as lk
    from diffuse.tasks.sample import _progress

    lc, (den, schedule, y_null, source) = ev.likelihood_cfg, ev.likelihood_model
    x, desc = ev.likelihood_data
    if kind == "bpd":  # the 8-bit grid: continuous data (gmm) is quantized first, as an image file would be
        from diffuse.images import from_uint8

        x = from_uint8(to_uint8(x))
    d, bs = ev.d, lc["batch_size"]
    mine = list(range(d.rank, x.shape[0], d.world))
    methods = lc["methods"]
    per: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    with _progress(d.main) as bar:
        tasks = {m: bar.add_task(f"{kind} by the {'variational bound' if m == 'vlb' else 'probability-flow ODE'}", total=x.shape[0]) for m in methods}
        for s in range(0, len(mine), bs):
            idx = mine[s : s + bs]
            xb = x[idx].to(ev.device)
            y = None if y_null is None else torch.full((len(idx),), y_null, dtype=torch.long, device=ev.device)
            for m in methods:
                gen = PerSample(lc["seed"], idx)
                if m == "vlb":
                    fn = lk.vlb_bpd if kind == "bpd" else lk.vlb_nll
                    v = fn(den, xb, schedule, y=y, generator=gen, variance=lc["variance"], batch_t=lc["batch_t"])
                else:
                    fn = lk.ode_bpd if kind == "bpd" else lk.ode_nll
                    v = fn(den, xb, schedule, y=y, generator=gen, hutchinson=lc["hutchinson"], probe=lc["probe"],
                           steps=lc["ode_steps"], sigma_min=lc["sigma_min"])
                per[m].append(v)
                bar.advance(tasks[m], len(idx) * d.world)
    out: dict[str, float] = {}
    for m in methods:
        mine_v = torch.cat(per[m]) if per[m] else torch.empty(0, dtype=torch.float64)
        allv = torch.cat([v for v in distributed.gather(mine_v, d)])
        out[f"{kind}_{m}"] = float(allv.mean())
        out[f"{kind}_{m}_sem"] = float(allv.std() / allv.numel() ** 0.5) if allv.numel() > 1 else float("nan")
    if kind == "nll" and source.get("model") == "oracle":
        from diffuse.metrics.mixture import mixture_nll

        out["nll_exact"] = float(mixture_nll(ev.likelihood_mixture, x).mean())
    ev.info["likelihood"] = {"data": desc, "n": int(x.shape[0]), **{k: lc[k] for k in ("methods", "variance", "ode_steps", "hutchinson", "probe", "sigma_min", "seed")}}
    return out


LIKELIHOOD_METHODS = ("vlb", "ode")


def _likelihood_cfg(cfg: DictConfig) -> dict:
    from diffuse.metrics.likelihood import PROBES, VARIANCES

    lc = dict(to_dict(cfg.get("likelihood")) or {})
    if lc.get("n") is not None:
        check_number("likelihood.n", lc["n"], minimum=1, integer=True)
    for key in ("batch_size", "batch_t", "ode_steps"):
        check_number(f"likelihood.{key}", lc.get(key), minimum=1, integer=True)
    check_number("likelihood.hutchinson", lc.get("hutchinson"), minimum=0, integer=True)
    check_number("likelihood.seed", lc.get("seed"), integer=True)
    check_number("likelihood.sigma_min", lc.get("sigma_min"), minimum=0, exclusive_min=True)
    methods = [lc.get("methods")] if isinstance(lc.get("methods"), str) else list(lc.get("methods") or [])
    bad = [m for m in methods if m not in LIKELIHOOD_METHODS]
    if not methods or bad:
        raise UserError(f"likelihood.methods={methods!r} is not allowed: a list of {', '.join(LIKELIHOOD_METHODS)}")
    lc["methods"] = list(dict.fromkeys(methods))
    if lc.get("variance") not in VARIANCES:
        raise UserError(f"likelihood.variance={lc.get('variance')!r} is not allowed: choose one of {', '.join(VARIANCES)}")
    if lc.get("probe") not in PROBES:
        raise UserError(f"likelihood.probe={lc.get('probe')!r} is not allowed: choose one of {', '.join(PROBES)}")
    return lc


# name -> function(Evaluation) -> {column: value}.
METRICS: dict[str, Callable[[Evaluation], dict[str, float]]] = {
    "fid": _fid, "kid": _kid, "is": _is,
    "bpd": lambda ev: _likelihood(ev, "bpd"), "nll": lambda ev: _likelihood(ev, "nll"),
}
LIKELIHOOD_METRICS = {"bpd", "nll"}
# Metrics computed from extracted features: their reference, shapes and extractor are checked before any work.
FEATURE_METRICS = {"fid", "kid", "is"}
NEEDS_REFERENCE = {"fid", "kid"}


def metric_names(value: Any) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if not names:
        raise UserError(f"no metric given: use --metric with one of {', '.join(METRICS)}")
    for name in names:
        if name not in METRICS:
            raise UserError(f"--metric {name} is not allowed: choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def _metrics_cfg(cfg: DictConfig) -> dict:
    m = dict(to_dict(cfg.get("metrics")) or {})
    for key, minimum in (("batch_size", 1), ("kid_subsets", 1), ("kid_subset_size", 2), ("kid_ref_max", 2), ("is_splits", 1)):
        check_number(f"metrics.{key}", m.get(key), minimum=minimum, integer=True)
    check_number("metrics.seed", m.get("seed"), integer=True)
    sha = m.get("inception_sha256")
    if sha not in (None, "") and (not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha)):
        raise UserError(f"metrics.inception_sha256={sha!r} is not allowed: 64 hex digits, or null to skip the check")
    return m


# ---------------------------------------------------------------------------------------------------------- run

def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    names = metric_names(cfg.get("metric"))
    save_ref = cfg.get("save_ref")
    has_model = cfg.get("ckpt") not in (None, "") or cfg.get("model") is not None
    if cfg.get("samples") not in (None, "") and has_model:
        raise UserError("samples= and ckpt=/model= cannot both be given: score existing samples or generate new ones")
    if cfg.get("samples") in (None, "") and not has_model and not save_ref:
        raise UserError("nothing to evaluate: give ckpt=FILE|RUN_DIR (or model=oracle dataset=gmm) to generate samples, or samples=DIR|FILE.npz")
    if "is" in names and cfg.metrics.get("features") != "inception":
        raise UserError(f"--metric is needs metrics.features=inception (the ImageNet classifier's logits), not {cfg.metrics.get('features')!r}")
    device = pick_device(cfg.get("device", "auto"))
    d = distributed.setup(device.type)
    try:
        ev = Evaluation(cfg, device, d)
        scoring = ev.shape is not None
        # Everything that can be refused is checked before the first image is drawn.
        if save_ref or (scoring and set(names) & NEEDS_REFERENCE):
            ref = ev.reference
        if scoring and set(names) & FEATURE_METRICS:
            ev.extractor.check_shape(ev.shape[0], ev.shape[1])
        if set(names) & LIKELIHOOD_METRICS:
            ev.likelihood_cfg, ev.likelihood_data  # noqa: B018 (their refusals come before any work)
        save_resolved_config(cfg, out)
        if save_ref:
            from diffuse.metrics.image_scores import save_stats

            if d.main:
                save_stats(Path(str(save_ref)).expanduser(), ev.ref_stats)
                console.print(f"wrote reference statistics of {ref.desc} ({ev.ref_stats.n} images) to {save_ref}")
            else:
                ev.ref_stats
        if not scoring:
            return {}
        values: dict[str, Any] = {}
        for name in names:
            values.update(METRICS[name](ev))
    finally:
        distributed.teardown(d)
    if not d.main:
        return {}
    result = {"metrics": values, "n": ev.n, **ev.info}
    if not set(names) & FEATURE_METRICS:  # likelihood alone draws no samples: no sampler, steps or n of samples
        result = {k: v for k, v in result.items() if k not in ("n", "sampler", "steps", "seed", "nfe", "guidance_scale")}
    if set(names) & FEATURE_METRICS:
        result.update({"features": ev.extractor.name, "weights_sha256": ev.extractor.sha256})
    if set(names) & NEEDS_REFERENCE:
        result["reference"] = {"source": ev.reference.desc, "n": ev.ref_stats.n, "kid_features": int(ev.ref_stats.features.shape[0])}
    write_json(out / "metrics.json", result)
    _print_table(result)
    return result


def _print_table(result: dict) -> None:
    from rich.table import Table

    m = result["metrics"]
    table = Table(title="diffuse eval", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("std", justify="right")
    table.add_column("s.e. of mean", justify="right")
    for name in [k for k in m if not k.endswith(("_std", "_sem", "_subset_size"))]:
        std, sem = m.get(f"{name}_std"), m.get(f"{name}_sem")
        table.add_row(name, f"{m[name]:.6g}", "" if std is None else f"{std:.3g}", "" if sem is None else f"{sem:.3g}")
    console.print(table)
    bits = [f"n={result['n']}"] if "n" in result else []
    if "likelihood" in result:
        lk = result["likelihood"]
        bits.append(f"likelihood of {lk['data']}: n={lk['n']}, methods={'+'.join(lk['methods'])}")
    for key in ("features", "sampler", "steps", "nfe", "seed"):
        if key in result:
            bits.append(f"{key}={result[key]}")
    if "reference" in result:
        bits.append(f"reference={result['reference']['source']} ({result['reference']['n']} images)")
    console.print(", ".join(bits), markup=False)
