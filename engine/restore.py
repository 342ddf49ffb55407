"""Writing a backup out to a file or a block device.

A regular file target is sparse: zero regions become holes, so restoring a
mostly empty 100 GiB disk writes what it holds. A block device target gets
every byte, zeros included, because it may hold old data anywhere. Reads go
through a checked view, so a damaged cluster stops the restore with its
offset instead of writing wrong data.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.errors import BackupfsError, UsageError
from engine.job import Progress

CHUNK = 8 * 1024 * 1024


class RestoreError(BackupfsError):
    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class RestoreResult:
    target: str
    size: int
    written: int
    sparse: bool


def check_target(target: str, size: int, force: bool) -> bool:
    """Validate a restore target; returns True for a block device."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise UsageError(f"restore target {target}: directory {parent} does not exist") from None
        return False
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"restore target {target} is a directory; give a file or block device")
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if dev_size < size:
            raise UsageError(f"block device {target} holds {dev_size} bytes, the backup needs {size}")
        if not force:
            raise UsageError(f"{target} is a block device; its contents would be overwritten (use --force)")
        return True
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"restore target {target} is not a regular file or block device")
    if not force:
        raise UsageError(f"restore target {target} exists (use --force to overwrite it)")
    return False


def restore_to(
    read: Callable[[int, int], bytes | bytearray | memoryview],
    size: int,
    target: str,
    *,
    block_device: bool,
    on_progress: Callable[[Progress], None] | None = None,
) -> RestoreResult:
    """Copy ``size`` bytes obtained by ``read(offset, length)`` into ``target``."""
    created = not os.path.exists(target)
    flags = os.O_WRONLY | os.O_CLOEXEC | (0 if block_device else os.O_CREAT | os.O_TRUNC)
    try:
        fd = os.open(target, flags, 0o600)
    except OSError as e:
        raise RestoreError(f"cannot open restore target {target}: {e.strerror}", e.errno or errno.EIO) from None
    progress = Progress(total=size, phase="restoring")
    written = 0
    ok = False
    try:
        pos = 0
        while pos < size:
            n = min(CHUNK, size - pos)
            data = read(pos, n)
            if len(data) != n:
                raise RestoreError(f"short read of the backup at offset {pos}")
            view = memoryview(data)
            if block_device:
                _pwrite_all(fd, view, pos, target)
                written += n
            else:
                written += _write_sparse(fd, view, pos, target)
            pos += n
            progress.done = pos
            progress.written = written
            if on_progress is not None:
                on_progress(progress)
        if not block_device:
            os.ftruncate(fd, size)
        os.fsync(fd)
        ok = True
    except OSError as e:
        err = errno.ENOSPC if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.errno or errno.EIO)
        raise RestoreError(f"writing {target}: {e.strerror}", err) from None
    finally:
        os.close(fd)
        if not ok and created:
            try:
                os.unlink(target)
            except OSError:
                pass
    return RestoreResult(target, size, written, not block_device)


def _pwrite_all(fd: int, view: memoryview, offset: int, target: str) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _write_sparse(fd: int, view: memoryview, offset: int, target: str, block: int = 64 * 1024) -> int:
    """Write the non-zero 64 KiB blocks of ``view``; zero blocks stay holes."""
    n = len(view)
    full = n // block
    nonzero = np.ones(full + (1 if n % block else 0), dtype=bool)
    if full:
        words = np.frombuffer(view[: full * block], dtype=np.uint64)
        nonzero[:full] = words.reshape(full, block // 8).any(axis=1)
    written = 0
    i = 0
    while i < len(nonzero):
        if not nonzero[i]:
            i += 1
            continue
        j = i
        while j < len(nonzero) and nonzero[j]:
            j += 1
        a, b = i * block, min(j * block, n)
        _pwrite_all(fd, view[a:b], offset + a, target)
        written += b - a
        i = j
    return written
