"""The kernel's page cache of a file: drop it, and count what it holds.

For the tests of reads that must or must not wait for the disk.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop the file's pages from the page cache, and make sure [offset, +length) went."""
    for _ in range(20):  # dropping can miss a page that is still busy: ask again
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not cached_pages(fd, offset, length):
            return
    pytest.fail("the kernel kept the image's pages cached")


def cached_pages(fd: int, offset: int, length: int) -> int:
    """Pages of [offset, offset+length) in the page cache, asked without
    reading them (a nowait read would start read-ahead of what it misses)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    start = offset - offset % mmap.PAGESIZE
    size = offset + length - start
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap of the image failed")
    try:
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(b & 1 for b in vec)
    finally:
        libc.munmap(addr, size)
