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
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from engine.qcow2.backing import open_chain
from engine.qcow2.layers import COMPRESSED, DATA, UNALLOC, ZERO, Layer

_COMPRESSED_CACHE = 16


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

    A range nobody holds is UNALLOC with the depth of the last layer that
    was consulted: the bottom layer, or the layer whose backing file is too
    short to reach the range (both as `qemu-img map` reports them).

    Work is linear in the extents of all layers plus the pieces produced:
    each layer's extents are walked once against the sorted list of ranges
    still unclaimed (two parallel lists, found with bisect), and only the
    ranges an extent touches are split.
    """
    size = layers[0].size
    pieces: list[tuple[int, int, int, int, int]] = []
    hs: list[int] = [0] if size else []  # unclaimed ranges: starts...
    he: list[int] = [size] if size else []  # ...and ends
    for depth, layer in enumerate(layers):
        if not hs:
            break
        if he[-1] > layer.size:
            # Beyond this layer's size nobody below is asked (as QEMU reads it).
            j = bisect_right(he, layer.size)
            if j < len(hs) and hs[j] < layer.size:
                pieces.append((layer.size, he[j], UNALLOC, depth - 1, 0))
                he[j] = layer.size
                j += 1
            pieces.extend((a, b, UNALLOC, depth - 1, 0) for a, b in zip(hs[j:], he[j:]))
            del hs[j:], he[j:]
            if not hs:
                break
        j = 0
        for start, end, kind, host in layer.allocation():
            if kind == UNALLOC:
                continue
            j = bisect_right(he, start, j)  # the first unclaimed range ending after start
            k = j
            new_s: list[int] = []
            new_e: list[int] = []
            while k < len(hs) and hs[k] < end:
                a = hs[k] if hs[k] > start else start
                b = he[k] if he[k] < end else end
                if kind == DATA:
                    pieces.append((a, b, DATA, depth, host + (a - start)))
                elif kind == COMPRESSED:
                    # Compressed extents are whole clusters; the read finds
                    # the cluster's start from the layer's cluster size.
                    pieces.append((a, b, COMPRESSED, depth, host))
                else:
                    pieces.append((a, b, ZERO, depth, 0))
                if hs[k] < a:
                    new_s.append(hs[k])
                    new_e.append(a)
                if b < he[k]:
                    new_s.append(b)
                    new_e.append(he[k])
                k += 1
            if k > j:
                hs[j:k] = new_s
                he[j:k] = new_e
    last = len(layers) - 1
    pieces.extend((a, b, UNALLOC, last, 0) for a, b in zip(hs, he))
    pieces.sort()
    return _coalesce_pieces(pieces)


def _coalesce_pieces(
    pieces: list[tuple[int, int, int, int, int]],
) -> list[tuple[int, int, int, int, int]]:
    out: list[tuple[int, int, int, int, int]] = []
    for p in pieces:
        if out:
            s, e, k, d, h = out[-1]
            if (
                e == p[0]
                and k == p[2]
                and d == p[3]
                and k != COMPRESSED
                and (k != DATA or h + (e - s) == p[4])
            ):
                out[-1] = (s, p[1], k, d, h)
                continue
        out.append(p)
    return out


class ChainView:
    """Read-only random access to the disk a tip image describes."""

    def __init__(self, layers: list[Layer]) -> None:
        if not layers:
            raise ValueError("a chain needs at least one layer")
        self.layers = layers
        self.path = layers[0].path
        self.size = layers[0].size
        flat = flatten(layers)
        self._starts = array("Q", (p[0] for p in flat))
        self._hosts = array("Q", (p[4] for p in flat))
        self._kinds = bytes(p[2] for p in flat)
        self._depths = array("H", (p[3] for p in flat))
        self._fds = [layer.fd for layer in layers]
        self._ccache: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    @classmethod
    def open(cls, tip: str) -> ChainView:
        layers = open_chain(tip)
        try:
            return cls(layers)
        except BaseException:
            for layer in layers:
                layer.close()
            raise

    def close(self) -> None:
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

    def _extent_end(self, i: int) -> int:
        return self._starts[i + 1] if i + 1 < len(self._starts) else self.size

    def read(self, offset: int, length: int, nowait: bool = False) -> bytearray:
        """Bytes [offset, offset+length) clipped to the disk size.

        With ``nowait``, raise WouldBlock instead of waiting for the disk:
        a caller on an event loop reads inline when the page cache has it
        all and sends only misses to a thread.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if end <= offset:
            return bytearray()
        buf = _copy_friendly_bytearray(end - offset)  # zero-filled: holes cost nothing
        self._fill(offset, memoryview(buf), zeroed=True, nowait=nowait)
        return buf

    def advise(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading what [offset, offset+length) needs.

        A deep chain scatters a sequential read over many files in small
        pieces, too small for each file's own read-ahead to notice; telling
        the kernel ahead of time (POSIX_FADV_WILLNEED, runs merged per file)
        keeps the disk busy while the reader works.
        """
        end = min(offset + length, self.size)
        if end <= offset:
            return
        starts = self._starts
        last = len(starts) - 1
        i = max(bisect_right(starts, offset) - 1, 0)
        pos = offset
        runs: dict[int, list[int]] = {}  # fd -> [start, end] of the run being merged
        while pos < end:
            stop = min(starts[i + 1] if i < last else self.size, end)
            if self._kinds[i] == DATA:
                fd = self._fds[self._depths[i]]
                host = self._hosts[i] + (pos - starts[i])
                run = runs.get(fd)
                if run is not None and run[1] == host:
                    run[1] = host + (stop - pos)
                else:
                    if run is not None:
                        _willneed(fd, run[0], run[1] - run[0])
                    runs[fd] = [host, host + (stop - pos)]
            pos = stop
            i += 1
        for fd, (a, b) in runs.items():
            _willneed(fd, a, b - a)

    def readinto(self, offset: int, out: memoryview) -> None:
        """Fill all of ``out`` with the disk's bytes from ``offset`` on."""
        if offset < 0 or offset + len(out) > self.size:
            raise ValueError("read outside the disk")
        self._fill(offset, out, zeroed=False)

    def _fill(self, offset: int, out: memoryview, zeroed: bool, nowait: bool = False) -> None:
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
                    try:
                        n = os.preadv(fd, [view], host, _RWF_NOWAIT)
                    except BlockingIOError:
                        raise WouldBlock() from None
                    if n < len(view):
                        raise WouldBlock()  # part cached, or EOF: the waiting read sorts it out
                else:
                    n = os.preadv(fd, [view], host)
                    if n < len(view):
                        self._pread_into(fd, view, host, n)
            elif kind == COMPRESSED:
                if nowait and (self._depths[i], self._hosts[i]) not in self._ccache:
                    raise WouldBlock()
                cluster = self._compressed(i)
                cs = self.layers[self._depths[i]].cluster_size
                cstart = pos - pos % cs
                out[pos - offset : stop - offset] = cluster[pos - cstart : stop - cstart]
            elif not zeroed:
                out[pos - offset : stop - offset] = bytes(stop - pos)
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

    def _compressed(self, i: int) -> bytes:
        depth = self._depths[i]
        descriptor = self._hosts[i]
        key = (depth, descriptor)
        data = self._ccache.get(key)
        if data is None:
            data = self.layers[depth].read_compressed(descriptor)
            self._ccache[key] = data
            if len(self._ccache) > _COMPRESSED_CACHE:
                self._ccache.popitem(last=False)
        else:
            self._ccache.move_to_end(key)
        return data

    def map(self) -> Iterator[MapEntry]:
        """Runs like `qemu-img map --output=json`: merged where all fields agree."""
        pending: MapEntry | None = None
        for i in range(len(self._starts)):
            start = self._starts[i]
            length = self._extent_end(i) - start
            kind = self._kinds[i]
            depth = self._depths[i]
            if kind == DATA:
                entry = MapEntry(start, length, depth, True, False, True, self._hosts[i])
            elif kind == COMPRESSED:
                entry = MapEntry(start, length, depth, True, False, True, None, True)
            elif kind == ZERO:
                entry = MapEntry(start, length, depth, True, True, False, None)
            else:
                entry = MapEntry(start, length, depth, False, True, False, None)
            if pending is not None and _mergeable(pending, entry):
                pending = MapEntry(
                    pending.start,
                    pending.length + entry.length,
                    pending.depth,
                    pending.present,
                    pending.zero,
                    pending.data,
                    pending.offset,
                    pending.compressed,
                )
                continue
            if pending is not None:
                yield pending
            pending = entry
        if pending is not None:
            yield pending

    def allocated_ranges(self) -> Iterator[tuple[int, int]]:
        """Ranges that may hold non-zero bytes (data or compressed)."""
        for i in range(len(self._starts)):
            if self._kinds[i] in (DATA, COMPRESSED):
                yield self._starts[i], self._extent_end(i)


class WouldBlock(Exception):
    """A nowait read needed the disk."""


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _willneed(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # advice only


def _copy_friendly_bytearray(n: int) -> bytearray:
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


def _mergeable(a: MapEntry, b: MapEntry) -> bool:
    if (a.depth, a.present, a.zero, a.data, a.compressed) != (
        b.depth,
        b.present,
        b.zero,
        b.data,
        b.compressed,
    ):
        return False
    if a.compressed:
        return True
    if a.offset is None or b.offset is None:
        return a.offset is None and b.offset is None
    return a.offset + a.length == b.offset


__all__ = ["ChainView", "MapEntry", "flatten"]
