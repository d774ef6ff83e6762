"""A checkpoint's `condition` record (user input: a training run's config or a checkpoint's copy of it) checked
against its resolution, and the refusal of a super-resolution model where one that samples from noise is needed.
Loading any model needs these, and the cascade builds on them: they sit below both."""

from __future__ import annotations

from diffuse.errors import UserError
from diffuse.validate import check_flag

CONDITIONS = ("none", "lowres")


def check_condition(cond: dict | None, resolution: int, where: str = "") -> dict | None:
    """A `condition` config (a training run's, or a checkpoint's copy: user input) against the high resolution: None
    for no conditioning, else the checked lowres keys and the upsampling `factor`."""
    prefix = f"{where}: " if where else ""
    if cond is None or (isinstance(cond, dict) and cond.get("name") == "none"):
        return None
    if not isinstance(cond, dict):
        raise UserError(f"{prefix}condition is {type(cond).__name__}, not a mapping of condition.* keys")
    if cond.get("name") not in CONDITIONS:
        raise UserError(f"{prefix}condition={cond.get('name')!r} is not allowed: choose one of {', '.join(CONDITIONS)}")
    low = cond.get("from_resolution")
    if isinstance(low, bool) or not isinstance(low, int) or not 1 <= low < resolution or resolution % low:
        raise UserError(
            f"{prefix}condition.from_resolution={low!r} is not allowed: it must be an integer below "
            f"dataset.resolution={resolution} that divides it (the upsampling factor is a whole number)"
        )
    for key in ("aug_max", "aug_level"):
        v = cond.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise UserError(
                f"{prefix}condition.{key}={v!r} is not allowed: it must be a number in [0, 1] "
                "(the augmentation level: 0 the image itself, 1 pure noise)"
            )
    check_flag(f"{prefix}condition.truncated", cond.get("truncated"))
    return {
        "name": "lowres",
        "from_resolution": low,
        "aug_max": float(cond["aug_max"]),
        "aug_level": float(cond["aug_level"]),
        "truncated": cond["truncated"],
        "factor": resolution // low,
    }


class SuperResRefusal(UserError):
    """A super-resolution checkpoint where a model that samples from noise is needed (load_cascade rewords it)."""


def superres_refusal(conf: dict, where: str) -> UserError:
    """The line for a super-resolution checkpoint given where a model that samples from noise is needed."""
    cond = conf.get("condition") if isinstance(conf.get("condition"), dict) else {}
    res = (conf.get("model") or {}).get("resolution") if isinstance(conf.get("model"), dict) else None
    what = f" ({cond.get('from_resolution')} -> {res})" if res else ""
    return SuperResRefusal(
        f"{where} is a super-resolution model{what}: it samples given a low-resolution image; use "
        f"diffuse sample cascade=[BASE,{where}], or diffuse upsample ckpt={where} --image PATH"
    )
