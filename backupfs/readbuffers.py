"""Read buffers reused from one request to the next, on the event loop's thread.

Every backup read used to allocate a fresh zeroed 1 MiB buffer: calloc and
the first touch of its pages took about a tenth of the daemon's time per
request (py-spy, warm-direct reads). A reply's buffer is free again once
pyfuse3 has sent it and dropped it, which CPython's reference count tells
exactly; the reads that fill these buffers write every byte (holes too).
"""

from __future__ import annotations

import sys

from engine.chain import aligned_buffer

# A buffer in the pool that nobody else holds is referred to by the pool's
# list, the loop variable and getrefcount's own argument.
_ONLY_OURS = 3


class ReadBuffers:
    """A few page-aligned buffers of one size, for requests of exactly that size.

    Not thread-safe by design: only the event loop's thread takes from it,
    and a buffer it hands out is in use until the reply has been sent.
    """

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._count = count
        self._buffers: list[bytearray] = []

    def take(self, size: int) -> bytearray | None:
        """A free buffer of ``size`` bytes, or None (allocate one yourself)."""
        if size != self.size:
            return None
        for buf in self._buffers:
            if sys.getrefcount(buf) == _ONLY_OURS:
                return buf
        if len(self._buffers) < self._count:
            buf = aligned_buffer(size)
            self._buffers.append(buf)
            return buf
        return None
