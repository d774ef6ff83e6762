"""The error a user can fix: reported as one line with exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input: a value, file or option the user supplied. The message is shown as it is."""
