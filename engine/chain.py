"""A backing chain as one read-only disk.

The view flattens the chain once: for every guest range, the newest layer
that holds it (data, zeros or a compressed cluster) or "nobody" (zeros).
The index is a sorted list of coalesced extents, found with ``bisect`` as
ratarmount's StenciledFile does, so a read at depth 64 costs what it costs
at depth 1: one lookup, then one ``preadv`` per contiguous host run.

Memory is one entry per extent (start, host: 8 bytes each; kind: 1 byte;
depth: 2 bytes), i.e. 19 bytes per run of contiguous clusters, not per
cluster. Layers may have different cluster sizes; the index is in bytes.
"""

from __future__ import annotations

import ctypes
import os
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from engine.ccache import AHEAD_BYTES, DecompressedClusters
from engine.nowait import WouldBlock, read_cached
from engine.qcow2.backing import Confinement, open_chain
from engine.qcow2.layers import COMPRESSED, DATA, UNALLOC, ZERO, Layer
from engine.readahead import device_read_ahead

try:  # the read loop in C (setup.py builds it when a compiler is there)
    from engine import _fastread
except ImportError:  # pragma: no cover - exercised on machines without gcc
    _fastread = None
try:  # the index sweep in C (the same build)
    from engine import _chainindex
except ImportError:  # pragma: no cover - exercised on machines without gcc
    _chainindex = None
if os.environ.get("BACKUPFS_PURE_PYTHON"):  # the same reads and index without C, to compare
    _fastread = _chainindex = None
if _fastread is not None and (_fastread.DATA, _fastread.ZERO, _fastread.COMPRESSED, _fastread.UNALLOC) != (
    DATA,
    ZERO,
    COMPRESSED,
    UNALLOC,
):  # pragma: no cover - a stale build
    _fastread = None
if _chainindex is not None and (
    _chainindex.DATA, _chainindex.ZERO, _chainindex.COMPRESSED, _chainindex.UNALLOC
) != (DATA, ZERO, COMPRESSED, UNALLOC):  # pragma: no cover - a stale build
    _chainindex = None


def read_path() -> str:
    """Which read loop serves backups, for the mount's log: "C" when the
    extension is built and current, else "Python" (several times slower,
    so a mount without the build should say so)."""
    return "C" if _fastread is not None else "Python"


_MAP_CHUNK = 1 << 20  # index entries compared at a time by map()
_NEAR = 1 << 20  # a read starting this close to the last one's end continues it


@dataclass(frozen=True)
class MapEntry:
    """One run of `qemu-img map --output=json`, in its terms."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    compressed: bool = False

    def as_json_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        if self.compressed:
            d["compressed"] = True
        return d


def flatten(layers: list[Layer]) -> list[tuple[int, int, int, int, int]]:
    """(start, end, kind, depth, host) covering the tip's size, newest owner first.

    The tuple form of ``flatten_arrays``, for callers that walk the index.
    """
    starts, kinds, depths, hosts = flatten_arrays(layers)
    ends = np.append(starts[1:], np.uint64(layers[0].size))
    return list(zip(starts.tolist(), ends.tolist(), kinds.tolist(), depths.tolist(), hosts.tolist()))


def flatten_arrays(layers: list[Layer]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The flattened index as arrays: extent starts, kinds, depths, hosts.

    Extent ``i`` runs from ``starts[i]`` to ``starts[i + 1]`` (the last one
    to the tip's size) and reads from the newest layer that holds it. A
    range nobody holds is UNALLOC with the depth of the last layer that
    was consulted: the bottom layer, or the layer whose backing file is too
    short to reach the range (both as `qemu-img map` reports them).

    Computed by the C sweep (engine/_chainindex.c) when it is built, else
    by ``flatten_arrays_numpy``; they agree on every byte a read returns
    (tests/test_chain_index.py), the C one splitting compressed clusters
    only where their owner changes.
    """
    size = layers[0].size
    if _chainindex is None or size == 0:
        return flatten_arrays_numpy(layers)
    rows = [np.ascontiguousarray(layer.extents(), dtype=np.uint64) for layer in layers]
    sizes = np.array([layer.size for layer in layers], dtype=np.uint64)
    starts, kinds, depths, hosts = _chainindex.flatten(rows, sizes, size)
    return (np.frombuffer(starts, dtype=np.uint64), np.frombuffer(kinds, dtype=np.uint8),
            np.frombuffer(depths, dtype=np.uint16), np.frombuffer(hosts, dtype=np.uint64))


def flatten_arrays_numpy(layers: list[Layer]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """flatten_arrays in numpy: the fallback without a compiler, and the C sweep's reference.

    Every layer boundary cuts the disk into elementary intervals, inside
    which ownership cannot change; each layer, newest first, claims the
    still unclaimed intervals its extents cover, then neighbours that
    continue each other merge. Vectorised, because splicing the unclaimed
    ranges one extent at a time grew faster than linearly: 4 us per extent
    for a 1 GiB disk at depth 64, 14 at 16 GiB, minutes for a 1 TiB disk.
    """
    size = layers[0].size
    if size == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint16), empty
    per_layer = []
    cuts = [np.array([0, size], dtype=np.uint64)]
    for layer in layers:
        ext = layer.extents()
        ext = ext[(ext[:, 2] != UNALLOC) & (ext[:, 0] < size)]  # a copy: the layer's are shared
        ext[:, 1] = np.minimum(ext[:, 1], size)
        per_layer.append(ext)
        cuts.append(ext[:, 0])
        cuts.append(ext[:, 1])
        if layer.size < size:
            cuts.append(np.array([layer.size], dtype=np.uint64))
    bounds = np.sort(np.concatenate(cuts))
    bounds = bounds[np.concatenate(([True], bounds[1:] != bounds[:-1]))]
    lo = bounds[:-1]  # elementary interval i is [bounds[i], bounds[i + 1])
    count = len(lo)
    kinds = np.full(count, UNALLOC, dtype=np.uint8)
    depths = np.full(count, len(layers) - 1, dtype=np.uint16)
    hosts = np.zeros(count, dtype=np.uint64)
    # Intervals not yet claimed, with their starts: claimed ones are only
    # marked, and dropped from these when they are half of them, so that a
    # layer costs its own extents (each found by binary search), not the disk.
    claimed = np.zeros(count, dtype=bool)
    rest = np.arange(count)
    rest_lo = lo
    stale = 0
    for depth, (layer, ext) in enumerate(zip(layers, per_layer)):
        if layer.size < size:
            # Beyond this layer's size nobody below is asked (as QEMU reads it).
            j = int(np.searchsorted(rest_lo, layer.size))
            beyond = rest[j:]
            beyond = beyond[~claimed[beyond]]
            depths[beyond] = depth - 1
            claimed[beyond] = True
            rest, rest_lo = rest[:j], rest_lo[:j]
        if not len(ext) or not len(rest):
            continue
        # The unclaimed intervals inside extent k are rest[first[k]:stop[k]].
        first = np.searchsorted(rest_lo, ext[:, 0])
        stop = np.searchsorted(rest_lo, ext[:, 1])
        counts = stop - first
        total = int(counts.sum())
        if not total:
            continue
        e = np.repeat(np.arange(len(ext)), counts)
        mine = rest[np.arange(total) - np.repeat(np.cumsum(counts) - counts - first, counts)]
        fresh = ~claimed[mine]
        mine, e = mine[fresh], e[fresh]
        claimed[mine] = True
        kind = ext[e, 2].astype(np.uint8)
        kinds[mine] = kind
        depths[mine] = depth
        # DATA: the host offset where this interval starts; COMPRESSED: the
        # descriptor of the whole cluster (the read finds the cluster's
        # start from the layer's cluster size); ZERO: nothing.
        hosts[mine] = np.where(kind == DATA, ext[e, 3] + (lo[mine] - ext[e, 0]),
                               np.where(kind == COMPRESSED, ext[e, 3], np.uint64(0)))
        stale += len(mine)
        if 2 * stale > len(rest):
            left = ~claimed[rest]
            rest, rest_lo = rest[left], rest_lo[left]
            stale = 0
    lengths = np.diff(bounds)
    continues = (
        (kinds[1:] == kinds[:-1])
        & (depths[1:] == depths[:-1])
        & (kinds[1:] != COMPRESSED)
        & ((kinds[1:] != DATA) | (hosts[:-1] + lengths[:-1] == hosts[1:]))
    )
    keep = np.concatenate(([True], ~continues))
    return lo[keep], kinds[keep], depths[keep], hosts[keep]


class ChainView:
    """Read-only random access to the disk a tip image describes."""

    def __init__(self, layers: list[Layer]) -> None:
        if not layers:
            raise ValueError("a chain needs at least one layer")
        self.layers = layers
        self.path = layers[0].path
        self.size = layers[0].size
        starts, kinds, depths, hosts = flatten_arrays(layers)
        # Plain arrays, not numpy: the read path indexes them one element
        # at a time, where numpy scalars cost several times more.
        self._starts = _array_of("Q", starts)
        self._hosts = _array_of("Q", hosts)
        self._kinds = kinds.tobytes()
        self._depths = _array_of("H", depths)
        del starts, hosts, kinds, depths
        self._fds = [layer.fd for layer in layers]
        # Layers whose own read-ahead can stream their nearly sequential pieces.
        streaming = _streaming_fds(self._fds)
        self._streaming_mask = bytes(1 if fd in streaming else 0 for fd in self._fds)
        self._ccache = DecompressedClusters(self._decompress, lambda key: self.layers[key[0]].cluster_size)
        self._seq_end = -1  # where the last read that met a compressed cluster ended
        self._ahead_to = 0  # clusters before this offset were handed to the read-ahead
        self._fd_array = array("i", self._fds)  # for the C loop
        # Layers fetched on demand (a remote mount): their bytes are made
        # present before a read touches them. Empty for local chains, whose
        # reads pay one falsy test for it.
        self._prefetch = [layer.prefetch for layer in layers]
        self._remote = any(p is not None for p in self._prefetch)

    @classmethod
    def open(cls, tip: str, *, confine: Confinement | None = None, tip_format: str | None = None,
             reopened: bool = False) -> ChainView:
        """The chain below ``tip``; ``confine``, ``tip_format`` and ``reopened`` as for ``open_chain``."""
        layers = open_chain(tip, confine=confine, tip_format=tip_format, reopened=reopened)
        try:
            return cls(layers)
        except BaseException:
            for layer in layers:
                layer.close()
            raise

    def close(self) -> None:
        self._ccache.close()  # first: its read-ahead reads the layers' files
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> ChainView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def extent_count(self) -> int:
        return len(self._starts)

    def index_bytes(self) -> int:
        """Memory the flattened index takes (the per-extent arrays)."""
        return (
            self._starts.itemsize * len(self._starts)
            + self._hosts.itemsize * len(self._hosts)
            + len(self._kinds)
            + self._depths.itemsize * len(self._depths)
        )

    def memory_bytes(self) -> int:
        """What keeping this view open costs beyond its file descriptors
        (with the decompressed clusters it keeps, if it has read any)."""
        return self.index_bytes() + self._ccache.memory_bytes()

    def _extent_end(self, i: int) -> int:
        return self._starts[i + 1] if i + 1 < len(self._starts) else self.size

    def read(self, offset: int, length: int, nowait: bool = False, into: bytearray | None = None) -> bytearray:
        """Bytes [offset, offset+length) clipped to the disk size.

        With ``nowait``, raise WouldBlock instead of waiting for the disk:
        a caller on an event loop reads inline when the page cache has it
        all and sends only misses to a thread. ``into``: a buffer to reuse
        when it is exactly the clipped length (every byte is written,
        holes too); otherwise a new one is allocated.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if end <= offset:
            return bytearray()
        if into is not None and len(into) == end - offset:
            self._fill(offset, memoryview(into), zeroed=False, nowait=nowait)
            return into
        buf = aligned_buffer(end - offset)  # zero-filled: holes cost nothing
        self._fill(offset, memoryview(buf), zeroed=True, nowait=nowait)
        return buf

    def advise(self, offset: int, length: int) -> int:
        """Ask the kernel to start reading what [offset, offset+length) needs.

        A deep chain scatters a sequential read over many files in small
        pieces, too small for each file's own read-ahead to notice; telling
        the kernel ahead of time (POSIX_FADV_WILLNEED, runs merged per file)
        keeps the disk busy while the reader works. A layer whose pieces here
        are mostly in file order is left to its own read-ahead when its disk
        reads ahead far (the full under a shallow chain): advice on top of
        that only competes with it. Returns the number of runs advised.
        Safe to call from a thread while others read the view (the C loop
        drops the GIL), not after close().
        """
        end = min(offset + length, self.size)
        if end <= offset:
            return 0
        if _fastread is not None:
            return int(self._advise_c(offset, end, dry=False))
        runs = self._advice_python(offset, end)
        for depth, start, n in runs:
            _willneed(self._fds[depth], start, n)
        return len(runs)

    def advice(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """What advise() would ask for: (layer depth, file offset, length) runs."""
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        if _fastread is not None:
            return list(self._advise_c(offset, end, dry=True))
        return self._advice_python(offset, end)

    def _advise_c(self, offset: int, end: int, dry: bool) -> object:
        assert _fastread is not None
        return _fastread.advise(
            offset, end, self._starts, self._hosts, self._kinds, self._depths, self._fd_array,
            self.size, self._streaming_mask, _STREAMING_SPAN, dry,
        )

    def _advice_python(self, offset: int, end: int) -> list[tuple[int, int, int]]:
        runs = self._data_runs_by_depth(offset, end)
        out = []
        for depth, mine in runs.items():
            if self._streaming_mask[depth]:
                span = max(r[1] for r in mine) - min(r[0] for r in mine)
                if span >= _STREAMING_SPAN and 2 * sum(r[1] - r[0] for r in mine) >= span:
                    continue  # mostly in file order: the file's own read-ahead streams it
            out.extend((depth, a, b - a) for a, b in mine)
        return out

    def data_runs(self, offset: int, end: int) -> list[tuple[int, int, int]]:
        """The (layer depth, file offset, length) runs of stored data that reading
        [offset, end) reads, merged per layer."""
        end = min(end, self.size)
        if end <= offset:
            return []
        return [(depth, a, b - a) for depth, mine in self._data_runs_by_depth(offset, end).items() for a, b in mine]

    def _data_runs_by_depth(self, offset: int, end: int) -> dict[int, list[list[int]]]:
        starts = self._starts
        last = len(starts) - 1
        i = max(bisect_right(starts, offset) - 1, 0)
        pos = offset
        runs: dict[int, list[list[int]]] = {}  # depth -> its merged [start, end) pieces
        while pos < end:
            stop = min(starts[i + 1] if i < last else self.size, end)
            if self._kinds[i] == DATA:
                depth = self._depths[i]
                host = self._hosts[i] + (pos - starts[i])
                mine = runs.get(depth)
                if mine is None:
                    runs[depth] = [[host, host + (stop - pos)]]
                elif mine[-1][1] == host:
                    mine[-1][1] = host + (stop - pos)
                else:
                    mine.append([host, host + (stop - pos)])
            pos = stop
            i += 1
        return runs

    def readinto(self, offset: int, out: memoryview) -> None:
        """Fill all of ``out`` with the disk's bytes from ``offset`` on."""
        if offset < 0 or offset + len(out) > self.size:
            raise ValueError("read outside the disk")
        self._fill(offset, out, zeroed=False)

    def _fill(self, offset: int, out: memoryview, zeroed: bool, nowait: bool = False) -> None:
        if not out:
            return
        if self._remote:
            self._fill_remote(offset, out, zeroed, nowait)
            return
        self._fill_local(offset, out, zeroed, nowait)

    def _fill_remote(self, offset: int, out: memoryview, zeroed: bool, nowait: bool) -> None:
        """Have each fetched layer make the data runs this read needs present (and
        keep them until read), then read as from local files. Compressed
        clusters are fetched by the layer's own reads (``read_compressed``)."""
        releases = []
        try:
            for depth, start, n in self.data_runs(offset, offset + len(out)):
                fetch = self._prefetch[depth]
                if fetch is not None:
                    releases.append(fetch(start, n, nowait))
            self._fill_local(offset, out, zeroed, nowait)
        finally:
            for release in releases:
                release()

    def _fill_local(self, offset: int, out: memoryview, zeroed: bool, nowait: bool = False) -> None:
        if _fastread is None:
            self._fill_python(offset, out, zeroed, nowait)
            return
        # The C loop stops only at a compressed extent (or a nowait miss):
        # decompress that one here and let it go on after it.
        flags = (_fastread.NOWAIT if nowait else 0) | (_fastread.ZEROED if zeroed else 0)
        end = offset + len(out)
        pos = offset
        while True:
            pos = _fastread.fill(
                out[pos - offset :], pos, self._starts, self._hosts, self._kinds, self._depths,
                self._fd_array, self.size, flags,
            )
            if pos < 0:
                raise WouldBlock()
            if pos >= end:
                return
            # The compressed extents from here on (a compressed backup has
            # one per cluster) in one Python pass, not one pass each.
            i = bisect_right(self._starts, pos) - 1
            starts, kinds, last = self._starts, self._kinds, len(self._starts) - 1
            j = i
            while j < last and starts[j + 1] < end and kinds[j + 1] == COMPRESSED:
                j += 1
            stop = min(self._extent_end(j), end)
            self._fill_python(pos, out[pos - offset : stop - offset], zeroed, nowait)
            pos = stop

    def _fill_python(self, offset: int, out: memoryview, zeroed: bool, nowait: bool = False) -> None:
        # One pass per extent, and a 1 GiB disk at depth 64 has ~8000 of
        # them: locals instead of attribute lookups, the first preadv
        # inline (measured ~5 us per extent before, ~0.5-1 us less now;
        # most of what remains is the syscall itself).
        end = offset + len(out)
        starts = self._starts
        kinds = self._kinds
        last = len(starts) - 1
        i = bisect_right(starts, offset) - 1
        pos = offset
        met_compressed = False
        while pos < end:
            stop = starts[i + 1] if i < last else self.size
            if stop > end:
                stop = end
            kind = kinds[i]
            if kind == DATA:
                view = out[pos - offset : stop - offset]
                fd = self._fds[self._depths[i]]
                host = self._hosts[i] + (pos - starts[i])
                if nowait:
                    read_cached(fd, view, host)
                else:
                    n = os.preadv(fd, [view], host)
                    if n < len(view):
                        self._pread_into(fd, view, host, n)
            elif kind == COMPRESSED:
                if not met_compressed:
                    met_compressed = True
                    self._read_ahead(offset, end)
                if nowait and not self._ccache.ready((self._depths[i], self._hosts[i])):
                    raise WouldBlock()
                cluster = self._compressed(i)
                cs = self.layers[self._depths[i]].cluster_size
                cstart = pos - pos % cs
                out[pos - offset : stop - offset] = cluster[pos - cstart : stop - cstart]
            elif not zeroed:
                _zero(out[pos - offset : stop - offset])
            pos = stop
            i += 1

    @staticmethod
    def _pread_into(fd: int, view: memoryview, host: int, done: int = 0) -> None:
        """Finish filling ``view`` from ``host`` on, ``done`` bytes already read."""
        want = len(view)
        while done < want:
            n = os.preadv(fd, [view[done:]], host + done)
            if n == 0:
                # Past EOF: QEMU reads zeros there (a short last cluster).
                view[done:] = bytes(want - done)
                return
            done += n

    def pending(self, offset: int, length: int) -> list[Future[list[bytes | None]]] | None:
        """What a nowait read of [offset, offset+length) that raised WouldBlock
        can wait for: the decompressions of its compressed clusters (those
        not cached nor under way are started now, on the workers), so that a
        caller on an event loop waits for them there and reads again, with
        no thread of its own. None when the range has no compressed cluster
        (the miss was the page cache's). Safe from any thread."""
        end = min(offset + length, self.size)
        starts, kinds, last = self._starts, self._kinds, len(self._starts) - 1
        i = bisect_right(starts, offset) - 1
        keys = []
        while i <= last and starts[i] < end:
            if kinds[i] == COMPRESSED:
                keys.append((self._depths[i], self._hosts[i]))
            i += 1
        if not keys:
            return None
        return self._ccache.pending(keys)

    def _compressed(self, i: int) -> bytes:
        # A view is read from several threads at once (the mount's event
        # loop and its workers): the cache is safe across them (ccache.py).
        return self._ccache.get((self._depths[i], self._hosts[i]))

    def _decompress(self, key: tuple[int, int]) -> bytes:
        depth, descriptor = key
        return self.layers[depth].read_compressed(descriptor)

    def _read_ahead(self, offset: int, end: int) -> None:
        """A read of [offset, end) met a compressed cluster: if it follows
        the last such read, have the compressed clusters after ``end``
        decompressed ahead (engine/ccache.py says why)."""
        # Near where the last one ended: the kernel sends a sequential
        # reader's requests a few at a time, not always in order.
        sequential = abs(offset - self._seq_end) <= max(end - offset, _NEAR)
        self._seq_end = max(end, self._seq_end) if sequential else end
        if not sequential:
            return  # random reads decompress only what they ask
        if end + AHEAD_BYTES // 2 < self._ahead_to <= end + AHEAD_BYTES:
            return  # far enough ahead already
        # Go on from where the read-ahead stopped, unless that was another
        # pass (a reader starting over, or skipping ahead).
        start = self._ahead_to if end <= self._ahead_to <= end + AHEAD_BYTES else end
        stop = min(end + AHEAD_BYTES, self.size)
        starts, kinds, depths, hosts = self._starts, self._kinds, self._depths, self._hosts
        keys = []
        j = bisect_right(starts, start) - 1
        while j < len(starts) and starts[j] < stop:
            if kinds[j] == COMPRESSED:
                keys.append((depths[j], hosts[j]))
            j += 1
        self._ahead_to = stop
        self._ccache.prefetch(keys)

    def map(self) -> Iterator[MapEntry]:
        """Runs like `qemu-img map --output=json`: merged where all fields agree.

        Where runs end is found in numpy, a chunk of the index at a time:
        a small image can map millions of clusters that all merge into one
        run, and a Python step per extent took a minute to say so.
        """
        n = len(self._starts)
        if not n:
            return
        first = 0
        for stop in self._map_breaks():
            yield self._map_entry(first, stop)
            first = stop
        yield self._map_entry(first, n)

    def _map_breaks(self) -> Iterator[int]:
        """Index entries that begin a new map run (after the first), in order."""
        starts = np.frombuffer(self._starts, dtype=np.uint64)
        hosts = np.frombuffer(self._hosts, dtype=np.uint64)
        kinds = np.frombuffer(self._kinds, dtype=np.uint8)
        depths = np.frombuffer(self._depths, dtype=np.uint16)
        n = len(starts)
        for a in range(1, n, _MAP_CHUNK):
            b = min(a + _MAP_CHUNK, n)
            cur, prev = slice(a, b), slice(a - 1, b - 1)
            kind = kinds[cur]
            joins = (
                (kind == kinds[prev])
                & (depths[cur] == depths[prev])
                & ((kind != DATA) | (hosts[prev] + (starts[cur] - starts[prev]) == hosts[cur]))
            )
            yield from (np.flatnonzero(~joins) + a).tolist()

    def _map_entry(self, first: int, stop: int) -> MapEntry:
        """The map run of index entries [first, stop)."""
        start = self._starts[first]
        length = self._extent_end(stop - 1) - start
        kind = self._kinds[first]
        depth = self._depths[first]
        if kind == DATA:
            return MapEntry(start, length, depth, True, False, True, self._hosts[first])
        if kind == COMPRESSED:
            return MapEntry(start, length, depth, True, False, True, None, True)
        if kind == ZERO:
            return MapEntry(start, length, depth, True, True, False, None)
        return MapEntry(start, length, depth, False, True, False, None)

    def allocated_ranges(self) -> Iterator[tuple[int, int]]:
        """Ranges that may hold non-zero bytes (data or compressed)."""
        for i in range(len(self._starts)):
            if self._kinds[i] in (DATA, COMPRESSED):
                yield self._starts[i], self._extent_end(i)


# advise() leaves a layer's pieces to the kernel when its disk reads ahead at
# least this far by itself, and the pieces fill at least half of a span of
# at least _STREAMING_SPAN (see engine/readahead.py for the measurements).
_STREAMING_READ_AHEAD = 4 * 1024 * 1024
_STREAMING_SPAN = 1024 * 1024


_ZEROS = memoryview(bytes(1024 * 1024))


def _streaming_fds(fds: list[int]) -> set[int]:
    """The fds whose disk reads ahead at least _STREAMING_READ_AHEAD by itself.

    Asked once per file system, not per layer: a chain's layers usually
    share one, and each sysfs lookup opens files (a 64-deep open spent a
    quarter of its 20 ms on them).
    """
    by_dev: dict[int, int | None] = {}
    streaming = set()
    for fd in set(fds):
        try:
            dev = os.fstat(fd).st_dev
        except OSError:
            continue
        if dev not in by_dev:
            by_dev[dev] = device_read_ahead(dev)
        ra = by_dev[dev]
        if ra is not None and ra >= _STREAMING_READ_AHEAD:
            streaming.add(fd)
    return streaming


def _array_of(typecode: str, values: np.ndarray) -> array:
    """A plain array of ``values`` in one copy (tobytes() first made two)."""
    out = array(typecode)
    out.frombytes(memoryview(np.ascontiguousarray(values)).cast("B"))
    return out


def _zero(view: memoryview) -> None:
    for i in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - i)
        view[i : i + n] = _ZEROS[:n]


def _willneed(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # advice only


def aligned_buffer(n: int) -> bytearray:
    """A zeroed bytearray of ``n`` bytes that does not start 1-31 bytes into a page.

    preadv copies page-cache pages (page-aligned) into it with ``rep movsb``,
    which this machine's AMD EPYC runs 4x slower when the destination sits
    1 to 31 bytes past the source's offset in its page (measured: 0.13 s
    per GiB at offsets 0 or 32+, 0.45-0.59 s at 4-28). malloc hands out
    large blocks 16 bytes into a page, so without this a process can read
    every chunk at a quarter of the speed. Dropping a bytearray's first
    bytes only advances its start in CPython (no copy).
    """
    buf = bytearray(n + 32)
    if n:
        page_offset = ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 4096
        if 0 < page_offset < 32:
            del buf[: 32 - page_offset]
    del buf[n:]
    return buf


__all__ = ["ChainView", "MapEntry", "WouldBlock", "aligned_buffer", "flatten", "flatten_arrays"]
