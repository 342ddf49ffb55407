"""A backup's bytes as the file object the guest parsers read, with a work budget.

The parsers (Dissect's) read through ``seek`` + ``read`` on a file
object; ``DiskReader`` gives them one over a backup's view (the chain,
checked against the recorded checksums when there are any), so no copy
of the disk and no loop device is made.

A guest filesystem is input the guest controls: a crafted directory of
millions of tiny entries, an extent tree or a FAT chain that loops, would
keep a parser reading for ever. Every read goes through ``Budget``: one
request (a lookup, a listing, an attribute) may read at most so many
bytes in so many calls before it gives up with ``GuestDamaged`` (EIO on
what it touched, and a line in the log). Reads of a file's own data are
not counted against it: they are bounded by the size asked for.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from dissect.util.stream import AlignedStream

from engine.errors import BackupfsError

# One request's work: a listing of a directory of 100,000 entries reads a
# few MiB in a few thousand calls; these are far above any real request
# and far below "for ever".
REQUEST_BYTES = 512 * 1024 * 1024
REQUEST_READS = 2_000_000
READ_ALIGN = 64 * 1024  # the parsers' reads are small: one aligned block serves many


class GuestDamaged(BackupfsError):
    """A guest's partition table or filesystem we cannot read: damaged,
    crafted, or beyond what one request may cost."""

    errno = errno.EIO


class ByteSource(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytearray | memoryview | bytes: ...


class Budget:
    """What the current request may still read, per thread.

    A request opens it with ``spend``; reads outside any request (a file's
    own data) are free. Thread-local: two requests on two volumes do not
    share one count.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @contextmanager
    def spend(self, what: str, max_bytes: int = REQUEST_BYTES, max_reads: int = REQUEST_READS) -> Iterator[None]:
        outer = getattr(self._local, "left", None)
        if outer is not None:  # nested: the outer request's budget holds
            yield
            return
        self._local.left = [max_bytes, max_reads, what]
        try:
            yield
        finally:
            self._local.left = None

    def charge(self, nbytes: int) -> None:
        left = getattr(self._local, "left", None)
        if left is None:
            return
        left[0] -= nbytes
        left[1] -= 1
        if left[0] < 0 or left[1] < 0:
            raise GuestDamaged(f"{left[2]}: gave up after reading more than a request may "
                               f"({REQUEST_BYTES // (1024 * 1024)} MiB or {REQUEST_READS} reads): "
                               "the guest's metadata loops or is crafted")


class DiskReader(AlignedStream):
    """A byte source (a backup's view, or a range of it) as a seekable file object.

    Reads past the end return short, as from a file. ``lock`` serialises the
    parser's seek + read pairs: one volume's parser objects are used by one
    thread at a time (see engine/guest/volume.py).
    """

    def __init__(self, source: ByteSource, budget: Budget, offset: int = 0, size: int | None = None) -> None:
        self._source = source
        self._offset = offset
        self._budget = budget
        total = source.size - offset if size is None else size
        super().__init__(max(0, min(total, source.size - offset)), READ_ALIGN)

    def read(self, n: int = -1) -> bytes:
        # Charged per call, cache hits too: a parser looping over the same
        # few blocks (a FAT chain or an extent list that points back)
        # reads nothing new from the disk and would never be stopped.
        self._budget.charge(max(n, 0))
        return super().read(n)

    def _read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        return bytes(self._source.read(self._offset + offset, end - offset))

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset`` of this range, without moving the stream (thread-safe)."""
        end = min(offset + length, self.size)
        if end <= offset or offset < 0:
            return b""
        return bytes(self._source.read(self._offset + offset, end - offset))

    @property
    def base(self) -> int:
        """Where this range starts on the disk."""
        return self._offset
