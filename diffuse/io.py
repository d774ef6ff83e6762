"""Writes that survive a crash and a full disk: each file is replaced whole by an atomic rename (a reader sees the
old file or the new one, never half of one), and a storage error the user can fix (full disk, read-only or forbidden
directory) is one line naming the file, with nothing half-written left behind."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from diffuse.errors import UserError


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then fsync and rename over `path`: readers see the old file or the new one, never half.
    A full disk or a read-only or forbidden directory is the user's to fix: one line naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        _raise_if_environment(e, path)
        raise
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            # The mode a plain open() would give, set after the write: mkstemp makes the temp file 0600, and a
            # writer may replace it with its own file (safetensors writes its own temp file and renames it over
            # ours, 0600 again). The umask is read now, not at import: the process may have changed it since.
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, Exception):
            _raise_if_environment(os_error_of(e), path)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# errno values that say the storage, not the program, is at fault.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask. Linux reports it in /proc (read-only); elsewhere it is set and restored, which another
    thread creating a file in that instant would see."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_error_of(e: Exception) -> OSError:
    """`e` as the OSError it is or wraps: safetensors reports a full disk as SafetensorError "... (os error 28)";
    a chained OSError counts too. An OSError of errno 0 when there is none."""
    import re

    if isinstance(e, OSError):
        return e
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OSError):
        return cause
    m = re.search(r"\(os error (\d+)\)", str(e))
    code = int(m.group(1)) if m else 0
    return OSError(code, os.strerror(code) if code else "")


def _raise_if_environment(e: OSError, path: Path) -> None:
    if e.errno in ENVIRONMENT_ERRNOS:
        raise UserError(f"cannot write {path}: {e.strerror or os.strerror(e.errno)}") from None


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files of writes that were killed before their rename (.NAME.XXXX.tmp); they are never
    read, only in the way. Returns what was removed."""
    gone = []
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + os.linesep))


def save_resolved_config(cfg, out: Path) -> None:
    """RUN/config.yaml: the job's config with every interpolation resolved, as the run used it (rank 0 writes)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))
