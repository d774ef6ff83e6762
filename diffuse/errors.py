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
