"""One run dir, one live process: RUN/.lock, held with flock(2) for as long as a command writes into RUN.

The kernel drops a flock when its holder exits, however it exits (SIGKILL included): a lock file that is there
but held by nobody was left by a run that died, and is taken over with one warning line. The file names its
holder (pid, host, command, start time) for the line a second process gets when it is refused. A holder that
ends normally removes the file.

Under torchrun the ranks of one job are one owner: rank 0 takes the lock and tells the other ranks, through the
torchrun agent's key-value store, whether it got it; they follow its verdict, so a refused job exits 2 on every
rank (without that store, e.g. another launcher, rank 0 alone decides and the other ranks do not look). The
same store lets a bad-input error be printed once for the job, with exit 2 from every rank (exit_with).

Every `-m` job locks its own dir, and the sweep its sweep dir (SweepLock, a Hydra callback) before Hydra writes
multirun.yaml there. Only writers lock: reading a run dir (ckpt=RUN, samples=RUN) needs no lock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from hydra.experimental.callback import Callback

from diffuse.errors import UserError

try:
    import fcntl
except ImportError:  # no flock on this platform: the pid check below stands in for it
    fcntl = None

LOCK_NAME = ".lock"

# errno values of a file system that does not do flock (some network and FUSE file systems).
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


@dataclass
class RunLock:
    run_dir: Path
    fd: int | None = None  # None: a torchrun rank > 0, which shares rank 0's claim without holding the file

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        path = self.run_dir / LOCK_NAME
        try:
            # Removed while still held, and only if it is still our file: a process that opened it in between
            # finds it gone once it gets the lock, and starts over with a new one.
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


_sweep_locks: list[RunLock] = []


def acquire(run_dir: Path, command: str) -> RunLock:
    """The lock of `run_dir` (which must exist) for this process, or a UserError naming its live holder."""
    path = Path(run_dir) / LOCK_NAME
    for _ in range(100):  # each retry follows a holder that removed the file between our open and our lock
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            created = False
            try:  # never through a symlink: the lock's record would be written into whatever it points to
                fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _unusable(path, e) from None
        except OSError as e:
            raise _unusable(path, e) from None
        try:
            got = _try_flock(fd)
            if got is None:  # no flock here: a live holder on this host is known by its pid
                previous = _read(fd)
                got = created or not _alive_elsewhere(previous)
            if not got:
                raise UserError(
                    f"run dir {run_dir} is in use by {_describe(_read(fd))}: wait for it to end, or choose another run dir"
                )
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = {} if created else _read(fd)
            if previous:  # a holder that ends removes the file: this one was killed, or its machine went down
                from diffuse.console import warn

                warn(
                    f"run dir {run_dir} was locked by {_describe(previous)}, which holds it no more (killed?): taking it over"
                )
            _write(fd, command)
        except BaseException:
            os.close(fd)
            raise
        return RunLock(Path(run_dir), fd)
    raise UserError(f"run dir {run_dir}: could not take its lock {path} (it keeps being replaced)")


def check_free(run_dir: Path) -> None:
    """A UserError if a live process holds `run_dir`, without taking it or writing anything (a sweep's jobs are
    checked so before the first one starts)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file: nobody holds it (an unreadable dir is the run dir check's to report)
    try:
        got = _try_flock(fd)
        if got is None:
            got = not _alive_elsewhere(_read(fd))
        elif got:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if not got:
            raise UserError(
                f"run dir {run_dir} is in use by {_describe(_read(fd))}: wait for it to end, or choose another run dir"
            )
    finally:
        os.close(fd)


def own(run_dir: Path, command: str) -> RunLock:
    """This process's claim on `run_dir`: the lock, or under torchrun rank 0's (see the module's docstring)."""
    world, rank = _world()
    if world <= 1:
        return acquire(run_dir, command)
    store, key = job_store(), _next_key("runlock")
    if rank == 0:
        try:
            lock = acquire(run_dir, command)
        except UserError as e:
            if store is not None:
                store.set(key, "refused: " + str(e))
            raise
        if store is not None:
            store.set(key, "ok")
        return lock
    if store is not None:
        verdict = store.get(key).decode()
        if verdict != "ok":
            raise UserError(verdict.partition(": ")[2])
    return RunLock(Path(run_dir))


def release_all() -> None:
    """The sweep locks SweepLock took (a sweep whose job exited early never reaches on_multirun_end)."""
    while _sweep_locks:
        _sweep_locks.pop().release()


def exit_with(e: UserError) -> NoReturn:
    """Print a UserError's one line on stderr and exit with its code. Under torchrun, where every rank meets the
    same bad input, the job prints it once (rank 0; another rank prints only an error of its own) and every rank
    exits with the code: the ranks wait for each other through the job's store, and ignore the SIGTERM torchrun
    sends the others once the first one has exited (an ignored signal stays ignored while Python shuts down,
    where a handler of ours would be undone)."""
    world, rank = _world()
    if world <= 1:
        _print_error(str(e))
        sys.exit(e.exit_code)
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    store = job_store()
    if store is None:
        if rank == 0:
            _print_error(str(e))
        sys.exit(e.exit_code)
    from datetime import timedelta

    key = _next_key("error") + "/"
    wait = timedelta(seconds=30)  # ranks meet a shared bad input within moments of each other
    if rank == 0:
        _print_error(str(e))
        store.set(key + "0", str(e))
        try:  # until every rank has met its error, so that torchrun stops none of them before
            store.wait([key + str(r) for r in range(1, world)], wait)
        except Exception:
            pass
        sys.exit(e.exit_code)
    store.set(key + str(rank), str(e))
    try:
        store.wait([key + "0"], wait)
        own = store.get(key + "0").decode() != str(e)
    except Exception:  # rank 0 met no error: this one is this rank's own
        own = True
    if own:
        _print_error(f"rank {rank}: {e}")
    sys.exit(e.exit_code)


def _print_error(message: str) -> None:
    from diffuse.console import err_console

    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    sys.stderr.flush()


def job_store():
    """The torchrun agent's key-value store (the one torch.distributed's env:// rendezvous uses), or None."""
    global _store
    if _store is False:
        _store = None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            from datetime import timedelta

            try:
                from torch.distributed import PrefixStore, TCPStore

                tcp = TCPStore(
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    is_master=False,
                    timeout=timedelta(minutes=30),
                )
                # A restarted job (torchrun --max-restarts) reuses the store: its keys are apart from the last try's.
                prefix = f"diffuse/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
                _store = PrefixStore(prefix, tcp)
            except (KeyError, ValueError, RuntimeError):
                _store = None
    return _store


_store = False
_counters: dict[str, int] = {}


def _next_key(kind: str) -> str:
    # Every rank makes the same calls in the same order (the same jobs, the same checks), so the n-th key of a
    # kind names the same event on every rank.
    n = _counters.get(kind, 0)
    _counters[kind] = n + 1
    return f"{kind}/{n}"


def _world() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("RANK", "0") or 0)


def _try_flock(fd: int) -> bool | None:
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise


def _alive_elsewhere(info: dict) -> bool:
    """Without flock: whether the process `info` names may be alive (another host's cannot be told: assume so)."""
    if not info:
        return False
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return int(info.get("pid", 0)) > 0


def _read(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _write(fd: int, command: str) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torchrun": os.environ.get("TORCHELASTIC_RUN_ID"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "another process"
    return f"{info.get('command') or 'a process'} (pid {info['pid']} on {info.get('host', '?')}, since {info.get('started', '?')})"


def _unusable(path: Path, e: OSError) -> UserError:
    if e.errno in (errno.EISDIR, errno.ELOOP) or (e.errno == errno.EEXIST and path.is_symlink()):
        why = "a directory" if e.errno == errno.EISDIR else "a symlink"
        return UserError(f"{path} is {why}, where diffuse keeps the run dir's lock: remove it")
    return UserError(
        f"run dir {path.parent} is not writable: cannot make its lock {path.name} ({e.strerror or os.strerror(e.errno)})"
    )


class SweepLock(Callback):
    """Hydra callback (conf/hydra/default.yaml): a -m sweep holds its sweep dir from before Hydra writes
    multirun.yaml there until the sweep ends; each job then locks its own subdir (rundir.guard.guarded)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            _sweep_locks.append(own(sweep_dir, f"diffuse {config.hydra.job.config_name.replace('_', '-')} -m"))
        except UserError as e:
            exit_with(e)

    def on_multirun_end(self, config, **kwargs) -> None:
        release_all()
