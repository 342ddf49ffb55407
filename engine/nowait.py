"""Reads that never wait for the disk: the page cache has the bytes, or WouldBlock.

The mount serves reads on its event loop when the page cache holds them:
a hop to a worker thread costs more than copying a cached MiB (about
175 us a request, measured). So a read is first tried with RWF_NOWAIT,
and only a miss goes to a thread. Files that cannot say (a repository or
source on FUSE, and older kernels, answer EOPNOTSUPP) count as misses:
the waiting read in the thread serves them as before.

Writes have no such flag on ext4; ``edges_cached`` answers the one question
that decides whether a write must read the disk first (see
backupfs/writepolicy.py for the rest).
"""

from __future__ import annotations

import errno
import os

RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_MISS = (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL)


class WouldBlock(Exception):
    """A nowait read needed the disk."""


def read_cached(fd: int, view: memoryview, offset: int) -> None:
    """Fill all of ``view`` from ``offset`` if the page cache has it, else raise WouldBlock.

    A short read (part cached, or the end of the file) is a miss too: the
    waiting read decides what the caller gets.
    """
    if not RWF_NOWAIT:
        raise WouldBlock()
    try:
        n = os.preadv(fd, [view], offset, RWF_NOWAIT)
    except OSError as e:
        if e.errno in _MISS:
            raise WouldBlock() from None
        raise
    if n < len(view):
        raise WouldBlock()


PAGE = os.sysconf("SC_PAGE_SIZE")
_probe = bytearray(1)


def edges_cached(fd: int, offset: int, length: int) -> bool:
    """Whether a write of [offset, offset+length) finds its partial pages cached.

    A write that covers only part of a page makes the kernel read the rest
    of it first: from the disk, when the page is not cached. Whole pages
    need no read. (Linux has no RWF_NOWAIT for buffered writes on ext4,
    so this is asked with a one-byte nowait read of each partial page.)
    """
    end = offset + length
    for page, partial in ((offset - offset % PAGE, offset % PAGE), (end - end % PAGE, end % PAGE)):
        if partial:
            try:
                read_cached(fd, memoryview(_probe), page)
            except (WouldBlock, OSError):
                return False
    return True


def can_answer(fd: int) -> bool:
    """Whether the file's file system answers nowait reads at all.

    Those that do not (FUSE, NFS: EOPNOTSUPP) are the ones where a write
    may wait on a network or another process for any time, so the mount
    never writes to them on its event loop.
    """
    if not RWF_NOWAIT:
        return False
    try:
        os.preadv(fd, [memoryview(_probe)], 0, RWF_NOWAIT)
    except OSError as e:
        return e.errno == errno.EAGAIN  # it can say "not cached": it answers
    return True
