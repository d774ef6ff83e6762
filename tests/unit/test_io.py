"""diffuse.io: a full disk is one line naming the file, whoever reported it, and the old file stays whole."""

import errno

import pytest

from diffuse.errors import UserError
from diffuse.io import TMP_SUFFIX, atomic_write, os_error_of


class LibraryError(Exception):
    """What safetensors raises when its own write fails: no OSError, the errno only in the text."""


@pytest.mark.parametrize(
    "raised",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        LibraryError("Error while serializing: I/O error: No space left on device (os error 28)"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
    ],
)
def test_a_full_disk_is_one_line_and_the_old_file_stays(tmp_path, raised):
    target = tmp_path / "ck.safetensors"
    target.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"half")
        raise raised

    with pytest.raises(UserError) as e:
        atomic_write(target, write)
    msg = str(e.value)
    assert msg.startswith(f"cannot write {target}: ") and "\n" not in msg
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(f"*{TMP_SUFFIX}"))


def test_other_failures_keep_their_traceback(tmp_path):
    def write(tmp):
        raise LibraryError("Error while serializing: tensor is not contiguous")

    with pytest.raises(LibraryError):
        atomic_write(tmp_path / "x", write)
    assert not list(tmp_path.iterdir())


def test_os_error_of_reads_the_errno_a_library_wraps():
    assert os_error_of(LibraryError("I/O error (os error 28)")).errno == errno.ENOSPC
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as inner:
            raise LibraryError("write failed") from inner
    except LibraryError as outer:
        assert os_error_of(outer).errno == errno.EROFS
    assert os_error_of(LibraryError("no errno here")).errno == 0
