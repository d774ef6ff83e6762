"""The one family of value checks every layer uses: each returns the value it checked, or raises a UserError of
one line, `NAME=VALUE is not allowed: WHAT IS`. NAME is the key as the user knows it (`sampler.eta`,
`model.ch_mult`, `FILE: model.ch`), so a message never blames a key the user did not type."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from diffuse.errors import UserError


def refuse(name: str, value: Any, allowed: str) -> UserError:
    """The error every check raises: for checks of several keys at once, where no function below fits."""
    return UserError(f"{name}={value!r} is not allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(name: str, value, *, minimum=None, maximum=None, integer: bool = False, exclusive_min: bool = False):
    """A finite number (an integer with integer=True) within optional bounds."""
    if not (_is_int(value) if integer else _is_number(value)):
        raise refuse(name, value, f"it must be {'an integer' if integer else 'a number'}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        raise refuse(name, value, f"it must be {'>' if exclusive_min else '>='} {minimum}")
    if maximum is not None and value > maximum:
        raise refuse(name, value, f"it must be <= {maximum}")
    return value


def check_choice(name: str, value, allowed: Iterable):
    allowed = tuple(allowed)
    if value not in allowed:
        raise refuse(name, value, f"choose one of {', '.join(map(str, allowed))}")
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise refuse(name, value, "true or false")
    return value


def check_int_in(name: str, value, lo: int, hi: int, why: str = "") -> int:
    """An integer from lo to hi (inclusive); `why` says where the bound comes from."""
    if not _is_int(value) or not lo <= value <= hi:
        raise refuse(name, value, f"it must be an integer from {lo} to {hi:,}" + (f" ({why})" if why else ""))
    return value


def check_optional_int_in(name: str, value, lo: int, hi: int, null_means: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not lo <= value <= hi:
        raise refuse(name, value, f"it must be null ({null_means}) or an integer from {lo} to {hi:,}")
    return value


def check_positive_int(name: str, value, maximum: int | None = None) -> int:
    if not _is_int(value) or value < 1 or (maximum is not None and value > maximum):
        raise refuse(name, value, "it must be a positive integer" + (f" up to {maximum:,}" if maximum else ""))
    return value


def check_number_in(name: str, value, lo: float, hi: float, *, hi_open: bool, lo_open: bool = False) -> float:
    """A finite number in an interval, each end open or closed, named as such: [0, 1)."""
    ok = _is_number(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise refuse(
            name, value, f"it must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        )
    return value


def check_int_list(name: str, value, lo: int, hi: int, max_len: int, *, nonempty: bool) -> list[int]:
    ok = isinstance(value, (list, tuple)) and (len(value) >= 1 or not nonempty) and len(value) <= max_len
    if not (ok and all(_is_int(x) and lo <= x <= hi for x in value)):
        size = f"1 to {max_len}" if nonempty else f"at most {max_len}"
        raise refuse(name, value, f"it must be a list of {size} integers, each from {lo} to {hi:,}")
    return list(value)
