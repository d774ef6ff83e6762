"""Where dataset files live: cache directories, checksums, atomic downloads and the offline message.

Network code is kept to one small function, `download`; everything else works on files already on disk, so
a file placed by hand in the cache directory is used with no network at all.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from diffuse.errors import UserError


def cache_dir(cfg) -> Path:
    """dataset.root with ~ expanded: where the dataset's files are looked for and downloaded to."""
    if not cfg["root"]:
        raise UserError(
            f"dataset.root={cfg['root']!r} is not allowed: give the folder that holds (or will hold) the dataset's files"
        )
    return Path(os.path.expanduser(str(cfg["root"])))


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file read in 1 MiB chunks (dataset archives, weights files: too large to read at once)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_md5(path: Path, expected: str | None) -> None:
    """Refuse a file whose MD5 is not `expected` (None: no check)."""
    if not expected:
        return
    got = file_digest(path, "md5")
    if got != str(expected).lower():
        raise UserError(
            f"{path} is corrupted or incomplete: its MD5 is {got}, expected {expected}; delete it and download it again"
        )


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Fetch url into dest atomically: a temporary file in dest's directory, renamed once complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_or_explain(url: str, dest: Path, allow_download: bool) -> None:
    """Download url to dest, or raise the one-line offline message naming the file, the directory and the URL."""
    missing = UserError(
        f"{dest.name} not found in {dest.parent}: download {url} and put it there (or set dataset.root)"
    )
    if not allow_download:
        raise missing
    try:
        download(url, dest)
    except OSError as e:  # URLError, timeouts and unreachable hosts are all OSErrors
        raise UserError(f"{missing} [download failed: {e}]") from None
