"""Features of a set of images, sharded over torchrun ranks: rank r extracts images r, r + world, ... and every
rank ends with all of them in index order (samples), or with their moments and a seeded subset (a reference)."""

from __future__ import annotations

import torch

from diffuse import distributed
from diffuse.console import progress_bar
from diffuse.images import ImageSource
from diffuse.metrics.image_scores import MomentAccumulator


def cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def assemble(parts: list, n: int) -> dict[str, torch.Tensor]:
    """[(indices, features)] of every rank put back in index order."""
    out: dict[str, torch.Tensor] = {}
    for idx, feats in parts:
        for k, v in feats.items():
            if k not in out:
                out[k] = torch.empty(n, v.shape[1], dtype=v.dtype)
            out[k][idx] = v
    return out


def features_in_chunks(extractor, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Features of uint8 images, `batch_size` at a time through the extractor."""
    return cat([extractor(chunk) for chunk in images.split(batch_size)])


def sample_features(extractor, src: ImageSource, n: int, d: distributed.Dist, batch_size: int, label: str) -> dict[str, torch.Tensor]:
    """Features of src[0..n-1], in index order, on every rank."""
    mine = list(range(d.rank, n, d.world))
    chunks = []
    with progress_bar(d.main) as bar:
        task = bar.add_task(label, total=n)
        for s in range(0, len(mine), batch_size):
            idx = mine[s : s + batch_size]
            chunks.append(extractor(src.batch(idx)))
            bar.advance(task, len(idx) * d.world)
    return assemble(distributed.gather((mine, cat(chunks)), d), n)


def reference_features(extractor, src: ImageSource, d: distributed.Dist, batch_size: int, keep_max: int, seed: int,
                       label: str) -> tuple[MomentAccumulator, torch.Tensor]:
    """The moments of all of src's pool features, and the features of a seeded random subset of `keep_max` images
    (in index order) for KID, gathered on every rank."""
    indices = list(range(src.n))
    mine = indices[d.rank :: d.world]
    g = torch.Generator().manual_seed(seed)
    keep = set(torch.tensor(indices)[torch.randperm(len(indices), generator=g)[:keep_max]].tolist())
    acc, kept_idx, kept = MomentAccumulator(), [], []
    with progress_bar(d.main) as bar:
        task = bar.add_task(label, total=src.n)
        for s in range(0, len(mine), batch_size):
            idx = mine[s : s + batch_size]
            pool = extractor(src.batch(idx))["pool"]
            acc.add(pool)
            sel = [j for j, i in enumerate(idx) if i in keep]
            kept_idx += [idx[j] for j in sel]
            kept.append(pool[sel])
            bar.advance(task, len(idx) * d.world)
    parts = distributed.gather((acc, kept_idx, torch.cat(kept) if kept else torch.empty(0, extractor.dim)), d)
    total, order, rows = MomentAccumulator(), [], []
    for a, ki, kf in parts:
        total.merge(a)
        order += ki
        rows.append(kf)
    rows = torch.cat(rows)[torch.tensor(order).argsort()] if order else torch.empty(0, extractor.dim)
    return total, rows
