"""Features of a set of images, sharded over torchrun ranks: rank r extracts images r, r + world, ... and every
rank ends with all of them in index order (samples), or with their moments and a seeded subset (a reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from diffuse import distributed
from diffuse.checkpoint import read_metadata
from diffuse.console import progress_bar, warn
from diffuse.errors import UserError
from diffuse.images import ImageSource
from diffuse.io import atomic_write, remove_stale_temps
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


def sample_features(
    extractor, src: ImageSource, n: int, d: distributed.Dist, batch_size: int, label: str
) -> dict[str, torch.Tensor]:
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


def reference_features(
    extractor, src: ImageSource, d: distributed.Dist, batch_size: int, keep_max: int, seed: int, label: str
) -> tuple[MomentAccumulator, torch.Tensor]:
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


class FeatureStore:
    """The features of generated samples, kept in the run dir as they are computed so that a stopped eval goes on
    from them (resume=true) instead of drawing those images again: one safetensors file per batch,
    NNNNNNN.safetensors after its first index (index sets never overlap, so no two batches share a name, whatever
    the batch size or world size), holding `indices` and the features, written atomically. Each file names the
    extractor that made it and the batch's NFE."""

    def __init__(self, directory: Path, extractor=None):
        self.dir = Path(directory)
        # None: only to count what is kept.
        self.identity = (
            {"features": extractor.name, "weights_sha256": extractor.sha256, "dim": int(extractor.dim)}
            if extractor
            else {}
        )

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("[0-9]*.safetensors") if p.is_file()) if self.dir.is_dir() else []

    def clear(self) -> None:
        """For a fresh run (resume=false: an earlier run's files are not this run's), and once metrics.json is
        written (the features have done their job; at 50000 Inception images they are 600 MB)."""
        if self.dir.is_dir():
            shutil.rmtree(self.dir)

    def add(self, indices: list[int], feats: dict[str, torch.Tensor], nfe: int) -> None:
        from safetensors.torch import save_file

        tensors = {"indices": torch.tensor(indices, dtype=torch.int64), **{k: v.contiguous() for k, v in feats.items()}}
        meta = {"diffuse.features": json.dumps({**self.identity, "nfe": int(nfe)}, sort_keys=True)}
        atomic_write(
            self.dir / f"{indices[0]:07d}.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta)
        )

    def load(self, wanted: list[int]) -> tuple[list[int], dict[str, torch.Tensor], int]:
        """The kept features of the indices in `wanted`: (their indices, features in that order, the NFE per image
        the files record). A file that does not read whole is passed over with a warning (its images are drawn
        again); one from another extractor is refused."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if self.dir.is_dir():
            remove_stale_temps(self.dir)  # writes a kill interrupted before their rename
        wanted_set, seen = set(wanted), set()
        idx_out, parts, nfe = [], [], 0
        for path in self.files():
            try:
                info = json.loads(read_metadata(path).get("diffuse.features", "null"))
            except UserError as e:
                warn(f"{e}: its images are drawn again")
                continue
            except ValueError as e:
                warn(f"{path} does not read ({e}): its images are drawn again")
                continue
            if not isinstance(info, dict) or {k: info.get(k) for k in self.identity} != self.identity:
                have = (
                    f"features={info.get('features')!r} (weights {str(info.get('weights_sha256'))[:12]})"
                    if isinstance(info, dict)
                    else "an unknown extractor"
                )
                raise UserError(
                    f"resume=true but {path} holds features of {have}, this run uses features={self.identity['features']!r} "
                    f"(weights {self.identity['weights_sha256'][:12]}): keep the same metrics.* settings, or use resume=false"
                )
            try:
                tensors = load_file(str(path))
                indices, pool = tensors.pop("indices"), tensors.get("pool")
                if (
                    indices.dim() != 1
                    or indices.dtype != torch.int64
                    or pool is None
                    or pool.dim() != 2
                    or pool.shape[1] != self.identity["dim"]
                    or any(v.dim() != 2 or len(v) != len(indices) for v in tensors.values())
                ):
                    raise ValueError("its tensors do not fit together")
                indices, batch_nfe = indices.tolist(), int(info.get("nfe", 0))
            except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as e:
                warn(f"{path} does not read ({e}): its images are drawn again")
                continue
            rows = [j for j, i in enumerate(indices) if i in wanted_set and i not in seen]
            if not rows:
                continue
            seen.update(indices[j] for j in rows)
            idx_out += [indices[j] for j in rows]
            parts.append({k: v[rows] for k, v in tensors.items()})
            nfe = max(nfe, batch_nfe)
        return idx_out, cat(parts), nfe

    def count(self) -> int:
        """How many images' features are kept (read from the files' headers)."""
        from safetensors import safe_open

        total = 0
        for path in self.files():
            try:
                with safe_open(str(path), "pt") as f:
                    total += f.get_slice("indices").get_shape()[0]
            except Exception:  # noqa: BLE001 - a count for a message: an unreadable file counts for nothing
                continue
        return total
