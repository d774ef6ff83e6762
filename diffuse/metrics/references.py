"""What samples are scored against (`ref=`): a dataset's train split, a folder of PNGs, an ADM-style reference
npz, or a statistics file; and their statistics, computed once and cached by what identifies the images, the
extractor and its weights."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffuse import distributed
from diffuse.console import console
from diffuse.errors import UserError
from diffuse.images import ImageSource, open_images, read_npz, to_uint8
from diffuse.metrics.extraction import reference_features
from diffuse.metrics.image_scores import RefStats, load_stats, save_stats, stats_metadata

# Bumped when the statistics of the same images would come out differently: older cache entries are not reused.
STATS_VERSION = 1
# Where the files are and how they are fetched does not change a dataset's images.
LOCATION_KEYS = ("root", "download", "url", "flip", "verify")


@dataclass
class Reference:
    desc: str
    shape: tuple[int, int, int] | None
    stats_file: Path | None = None  # precomputed statistics, or
    load: Callable[[], ImageSource] | None = None  # the images, read when their statistics are not cached
    key: dict | None = None  # what identifies the images, for the statistics cache


def resolve_reference(value, dataset: dict | None, dataset_config: Callable[[str], dict]) -> Reference:
    """ref=: a statistics .safetensors, an ADM-style .npz, a folder of PNGs, or a dataset name (its train split,
    with this run's dataset.* overrides when `dataset` is the same one; dataset_config(name) gives the others);
    null: `dataset`, this run's."""
    from diffuse.data import DATASETS

    allowed = f"a dataset name ({', '.join(sorted(DATASETS))}), a folder of PNGs, an ADM-style .npz or a statistics .safetensors"
    if value in (None, ""):
        if dataset is None:
            raise UserError(f"ref= is required: {allowed}")
        return dataset_reference(dataset)
    text = str(value)
    p = Path(text).expanduser()
    if p.exists():
        return path_reference(p)
    if text in DATASETS:
        return dataset_reference(dataset if dataset is not None and dataset["name"] == text else dataset_config(text))
    if p.suffix in (".safetensors", ".npz") or "/" in text:
        raise UserError(f"ref={text!r} does not exist")
    raise UserError(f"ref={text!r} is not allowed: give {allowed}")


def dataset_reference(dcfg: dict) -> Reference:
    """A dataset's train split (where it has splits), unflipped, built by the same code as training."""
    from diffuse.data import build_dataset, dataset_shape

    dcfg = {**dcfg, "flip": False}
    if "split" in dcfg:
        dcfg["split"] = "train"
    c, r, _ = dataset_shape(dcfg)
    key = {"dataset": {k: v for k, v in dcfg.items() if k not in LOCATION_KEYS}}

    def load() -> ImageSource:
        ds = build_dataset(dcfg)
        images = ds.images if ds.is_8bit else to_uint8(ds.images)
        return ImageSource(f"dataset {dcfg['name']}", len(ds), tuple(images.shape[1:]), array=images)

    split = f", {dcfg['split']} split" if "split" in dcfg else ""
    return Reference(f"dataset {dcfg['name']}{split}", (c, r, r), load=load, key=key)


def path_reference(p: Path) -> Reference:
    """An existing statistics .safetensors, ADM-style .npz (arr_0 uint8 N x H x W x C) or folder of PNGs."""
    if p.is_file() and p.suffix == ".safetensors":
        meta = stats_metadata(p)  # the header only: the tensors are read when the statistics are used
        return Reference(
            f"{p} ({meta.get('source', '?')})", tuple(meta["shape"]) if meta.get("shape") else None, stats_file=p
        )
    if p.is_file() and p.suffix.lower() == ".npz":
        src = read_npz(p)
        st = p.stat()
        return Reference(
            f"npz {p}", src.shape, load=lambda: src, key=_content_key(p, [(p.name, st.st_size, st.st_mtime_ns)])
        )
    if p.is_dir():
        src = open_images(p, "ref")
        fp = (
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.files]
            if src.files
            else [src.desc, os.stat(src.desc).st_mtime_ns]
        )
        return Reference(f"folder {p}", src.shape, load=lambda: src, key=_content_key(p, fp))
    raise UserError(
        f"ref={str(p)!r} is neither a statistics .safetensors, an ADM-style .npz nor a folder of PNG images"
    )


def _content_key(p: Path, fingerprint: list) -> dict:
    return {"folder": str(p.resolve()), "content": hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()}


def reference_stats(ref: Reference, extractor, m: dict, d: distributed.Dist) -> RefStats:
    """The reference's statistics under `extractor`: from its statistics file (refused if made with another
    extractor or weights), the cache in metrics.cache_dir, or computed (and then cached)."""
    if ref.stats_file is not None:
        stats = load_stats(ref.stats_file)
        got = (stats.meta.get("features"), stats.meta.get("weights_sha256"))
        if got != (extractor.name, extractor.sha256):
            raise UserError(
                f"{ref.stats_file} was computed with features={got[0]} (weights {str(got[1])[:12]}), this run uses "
                f"features={extractor.name} (weights {extractor.sha256[:12]}): recompute it with diffuse eval --save-ref"
            )
        return stats
    key = {
        **ref.key,
        "features": extractor.name,
        "weights_sha256": extractor.sha256,
        "kid_ref_max": m["kid_ref_max"],
        "seed": m["seed"],
        "version": STATS_VERSION,
    }
    if getattr(extractor, "input_scale", 1.0) != 1.0:  # an EDM feature network reads c_in x: other features than x
        key["input_scale"] = extractor.input_scale
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(str(m["cache_dir"])).expanduser() / f"{extractor.name}-{digest}.safetensors" if m["cache"] else None
    if cache is not None and cache.is_file():
        if d.main:
            console.print(f"reference statistics from the cache: {cache}")
        return load_stats(cache)
    src = ref.load()
    acc, kept = reference_features(
        extractor,
        src,
        d,
        int(m["batch_size"]),
        int(m["kid_ref_max"]),
        int(m["seed"]),
        f"reference features ({src.n} images)",
    )
    mu, sigma = acc.mean_cov()
    meta = {
        "n": src.n,
        "features": extractor.name,
        "weights_sha256": extractor.sha256,
        "shape": list(src.shape),
        "source": ref.desc,
        "kid_ref_max": m["kid_ref_max"],
        "key": key,
    }
    stats = RefStats(mu, sigma, kept, meta)
    if cache is not None and d.main:
        save_stats(cache, stats)
        console.print(f"reference statistics cached in {cache}")
    return stats
