"""The terminal: one console for results (stdout), one for warnings and errors (stderr), and the progress bar
every long loop shows (sampling, feature extraction, likelihood, training)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def progress_bar(enabled: bool = True, *fields: ProgressColumn) -> Progress:
    """description | bar | done/total | *fields | elapsed | eta. Disabled on ranks other than 0."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *fields,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def warn(message: str) -> None:
    err_console.print(f"warning: {message}", markup=False, soft_wrap=True)
