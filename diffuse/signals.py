"""SIGTERM and SIGINT as a request to stop: a command installs one `StopRequest` as its job starts and checks
`requested` at its safe points (after a training step, a sampling batch, an inpainted image), where it keeps what is
complete and exits 0 with one line saying how to go on. A second SIGINT aborts at once (KeyboardInterrupt).

A phase with no safe point inside it (a likelihood estimate, reference statistics) runs under `immediately()`: a
signal there stops it where it is by raising `Stopped` (writes are atomic, so nothing is left half-written), and a
cluster's SIGTERM is never swallowed by a long loop that cannot look."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# The process-wide request of the CLI (handle_early), between and before the commands' own.
_early: StopRequest | None = None


class Stopped(Exception):
    """A command stopped by a signal at a safe point; the message says what was kept and how to continue. Not a
    failure: the task prints the message and returns, so the exit code is 0."""


class StopRequest:
    """Installed for the length of a `with` block; `requested` turns true on the first SIGTERM or SIGINT.

    Off the main thread (signals cannot be handled there) nothing is installed and `requested` stays false."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict = {}
        self._modes: list[bool] = []  # innermost last: True raises Stopped from the handler

    def __enter__(self) -> StopRequest:
        if _early is not None and _early is not self and _early.requested:  # made before this job started
            self.requested, self.signum = True, _early.signum
        for sig in SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        if self.requested and _early is not None and _early is not self:
            # The next job of a -m sweep in this process stops at its start, as the user asked of the process.
            _early.requested, _early.signum = True, _early.signum or self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = not self.requested
        self.requested, self.signum = True, self.signum or signum
        if first and self._modes and self._modes[-1]:
            raise Stopped(f"stopped by {self.name}")

    def line(self, what: str, command: str | None = None, out=None) -> str:
        """The one line a stopped command prints: what it kept, and the command line that continues it."""
        line = f"stopped by signal ({self.name}): {what}"
        if command:
            line += (
                f"; continue with: diffuse {command} resume=true hydra.run.dir={out} (and this run's other overrides)"
            )
        return line

    @contextmanager
    def immediately(self) -> Iterator[None]:
        """A phase that cannot look at `requested`: a signal during it raises Stopped where the code is (a
        request made before it raises at once)."""
        with self._mode(True):
            yield

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A phase inside an immediate one that looks at `requested` at its safe points: a signal only sets it.
        Back in the immediate phase, a request made meanwhile raises Stopped."""
        with self._mode(False):
            yield

    @contextmanager
    def _mode(self, immediate: bool) -> Iterator[None]:
        if immediate and self.requested:
            raise Stopped(f"stopped by {self.name}")
        self._modes.append(immediate)
        try:
            yield
        finally:
            self._modes.pop()
        if self.requested and self._modes and self._modes[-1]:
            raise Stopped(f"stopped by {self.name}")


def handle_early() -> None:
    """Take SIGTERM/SIGINT from here on (the CLI calls it before Hydra composes anything): a signal before the
    command's job has installed its own StopRequest is held for it, so that the job stops at its first safe point
    (training: at step 0, with a checkpoint) instead of the process dying with nothing to resume. A second SIGINT
    still aborts."""
    global _early
    if _early is None:
        _early = StopRequest().__enter__()
