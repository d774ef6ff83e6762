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
