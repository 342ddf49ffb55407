"""One image of a chain, read on its own: what it holds, where, and how.

A layer answers one question for the chain: for each guest range, is it
data here (at which host offset), zeros here, compressed here, or not here
at all (ask the backing file). ``allocation()`` answers it for the whole
layer at once, as a sorted, coalesced list of extents, because the chain
index is built from whole layers and a per-request walk of L1/L2 tables
would make a read at depth 64 cost 64 table walks.

Nothing here follows backing links; ``engine.qcow2.chain_open`` does.
"""

from __future__ import annotations

import os
import stat
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import zstandard

from engine.errors import OUT_OF_RESOURCES, ImageError
from engine.fsutil import file_size
from engine.qcow2.format import (
    COMPRESSION_ZSTD,
    L1E_RESERVED,
    L2E_RESERVED,
    MAGIC,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    Header,
    parse_header,
)

# Extent kinds, shared with the chain index.
DATA = 0  # bytes stored in the layer file at a host offset
ZERO = 1  # reads as zeros here, does not fall through
COMPRESSED = 2  # one whole compressed cluster; host holds the L2 descriptor
UNALLOC = 3  # not in this layer: ask the backing file (or zeros if none)

KIND_NAMES = {DATA: "data", ZERO: "zero", COMPRESSED: "compressed", UNALLOC: "unallocated"}


class Extent(NamedTuple):
    start: int
    end: int
    kind: int
    host: int  # DATA: host offset of `start`; COMPRESSED: the descriptor; else 0


def coalesce(extents: list[Extent]) -> list[Extent]:
    """Merge neighbours of the same kind (DATA only if host-contiguous)."""
    out: list[Extent] = []
    for ext in extents:
        if out:
            last = out[-1]
            if (
                last.end == ext.start
                and last.kind == ext.kind
                and ext.kind != COMPRESSED
                and (ext.kind != DATA or last.host + (last.end - last.start) == ext.host)
            ):
                out[-1] = Extent(last.start, ext.end, last.kind, last.host)
                continue
        out.append(ext)
    return out


def coalesce_rows(rows: np.ndarray) -> np.ndarray:
    """``coalesce`` for extents as rows of (start, end, kind, host), vectorised."""
    if len(rows) < 2:
        return rows
    start, end, kind, host = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    cont = (
        (end[:-1] == start[1:])
        & (kind[:-1] == kind[1:])
        & (kind[1:] != COMPRESSED)
        & ((kind[1:] != DATA) | (host[:-1] + (end[:-1] - start[:-1]) == host[1:]))
    )
    first = np.flatnonzero(np.concatenate(([True], ~cont)))
    last = np.append(first[1:], len(rows)) - 1
    out = rows[first]  # a copy (fancy indexing)
    out[:, 1] = end[last]
    return out


def join_rows(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate row arrays that are each coalesced already (consecutive
    guest ranges of one layer), merging only across the seams: coalescing
    the whole again cost several times its size in temporaries."""
    kept: list[np.ndarray] = []
    for part in parts:
        if not len(part):
            continue
        if kept:
            tail, head = kept[-1][-1], part[0]
            kind = int(head[2])
            if (
                int(tail[1]) == int(head[0])
                and int(tail[2]) == kind
                and kind != COMPRESSED
                and (kind != DATA or int(tail[3]) + int(tail[1]) - int(tail[0]) == int(head[3]))
            ):
                if not kept[-1].flags.writeable:
                    kept[-1] = kept[-1].copy()
                kept[-1][-1, 1] = head[1]
                part = part[1:]
                if not len(part):
                    continue
        kept.append(part)
    if not kept:
        return np.zeros((0, 4), dtype=np.uint64)
    return kept[0] if len(kept) == 1 else np.concatenate(kept)


def _rows(extents: list[Extent]) -> np.ndarray:
    return np.array(extents, dtype=np.uint64).reshape(-1, 4)


class Layer:
    """Common face of a qcow2 or raw layer."""

    path: str
    fd: int
    size: int
    file_size: int
    format: str
    backing_file: str | None = None
    backing_format: str | None = None
    cluster_size: int = 0
    # A layer whose bytes are fetched on demand (a remote object through its
    # cache, engine/remote/objcache.py): called with (offset, length, nowait)
    # before those bytes of ``fd`` are read (and ahead=False for the layer's
    # own header and tables); makes them present and returns what to call
    # once they are read. None for a local file: nothing to do.
    prefetch: Callable[..., Callable[[], None]] | None = None

    def allocation(self) -> list[Extent]:
        """The layer's extents, coalesced, covering its size."""
        new = tuple.__new__  # an Extent without its __new__'s keyword handling: 40% faster
        return [new(Extent, r) for r in self.extents().tolist()]

    def extents(self) -> np.ndarray:
        """``allocation()`` as rows of (start, end, kind, host): read-only, maybe shared.

        The chain index is built from these; a 64-deep chain of a 1 TiB
        disk has millions of extents, too many to pass around as tuples.
        """
        raise NotImplementedError

    def read_compressed(self, descriptor: int) -> bytes:
        raise ImageError(self.path, "raw layers have no compressed clusters")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Layer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawLayer(Layer):
    """A raw file or block device as a layer: every byte is its own data.

    Holes of sparse files are reported as zeros (SEEK_HOLE), as QEMU does,
    so maps agree and reads skip them.
    """

    format = "raw"

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if fd is None else fd
        try:
            self.file_size = file_size(self.fd)
        except BaseException:
            self.close()  # the descriptor is the layer's from the start, as Qcow2Layer's
            raise
        # Whole sectors, as QEMU sees a raw file: a short last one reads
        # zeros to its end (a 1000-byte file is a 1024-byte disk).
        self.size = -(-self.file_size // 512) * 512
        self._extents: np.ndarray | None = None

    def extents(self) -> np.ndarray:
        if self._extents is None:
            self._extents = _rows(coalesce(self._scan_holes()))
            self._extents.flags.writeable = False
        return self._extents

    def _scan_holes(self) -> list[Extent]:
        out: list[Extent] = []
        pos = 0
        try:
            while pos < self.size:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == 6:  # ENXIO: only a hole up to the end
                        out.append(Extent(pos, self.size, ZERO, 0))
                        return out
                    raise
                data = min(data, self.size)
                if data > pos:
                    out.append(Extent(pos, data, ZERO, 0))
                if data >= self.size:
                    return out
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), self.size)
                out.append(Extent(data, hole, DATA, data))
                pos = hole
        except OSError:
            # SEEK_DATA unsupported (block devices, some filesystems): all data.
            return [Extent(0, self.size, DATA, 0)] if self.size else []
        return out


class Qcow2Layer(Layer):
    """A qcow2 image (v2 or v3) opened read-only and validated."""

    format = "qcow2"

    def __init__(self, path: str, fd: int | None = None,
                 prefetch: Callable[..., Callable[[], None]] | None = None) -> None:
        self.path = path
        self.prefetch = prefetch
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if fd is None else fd
        try:
            self.file_size = file_size(self.fd)
            # The header cluster only: 4 KiB tells its size (opening a chain
            # of 64 images reads 64 headers, not 64 times 2 MiB).
            first = self._pread(4096, 0, "header")
            if len(first) >= 24:
                cluster_bits = int.from_bytes(first[20:24], "big")
                if 12 < cluster_bits <= 21:
                    first += self._pread((1 << cluster_bits) - 4096, 4096, "header")
            self.header: Header = parse_header(path, first, self.file_size)
        except BaseException:
            self.close()
            raise
        h = self.header
        # In whole sectors, as QEMU counts it: a size that is not (no
        # qemu-img makes one) loses its last partial sector, and an image
        # above reads zeros there, not this one's backing file.
        self.size = h.size - h.size % 512
        self.cluster_size = h.cluster_size
        self.backing_file = h.backing_file
        self.backing_format = h.backing_format
        self._extents: np.ndarray | None = None
        self._zstd = h.compression_type == COMPRESSION_ZSTD

    # -- tables ---------------------------------------------------------

    def _pread(self, length: int, offset: int, what: str) -> bytes:
        """os.pread, with a failure (a bad sector: EIO) naming the file and what was read."""
        # A fetched layer makes the bytes present first, and is told when they are read.
        release = self.prefetch(offset, length, False, ahead=False) if self.prefetch is not None else None
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise ImageError(self.path, f"cannot read the {what} at {offset:#x}: {e.strerror}") from None
        finally:
            if release is not None:
                release()

    def _pread_exact(self, length: int, offset: int, what: str) -> bytes:
        data = self._pread(length, offset, what)
        if len(data) != length:
            raise ImageError(self.path, f"{what} at {offset:#x} is truncated")
        return data

    def l1_table(self) -> np.ndarray:
        """The active L1 entries that cover the virtual size."""
        n = self.header.l1_entries_needed()
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        raw = self._pread_exact(n * 8, self.header.l1_table_offset, "L1 table")
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def l2_offsets(self) -> np.ndarray:
        """Rows of (l1 index, L2 table offset) for every allocated L2 table, validated.

        A table referenced twice by the active L1 is refused: valid images
        never do it, and it is how a small hostile file would make us walk
        terabytes of mappings. Checked as arrays: an L1 table may hold 4
        million entries, and a set and a tuple for each took hundreds of MB.
        """
        l1 = self.l1_table()
        cs = self.cluster_size
        bad = np.flatnonzero(l1 & np.uint64(L1E_RESERVED))
        if bad.size:
            i = int(bad[0])
            raise ImageError(self.path, f"L1 entry {i} has reserved bits set ({int(l1[i]):#x})")
        offsets = l1 & np.uint64(OFFSET_MASK)
        used = np.flatnonzero(offsets)
        offs = offsets[used]
        misaligned = (offs % np.uint64(cs)) != 0
        outside = offs + np.uint64(cs) > np.uint64(self.file_size)
        again = np.ones(len(offs), dtype=bool)  # an offset met before, in L1 order
        again[np.unique(offs, return_index=True)[1]] = False
        wrong = np.flatnonzero(misaligned | outside | again)
        if wrong.size:
            k = int(wrong[0])
            i, off = int(used[k]), int(offs[k])
            if misaligned[k]:
                raise ImageError(self.path, f"L2 table offset {off:#x} (L1 entry {i}) is not cluster-aligned")
            if outside[k]:
                raise ImageError(self.path, f"L2 table at {off:#x} (L1 entry {i}) lies outside the file")
            raise ImageError(self.path, f"L2 table at {off:#x} is referenced twice by the L1 table")
        return np.stack((used.astype(np.int64), offs.astype(np.int64)), axis=1)

    def decode_l2(self, l1_index: int, l2_offset: int) -> np.ndarray:
        """Extents of one L2 table as rows, clipped to the virtual size, validated."""
        if not self.header.extended_l2:
            per_l2 = self.header.l2_entries * self.cluster_size
            start = l1_index * per_l2
            return self._decode_tables([(l1_index, l2_offset)], start, min(start + per_l2, self.size))
        h = self.header
        cs = self.cluster_size
        n_entries = h.l2_entries
        guest0 = l1_index * n_entries * cs
        n_valid = min(n_entries, (self.size - guest0 + cs - 1) // cs)
        raw = self._pread_exact(cs, l2_offset, "L2 table")
        words = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        entries = words[0 : 2 * n_valid : 2]
        bitmaps = words[1 : 2 * n_valid : 2]
        def where(j: int) -> tuple[int, int, int]:
            return l2_offset, j, guest0 + j * cs

        def fail(mask: np.ndarray, problem: str) -> None:
            self._refuse_first(mask, problem, entries, where)

        compressed, std, host = self._check_entries(entries, where)
        # Extended L2: 32 subclusters a cluster, each allocated, zero or absent.
        alloc = bitmaps & np.uint64(0xFFFFFFFF)
        zbits = bitmaps >> np.uint64(32)
        fail(std & ((alloc & zbits) != 0), "subcluster both allocated and zero")
        fail(std & (alloc != 0) & (host == 0), "allocated subclusters without a host cluster")
        sc = cs // SUBCLUSTERS
        shifts = np.arange(SUBCLUSTERS, dtype=np.uint64)
        a = ((alloc[:, None] >> shifts) & np.uint64(1)).astype(bool)
        z = ((zbits[:, None] >> shifts) & np.uint64(1)).astype(bool)
        kinds = np.full((n_valid, SUBCLUSTERS), UNALLOC, dtype=np.uint8)
        kinds[a] = DATA
        kinds[z] = ZERO
        kinds[compressed, :] = COMPRESSED
        hosts = np.where(
            compressed[:, None],
            entries[:, None],
            np.where(a, host[:, None] + shifts * np.uint64(sc), np.uint64(0)),
        )
        return _runs(kinds.ravel(), hosts.ravel(), guest0, sc, SUBCLUSTERS, self.size)

    def _check_entries(
        self, entries: np.ndarray, where: Callable[[int], tuple[int, int, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate L2 entries; (compressed, standard, host offset) masks and values.

        ``where(j)`` names entry j for the message: (its table's offset, its
        index in that table, its guest offset).
        """
        cs = self.cluster_size
        compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
        std = ~compressed
        host = entries & np.uint64(OFFSET_MASK)

        def fail(mask: np.ndarray, problem: str) -> None:
            self._refuse_first(mask, problem, entries, where)

        fail(std & ((entries & np.uint64(L2E_RESERVED)) != 0), "L2 entry has reserved bits set")
        fail(std & ((host & np.uint64(cs - 1)) != 0), "data cluster offset is not cluster-aligned")
        fail(std & (host != 0) & (host >= np.uint64(self.file_size)), "data cluster lies outside the file")
        if compressed.any():
            coff = entries & np.uint64((1 << self.header.csize_shift) - 1)
            fail(compressed & (coff >= np.uint64(self.file_size)), "compressed cluster lies outside the file")
            fail(compressed & (coff < np.uint64(cs)), "compressed cluster overlaps the header")
        # With extended L2 entries bit 0 means nothing (the subcluster
        # bitmap says what reads as zeros): QEMU ignores it, and so do we.
        if not self.header.extended_l2 and self.header.version < 3:
            # Version 2 has no zero clusters: QEMU refuses the entry as corrupt.
            fail(std & ((entries & np.uint64(OFLAG_ZERO)) != 0), "zero flag in a version 2 image")
        return compressed, std, host

    def _refuse_first(
        self, mask: np.ndarray, problem: str, entries: np.ndarray, where: Callable[[int], tuple[int, int, int]]
    ) -> None:
        """Raise ImageError naming the first entry ``mask`` marks, if any."""
        idx = np.flatnonzero(mask)
        if idx.size:
            j = int(idx[0])
            table, i, guest = where(j)
            raise ImageError(
                self.path,
                f"{problem} (L2 table at {table:#x}, entry {i}, guest offset {guest:#x}: {int(entries[j]):#x})",
            )

    def _decode_batches(self, tables: np.ndarray) -> np.ndarray:
        """_decode_tables over the whole disk, in batches of at most
        _BATCH_ENTRIES entries: its temporaries cost ~100 bytes an entry, so
        a layer of millions of clusters mapped all at once (a big image a
        VM wrote at random) took gigabytes on top of its extents."""
        per_batch = max(1, _BATCH_ENTRIES // self.header.l2_entries)
        if len(tables) <= per_batch:
            return self._decode_tables(tables.tolist(), 0, self.size)
        per_l2 = self.header.l2_entries * self.cluster_size
        parts: list[np.ndarray] = []
        start = 0
        for k in range(0, len(tables), per_batch):
            batch = tables[k : k + per_batch].tolist()
            end = int(tables[k + per_batch, 0]) * per_l2 if k + per_batch < len(tables) else self.size
            parts.append(self._decode_tables(batch, start, end))
            start = end
        return join_rows(parts)

    def _decode_tables(self, tables: list[tuple[int, int]], start: int, end: int) -> np.ndarray:
        """Rows for guest ``[start, end)`` from standard L2 tables (l1 index, offset), in order.

        All the tables at once, and only their non-zero entries: an
        incremental's tables are mostly empty, a 1 TiB layer has 2048 of
        them, and numpy's cost per call made a table at a time the slowest
        part of opening a deep chain.
        """
        cs = self.cluster_size
        n_entries = self.header.l2_entries
        units_total = -(-self.size // cs)
        unit_parts, entry_parts = [], []
        for i, off in tables:
            words = np.frombuffer(self._pread_exact(cs, off, "L2 table"), dtype=">u8")
            n_valid = min(n_entries, units_total - i * n_entries)
            nz = np.flatnonzero(words[:n_valid])
            if len(nz):
                unit_parts.append(nz + i * n_entries)
                entry_parts.append(words[nz])
        if not unit_parts:
            return np.array([[start, end, UNALLOC, 0]], dtype=np.uint64) if start < end else np.zeros((0, 4), np.uint64)
        units = np.concatenate(unit_parts)
        entries = np.concatenate(entry_parts).astype(np.uint64)
        offsets = dict(tables)

        def where(j: int) -> tuple[int, int, int]:
            u = int(units[j])
            return offsets[u // n_entries], u % n_entries, u * cs

        compressed, std, host = self._check_entries(entries, where)
        zero = std & ((entries & np.uint64(OFLAG_ZERO)) != 0)
        kinds = np.full(len(entries), UNALLOC, dtype=np.uint8)
        kinds[std & ~zero & (host != 0)] = DATA
        kinds[zero] = ZERO
        kinds[compressed] = COMPRESSED
        hosts = np.where(compressed, entries, np.where(kinds == DATA, host, np.uint64(0)))
        held = kinds != UNALLOC
        return _sparse_rows(units[held], kinds[held], hosts[held], cs, start, end)

    def extents(self) -> np.ndarray:
        if self._extents is None:
            key = _identity(self.fd)
            cached = _ALLOCATIONS.get(key)
            if cached is None:
                cached = self._decode_extents()
                cached.flags.writeable = False
                _ALLOCATIONS.put(key, cached)
            self._extents = cached
        return self._extents

    def _decode_extents(self) -> np.ndarray:
        tables = self.l2_offsets()
        if not self.header.extended_l2:
            return self._decode_batches(tables)
        parts: list[np.ndarray] = []
        pos = 0
        per_l2 = self.header.l2_entries * self.cluster_size
        for i, off in tables.tolist():
            start = i * per_l2
            if start > pos:
                parts.append(np.array([[pos, start, UNALLOC, 0]], dtype=np.uint64))
            parts.append(self.decode_l2(i, off))
            pos = min(start + per_l2, self.size)
        if pos < self.size:
            parts.append(np.array([[pos, self.size, UNALLOC, 0]], dtype=np.uint64))
        # Each table's extents are maximal already: only the seams merge.
        return join_rows(parts)

    # -- data -------------------------------------------------------------

    def compressed_span(self, descriptor: int) -> tuple[int, int]:
        """Host offset and byte length of a compressed cluster's data."""
        shift = self.header.csize_shift
        coffset = descriptor & ((1 << shift) - 1)
        nsectors = ((descriptor >> shift) & ((1 << (self.header.cluster_bits - 8)) - 1)) + 1
        return coffset, nsectors * 512 - (coffset & 511)

    def read_compressed(self, descriptor: int) -> bytes:
        cs = self.cluster_size
        coffset, csize = self.compressed_span(descriptor)
        # The last sectors may lie past EOF (QEMU writes them that way).
        buf = self._pread(csize, coffset, "compressed cluster")
        try:
            if self._zstd and _declares(buf, cs):
                # The usual frame (QEMU's and ours) says it holds one
                # cluster: decompressed in one call, ~10 % less CPU than
                # the stream below, which a sequential read of a
                # compressed backup is bound by.
                out = _zstd_decompressor().decompress(buf, max_output_size=cs, read_across_frames=False)
            elif self._zstd:
                reader = _zstd_decompressor().stream_reader(buf, read_across_frames=False)
                parts = []
                got = 0
                while got < cs:
                    chunk = reader.read(cs - got)
                    if not chunk:
                        break
                    parts.append(chunk)
                    got += len(chunk)
                out = b"".join(parts)
                # A frame that says it holds more than a cluster is damage,
                # as QEMU reads it (an I/O error), not data to cut short.
                # (QEMU's frames say their size; one that does not is read
                # up to the cluster size: past it, the next bytes are the
                # next cluster's frame, so more output cannot be told.)
                declared = zstandard.get_frame_parameters(buf).content_size
                if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > cs:
                    raise ImageError(self.path, f"compressed cluster at {coffset:#x} decompresses to more "
                                                f"than the cluster size ({declared} bytes, not {cs})")
            else:
                out = zlib.decompressobj(-15).decompress(buf, cs)
        except (zlib.error, zstandard.ZstdError) as e:
            raise ImageError(self.path, f"compressed cluster at {coffset:#x} is corrupt: {e}") from None
        if len(out) != cs:
            raise ImageError(
                self.path,
                f"compressed cluster at {coffset:#x} decompresses to {len(out)} bytes, not {cs}",
            )
        return out


_ZSTD = threading.local()


def _declares(frame: bytes, size: int) -> bool:
    """Whether a zstd frame's header says it holds exactly ``size`` bytes."""
    try:
        return zstandard.get_frame_parameters(frame).content_size == size
    except zstandard.ZstdError:
        return False  # the stream path says what is wrong with it


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor, shared by all its layers.

    A ZstdDecompressor has one decompression context, and its stream
    readers share it: two threads decompressing through one instance (the
    mount's event loop and a worker, or two workers reading the same
    backup) corrupt each other's output. With one per layer, shared by all
    threads, 8 threads reading a zstd-compressed image got 1,300-1,500
    wrong reads out of 24,000, "Data corruption detected" for clusters that
    were fine, and once a crashed interpreter. One per thread, not per
    layer and thread: a 64-deep chain read by 32 workers would otherwise
    hold 2,048 contexts.
    """
    dctx = getattr(_ZSTD, "dctx", None)
    if dctx is None:
        dctx = _ZSTD.dctx = zstandard.ZstdDecompressor()
    return dctx


def _identity(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _AllocationCache:
    """Decoded extents of recently opened images, shared by every chain.

    The backups of one device share their lower images, and a mount opens
    many backups: without this, opening the k-th backup decodes all k
    images again. Keyed by file identity (device, inode, size, mtime,
    ctime), so a changed file is decoded afresh; bounded by extents held
    (32 bytes each).
    """

    def __init__(self, max_extents: int = 2_000_000) -> None:  # 64 MiB at most
        self._entries: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._held = 0
        self._max = max_extents
        self._lock = threading.Lock()

    def get(self, key: tuple[int, ...]) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple[int, ...], value: np.ndarray) -> None:
        if len(value) > self._max // 4:
            return  # one image that large would evict everything else
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self._held += len(value)
            while self._held > self._max:
                _, old = self._entries.popitem(last=False)
                self._held -= len(old)


_ALLOCATIONS = _AllocationCache()


_BATCH_ENTRIES = 1 << 20


def _sparse_rows(
    units: np.ndarray, kinds: np.ndarray, hosts: np.ndarray, unit: int, start: int, end: int
) -> np.ndarray:
    """Rows for guest ``[start, end)`` from its held units (sorted cluster numbers), the rest unallocated.

    One unit per cluster: held units merge when they are neighbours of one
    kind, DATA only when host-contiguous, COMPRESSED never.
    """
    u = np.uint64(unit)
    if not len(units):
        return np.array([[start, end, UNALLOC, 0]], dtype=np.uint64) if start < end else np.zeros((0, 4), np.uint64)
    units = units.astype(np.uint64)
    m = len(units)
    brk = np.ones(m, dtype=bool)
    if m > 1:
        brk[1:] = ~(
            (units[1:] == units[:-1] + np.uint64(1))
            & (kinds[1:] == kinds[:-1])
            & (kinds[1:] != COMPRESSED)
            & ((kinds[1:] != DATA) | (hosts[1:] == hosts[:-1] + u))
        )
    first = np.flatnonzero(brk)
    last = np.append(first[1:], m) - 1
    a = units[first] * u
    b = np.minimum((units[last] + np.uint64(1)) * u, np.uint64(end))
    # The gaps before, between and after the held runs: gap i (if any)
    # comes just before run i, the last one after them all. Placed in
    # order directly (sorting the rows doubled the memory of a big layer).
    gap_a = np.concatenate(([np.uint64(start)], b))
    gap_b = np.concatenate((a, [np.uint64(end)]))
    open_ = gap_a < gap_b
    n = len(first)
    rows = np.zeros((n + int(open_.sum()), 4), dtype=np.uint64)
    before = np.cumsum(open_)  # gaps up to and including the one before run i
    at = np.arange(n) + before[:n]  # each run's row
    rows[at, 0] = a
    rows[at, 1] = b
    rows[at, 2] = kinds[first]
    rows[at, 3] = hosts[first]
    gap_at = (np.arange(n + 1) + before - 1)[open_]
    rows[gap_at, 0] = gap_a[open_]
    rows[gap_at, 1] = gap_b[open_]
    rows[gap_at, 2] = UNALLOC
    return rows


def _runs(
    kinds: np.ndarray, hosts: np.ndarray, guest0: int, unit: int, per_cluster: int, size: int
) -> np.ndarray:
    """Cut per-unit kinds/hosts into extents (rows) of equal kind and contiguous host."""
    n = kinds.size
    if n == 0:
        return np.zeros((0, 4), dtype=np.uint64)
    brk = np.ones(n, dtype=bool)
    if n > 1:
        same = kinds[1:] == kinds[:-1]
        contiguous = hosts[1:] == hosts[:-1] + np.uint64(unit)
        is_data = kinds[1:] == DATA
        is_comp = kinds[1:] == COMPRESSED
        cluster_start = (np.arange(1, n) % per_cluster) == 0
        cont = same & np.where(
            is_data,
            contiguous,
            np.where(is_comp, (hosts[1:] == hosts[:-1]) & ~cluster_start, True),
        )
        brk[1:] = ~cont
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n)
    a = np.uint64(guest0) + starts.astype(np.uint64) * np.uint64(unit)
    b = np.minimum(np.uint64(guest0) + ends.astype(np.uint64) * np.uint64(unit), np.uint64(size))
    keep = a < b
    return np.stack((a[keep], b[keep], kinds[starts][keep].astype(np.uint64), hosts[starts][keep]), axis=1)


def probe_format(path: str) -> str:
    """'qcow2' if the file starts with the qcow2 magic, else 'raw' (as QEMU probes)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == MAGIC else "raw"


def open_layer(path: str, fmt: str | None = None) -> Layer:
    """Open one image as a layer; ``fmt`` None probes.

    Only regular files and block devices are opened: a backing name is
    chosen by whoever wrote the image, and a FIFO would block the open
    forever, while a directory or a character device is no disk.
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ImageError(path, "is a directory, not an image")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ImageError(path, "is not a regular file or block device")
        if fmt is None:
            fmt = probe_format(path)
        if fmt == "qcow2":
            return Qcow2Layer(path)
        if fmt == "raw":
            return RawLayer(path)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as e:
        raise ImageError(path, f"cannot open: {e.strerror or e}", e.errno if e.errno in OUT_OF_RESOURCES else None) \
            from None
    raise ImageError(path, f"unsupported image format {fmt!r} (backupfs reads qcow2 and raw)")

