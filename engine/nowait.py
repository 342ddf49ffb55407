"""Reads that never wait for the disk: the page cache has the bytes, or WouldBlock.

The mount serves reads on its event loop when the page cache holds them:
a hop to a worker thread costs more than copying a cached MiB (about
175 us a request, measured). So a read is first tried with RWF_NOWAIT,
and only a miss goes to a thread. Files that cannot say (a repository or
source on FUSE, and older kernels, answer EOPNOTSUPP) count as misses:
the waiting read in the thread serves them as before.
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
