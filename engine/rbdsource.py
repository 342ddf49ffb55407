"""What a backup of an RBD image reads: its snapshot, many requests in flight.

The job (engine/job.py) reads one claimed run at a time and, before each,
says which planned runs come next (``will_need``). For a local file that
advice goes to the kernel; here it becomes librbd aio reads, up to
``IN_FLIGHT_BYTES`` of them outstanding in pieces of at most one RADOS
object, so the cluster serves many at once (``rbd export`` keeps ten
objects in flight for the same reason) while the job hashes and writes
what arrived. A read the advice did not cover is read there and then.

The snapshot never changes, so a piece read ahead is exactly what a read
later would return: no copy-before-write, no staleness.
"""

from __future__ import annotations

import bisect
import errno
import threading

from bitarray import bitarray

from engine.ceph import CephError
from engine.job import JobError, Source
from engine.rbdimage import RbdImage

# Bytes of aio reads outstanding at most (memory held by the read-ahead).
IN_FLIGHT_BYTES = 64 * 1024 * 1024


class _Piece:
    """One aio read: [start, end) of the snapshot, done when ``ready`` is set."""

    __slots__ = ("start", "end", "ready", "data", "error", "completion")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.ready = threading.Event()
        self.data: bytes | None = None
        self.error: str | None = None
        self.completion: object = None


class RbdSource(Source):
    """Reads of one RBD snapshot for a backup job; ``own``: the open
    ``image`` is its own from here on (``close`` closes it), else it is
    lent (the device's reader) and left open."""

    def __init__(self, image: RbdImage, size: int, unit: int, allocated: bitarray | None,
                 piece: int | None = None, in_flight: int = IN_FLIGHT_BYTES, own: bool = True) -> None:
        super().__init__(-1, image.spec.source + (f"@{image.snapshot}" if image.snapshot else ""), size)
        self.image = image
        self.own = own
        self.unit = unit
        # Units holding data (None: unknown, everything is read).
        self.allocated = allocated
        self.piece = piece or max(unit, min(image.object_size(), 4 * 1024 * 1024))
        self.in_flight = in_flight
        self._lock = threading.Lock()
        self._starts: list[int] = []  # sorted starts of the pieces below
        self._pieces: list[_Piece] = []
        self._queued = 0  # bytes in pieces not yet consumed
        self._asked = 0  # read-ahead asked for up to here
        # Every aio read started and maybe not done, consumed or dropped as
        # stale alike: close() waits for them all before closing the image.
        self._started: list[_Piece] = []
        self._prune_at = 64
        # Bytes read there and then, one round trip at a time (what read-ahead missed).
        self.read_now_bytes = 0

    @property
    def reads_ahead(self) -> bool:
        return True

    # -- what is there -------------------------------------------------------------------

    def hole(self, offset: int, length: int) -> bool:
        """Nothing written in [offset, offset+length) (the allocation map says so)."""
        if self.allocated is None or length <= 0:
            return False
        first = offset // self.unit
        stop = min(-(-(offset + length) // self.unit), len(self.allocated))
        return first >= stop or not self.allocated.any() or self.allocated.find(1, first, stop) < 0

    # -- read-ahead --------------------------------------------------------------------------

    def prime(self, units: bitarray, window: int) -> None:
        """Start reading the first ``window`` bytes of the planned ``units`` now
        (the run the job claims first), before the job's first read.

        The job advises only what comes after the run it has just claimed,
        so its first read went out after a whole budget of aio and waited
        behind it: 9 ms for an incremental's first 64 KiB cluster, 34 ms for
        a full's first 8 MiB (of a 1 GiB image in 0.17 s and 1.1 s).
        """
        budget = window // self.unit
        pos = 0
        while budget > 0:
            a = units.find(1, pos)
            if a < 0:
                return
            b = units.find(0, a, a + budget)
            if b < 0:
                b = min(a + budget, len(units))
            self.will_need(a * self.unit, (b - a) * self.unit)
            budget -= b - a
            pos = b

    def will_need(self, offset: int, length: int) -> None:
        """Start aio reads of [offset, offset+length), holes left out, as the budget allows."""
        end = min(offset + length, self.size)
        offset = max(offset, self._asked)
        while offset < end:
            if self._queued >= self.in_flight:
                return
            if self.hole(offset, min(self.unit, end - offset)):
                offset = (offset // self.unit + 1) * self.unit
                self._asked = offset
                continue
            stop = min(end, (offset // self.piece + 1) * self.piece)
            # Stop the piece at the next hole, so holes are never read.
            if self.allocated is not None:
                u = self.allocated.find(0, offset // self.unit, -(-stop // self.unit))
                if u >= 0:
                    stop = max(min(stop, u * self.unit), offset + 1)
            self._start(offset, stop)
            offset = stop
            self._asked = offset

    def _start(self, start: int, end: int) -> None:
        piece = _Piece(start, end)

        def done(completion: object, data: bytes | None) -> None:
            try:
                rv = completion.get_return_value()  # type: ignore[attr-defined]
                if rv < 0 or data is None or len(data) != end - start:
                    piece.error = f"error {-rv}" if rv < 0 else f"short read ({rv} of {end - start} bytes)"
                else:
                    piece.data = data
            except BaseException as e:  # noqa: BLE001 - librbd's thread: never raise into it
                piece.error = str(e) or type(e).__name__
            finally:
                piece.ready.set()

        with self._lock:
            i = bisect.bisect(self._starts, start)
            self._starts.insert(i, start)
            self._pieces.insert(i, piece)
            self._queued += end - start
            if len(self._started) >= self._prune_at:
                # Pruned when it has doubled since, not at every start past 64:
                # an incremental's scattered pieces are many and in flight
                # together, and rescanning them all at each start was
                # quadratic.
                self._started = [p for p in self._started if not p.ready.is_set()]
                self._prune_at = max(64, 2 * len(self._started))
            self._started.append(piece)
        try:
            piece.completion = self.image.image.aio_read(start, end - start, done)
        except Exception as e:  # noqa: BLE001 - not started: read it there and then instead
            piece.error = str(e) or type(e).__name__
            piece.ready.set()

    def _take(self, offset: int) -> _Piece | None:
        """The piece starting at ``offset``, removed from the queue; older ones dropped."""
        with self._lock:
            i = bisect.bisect_left(self._starts, offset)
            # Pieces wholly before the read are never read now (the job reads forward).
            stale = self._pieces[:i]
            del self._starts[:i], self._pieces[:i]
            for p in stale:
                self._queued -= p.end - p.start
            if self._starts and self._starts[0] == offset:
                p = self._pieces.pop(0)
                self._starts.pop(0)
                self._queued -= p.end - p.start
                return p
            return None

    # -- reads -----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the snapshot: from the pieces read
        ahead where they are, read now where they are not."""
        parts: list[bytes] = []
        pos, end = offset, offset + length
        while pos < end:
            piece = self._take(pos)
            if piece is not None:
                piece.ready.wait()
                data = piece.data
                if data is not None:
                    if piece.end <= end:
                        parts.append(data)
                        pos = piece.end
                        continue
                    # The piece runs past this read: the rest is the next read's start.
                    n = end - pos
                    parts.append(data[:n])
                    self._put_back(end, piece.end, data[n:])
                    pos = end
                    continue
            # Nothing read ahead here (or it failed): read up to the next piece now.
            with self._lock:
                i = bisect.bisect_right(self._starts, pos)
                stop = min(end, self._starts[i]) if i < len(self._starts) else end
            if self.hole(pos, stop - pos):
                # Unwritten in the snapshot (its map says so): zeros, no round
                # trip. RBD maps each object up to its last written byte, so
                # a thin image's object tails are such holes: a full read
                # each one on its own, waited for, before.
                parts.append(bytes(stop - pos))
            else:
                parts.append(self._read_now(pos, stop - pos))
            pos = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _put_back(self, start: int, end: int, data: bytes) -> None:
        """A piece's unread rest, ready, for the read that starts there."""
        rest = _Piece(start, end)
        rest.data = data
        rest.ready.set()
        with self._lock:
            i = bisect.bisect(self._starts, start)
            self._starts.insert(i, start)
            self._pieces.insert(i, rest)
            self._queued += end - start

    def _read_now(self, offset: int, length: int) -> bytes:
        self.read_now_bytes += length
        try:
            return self.image.read(offset, length)
        except CephError as e:
            raise JobError(f"reading {self.path} at offset {offset}: {e}", e.errno or errno.EIO) from None

    def close(self) -> None:
        """Wait for every aio read still in flight (their buffers belong to
        librbd until done; one dropped as stale too), then close the
        snapshot if it is this source's own: a daemon running backups for
        months must not hold one per backup."""
        with self._lock:
            pending = self._started
            self._started = []
            self._pieces.clear()
            self._starts.clear()
            self._queued = 0
        for p in pending:
            p.ready.wait()
        if self.own:
            self.image.close()
