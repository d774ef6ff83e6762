"""The errors a user can fix: reported as one line with an exit code, never a traceback."""


class UserError(Exception):
    """Bad input: a value, file or option the user supplied. The message is shown as it is; exit code 2, and
    what the job wrote is removed (nothing half-written) unless `keep_outputs` is set."""

    exit_code = 2
    keep_outputs = False


class RunStopped(UserError):
    """A run that cannot go on (e.g. non-finite losses in a row): one line, exit code 3, and what it wrote
    (its checkpoints) is kept so that it can be inspected or resumed."""

    exit_code = 3
    keep_outputs = True


def check_number(name: str, value, *, minimum=None, maximum=None, integer: bool = False, exclusive_min: bool = False):
    """`value` itself, or one clear line for a value of the wrong type or out of range."""
    import math

    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)) or (not integer and not math.isfinite(value)):
        raise UserError(f"{name}={value!r} is not allowed: it must be {kind}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        raise UserError(f"{name}={value!r} is not allowed: it must be {'>' if exclusive_min else '>='} {minimum}")
    if maximum is not None and value > maximum:
        raise UserError(f"{name}={value!r} is not allowed: it must be <= {maximum}")
    return value


def check_choice(name: str, value, allowed):
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not allowed: choose one of {', '.join(map(str, allowed))}")
    return value
