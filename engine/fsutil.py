"""Durable file operations: the order that makes a crash leave old or new, never half."""

from __future__ import annotations

import os
import stat

from engine import durable
from engine.access import set_new_file_mode


def file_size(fd: int, st: os.stat_result | None = None) -> int:
    """Size of a regular file or a block device (whose st_size is 0);
    ``st``: its fstat, when the caller has one already."""
    if st is None:
        st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in ``path`` durable."""
    try:
        durable.fs.fsync_dir(path)
    except OSError as e:
        raise _named(e, path) from None


def _named(e: OSError, path: str) -> OSError:
    """``e`` naming ``path``: a bare "Input/output error" from an fsync tells nobody where."""
    if e.filename is not None:
        return e
    return type(e)(e.errno, e.strerror or str(e), path)


Buffers = bytes | bytearray | memoryview | list[bytes | memoryview]


def write_all(fd: int, data: Buffers) -> None:
    """Write ``data`` whole; a list is written piece after piece (no joined copy)."""
    for part in data if isinstance(data, list) else [data]:
        view = memoryview(part).cast("B")
        while view:
            view = view[durable.fs.write(fd, view) :]


def atomic_write(path: str, data: Buffers) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync directory.

    The file gets the mode its directory calls for (engine/access.py):
    0600, or 0640 in a group-shared repository, whatever the umask.
    """
    tmp = f"{path}.tmp"
    # A leftover (or a planted symlink) goes first; then only a file we
    # create ourselves is written: never through a link.
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = durable.fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            set_new_file_mode(fd, path)
            write_all(fd, data)
            durable.fs.fsync(fd)
        except OSError as e:
            raise _named(e, tmp) from None
        finally:
            durable.fs.close(fd)
        durable.fs.replace(tmp, path)
    except BaseException:
        try:  # a full disk must not also be left a half-written temp file
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(path) or ".")


def write_new(path: str, data: Buffers) -> None:
    """Create ``path`` with ``data``, fsynced; the caller makes the name durable.
    Its mode is as ``atomic_write``'s."""
    fd = durable.fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        set_new_file_mode(fd, path)
        write_all(fd, data)
        durable.fs.fsync(fd)
    finally:
        durable.fs.close(fd)
