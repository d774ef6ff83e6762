"""What an earlier run's config must share with this one for resume=true to keep what it drew: image i of a
sampling job depends only on (seed, i) and these settings, so n and batch_size may change between the two."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Top-level config keys that fix a sampling job's images (dataset: the mixture of model=oracle).
SAMPLING_KEYS = (
    "ckpt",
    "seed",
    "label",
    "labels",
    "use_ema",
    "sampler",
    "steps",
    "guidance",
    "model",
    "dataset",
    "schedule",
    "cascade",
    "condition",
)
# Keys a run dir from before cascades lacks: it drew without them, as the defaults do.
_NEWER_KEYS = ("cascade", "condition")


def first_change(old: dict, new: dict, keys: Iterable[str], *more: tuple[str, Any, Any]) -> tuple[str, Any, Any] | None:
    """The first of `keys` (then of the ready (key, before, now) triples `more`) whose value in the earlier run's
    config `old` differs from this run's `new`, as (key, before, now); None when all agree."""
    triples = [(k, old.get(k, new.get(k)) if k in _NEWER_KEYS else old.get(k), new.get(k)) for k in keys]
    return next(((k, before, now) for k, before, now in [*triples, *more] if before != now), None)
