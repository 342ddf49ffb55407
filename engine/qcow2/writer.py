"""Writing a new qcow2 v3 image, cluster by cluster.

The writer only ever creates images (backups are immutable), so allocation
is an append: cluster 0 is reserved for the header, data and L2 tables are
placed at the end of the file as they are needed, and at ``commit`` the L1
table and the refcount structures go after them. Every host cluster below
the end of the file is then referenced exactly once, which makes the
refcounts a closed formula instead of bookkeeping, and guarantees
`qemu-img check` finds no leaks.

Durability order at commit: data and L2 tables, L1, refcounts, fsync; then
the header, fsync. Until the header is written the first cluster is zeros,
so a crash leaves a file that no reader mistakes for a valid image.

A compressed image (``compress="zstd"``) stores each cluster worth it as
one zstd frame, packed back to back in host clusters as qemu-img does
(a frame may run on into the next host cluster when that one follows it
in the file). Frames are made on a small thread pool (qcow2/compress.py)
while the caller goes on; they are appended in the order the clusters
were written, a few chunks behind, and all of them before commit. A host
cluster holding frames is referenced once per frame that touches it,
which the refcounts record (``_crefs``); every other cluster is still 1.

While data is appended, every 1 MiB of it is handed to the kernel's
writeback at once (``_start_writeback``), so the disk writes while the copy
goes on and the fsync at commit finds little left to do. That is advice
only: durability still comes from the fsyncs at commit.
"""

from __future__ import annotations

import errno
import os
import sys
from array import array
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from engine import durable
from engine.access import set_new_file_mode
from engine.errors import ImageError, UsageError
from engine.qcow2.format import (
    COMPRESS_CHOICES,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    INCOMPAT_COMPRESSION,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MIN_CLUSTER_BITS,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
    encode_header_cluster,
    l1_entries_for,
    validate_compress,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

    from engine.qcow2.compress import ClusterCompressor

# numpy and zstandard are imported where they are used: the CLI imports
# this module (through the trigger's grammar) and --help must start fast.

_REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default
_WRITE_CHUNK = 8 * 1024 * 1024
_WRITEBACK_BYTES = 1024 * 1024  # appended data handed to writeback at a time
_DROP_BEHIND = 32 * 1024 * 1024  # how far behind the writeback written pages are dropped
_fadvise = getattr(os, "posix_fadvise", None)  # not on macOS
_NATIVE_LE = sys.byteorder == "little"
_PENDING_BYTES = 32 * 1024 * 1024  # guest data handed to the compressors and not yet appended
_MAX_REFCOUNT = (1 << (1 << _REFCOUNT_ORDER)) - 1


def _to_be(table: array) -> bytes:
    out = array("Q", table)
    if _NATIVE_LE:
        out.byteswap()
    return out.tobytes()


def _from_be(raw: bytes) -> array:
    out = array("Q")
    out.frombytes(raw)
    if _NATIVE_LE:
        out.byteswap()
    return out


def validate_cluster_size(cluster_size: int) -> int:
    """cluster_bits for a cluster size, or UsageError naming the rule."""
    if cluster_size <= 0 or cluster_size & (cluster_size - 1):
        raise UsageError(f"cluster size {cluster_size} is not a power of two")
    bits = cluster_size.bit_length() - 1
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise UsageError(f"cluster size {cluster_size} out of range (512 B to 2 MiB)")
    return bits


class Qcow2Writer:
    """Builds one image. Use as a context manager: leaving without commit aborts."""

    def __init__(
        self,
        path: str,
        size: int,
        cluster_size: int = 65536,
        backing_file: str | None = None,
        backing_format: str | None = None,
        *,
        l2_cache_bytes: int = 64 * 1024 * 1024,
        compress: str | None = None,
    ) -> None:
        self.cluster_bits = validate_cluster_size(cluster_size)
        if size < 0 or size % 512:
            # QEMU counts disks in 512-byte sectors and would silently drop
            # a partial last sector; refuse rather than lose bytes.
            raise UsageError(f"virtual size {size} is not a multiple of 512 bytes")
        self.path = path
        self.size = size
        self.cluster_size = cs = cluster_size
        self.l2_entries = cs // 8
        self.l1_size = l1_entries_for(size, self.cluster_bits)
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise UsageError(
                f"virtual size {size} needs an L1 table over 32 MiB with {cs}-byte "
                "clusters; use a larger cluster size"
            )
        if compress is not None:
            validate_compress(compress)
        self.compress = compress if compress != "none" else None
        self.backing_file = backing_file
        self.backing_format = (backing_format or "qcow2") if backing_file is not None else None
        # Fail now, not at commit, if the header cannot hold the backing name.
        try:
            encode_header_cluster(self._header(0, 0, 0), cs, backing_file, self.backing_format)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self._l1 = array("Q", bytes(8 * self.l1_size))
        self._l2: OrderedDict[int, array] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._l2_cache_tables = max(4, l2_cache_bytes // cs)
        self._next_free = cs  # cluster 0: the header, written last
        self._writeback_from = cs  # appended bytes from here on not yet handed to writeback
        self._dropped_to = 0  # the page cache's copy of the file before here has been dropped
        self.data_clusters = 0
        self.compressed_clusters = 0
        self.compressed_bytes = 0  # the frames' bytes, without the slack between them
        self._closed = False
        # Compression: frames in flight, in write order, and where the next goes.
        self._compressor: ClusterCompressor | None = None
        self._pending: deque[tuple[int, memoryview, list[Future[list[bytes | None]]]]] = deque()
        self._pending_bytes = 0
        self._cpos = 0  # the next frame's host offset; 0: no host cluster started
        self._cend = 0  # end of the host clusters allocated for frames so far
        self._crefs = array("H")  # per host cluster: frames touching it (0: an ordinary cluster)
        # Guest clusters pending: a set, not a byte per cluster of the disk
        # (512 MiB for 2 TiB of 4 KiB clusters); at most _PENDING_BYTES of them.
        self._pending_clusters: set[int] = set()
        self.fd = durable.fs.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            set_new_file_mode(self.fd, path)  # a disk's image: never readable by others, whatever the umask
        except OSError:
            durable.fs.close(self.fd)
            os.unlink(path)
            raise

    # -- context manager -------------------------------------------------

    def __enter__(self) -> Qcow2Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._closed:
            self.abort()

    # -- allocation and tables ------------------------------------------

    def _alloc(self, nclusters: int) -> int:
        host = self._next_free
        self._next_free += nclusters * self.cluster_size
        return host

    def _table(self, l1_index: int, create: bool) -> array | None:
        table = self._l2.get(l1_index)
        if table is not None:
            self._l2.move_to_end(l1_index)
            return table
        offset = self._l1[l1_index]
        if offset:
            table = _from_be(self._pread(self.cluster_size, offset))
        elif create:
            table = array("Q", bytes(self.cluster_size))
            self._l1[l1_index] = self._alloc(1)
            self._l2_dirty.add(l1_index)
        else:
            return None
        self._l2[l1_index] = table
        while len(self._l2) > self._l2_cache_tables:
            old, old_table = self._l2.popitem(last=False)
            if old in self._l2_dirty:
                self._pwrite(_to_be(old_table), self._l1[old])
                self._l2_dirty.discard(old)
        return table

    def _entry(self, guest_cluster: int) -> int:
        table = self._table(guest_cluster // self.l2_entries, create=False)
        return 0 if table is None else table[guest_cluster % self.l2_entries]

    def _set_entries(self, first_cluster: int, entries: list[int] | range) -> None:
        """Set L2 entries for consecutive guest clusters, across tables."""
        n = len(entries)
        done = 0
        while done < n:
            g = first_cluster + done
            l1i, l2i = divmod(g, self.l2_entries)
            k = min(n - done, self.l2_entries - l2i)
            table = self._table(l1i, create=True)
            assert table is not None
            table[l2i : l2i + k] = array("Q", entries[done : done + k])
            self._l2_dirty.add(l1i)
            done += k

    # -- I/O ----------------------------------------------------------------

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            try:
                n = durable.fs.pwrite(self.fd, view, offset)
            except OSError as e:
                raise self._io_error("write", e) from None
            view = view[n:]
            offset += n

    def _pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def _io_error(self, what: str, e: OSError) -> ImageError:
        err = ImageError(self.path, f"cannot {what}: {e.strerror or e}")
        err.errno = e.errno or errno.EIO
        return err

    def _check_range(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        if self._closed:
            raise ValueError("image already committed or aborted")
        if offset % cs:
            raise ValueError(f"offset {offset} is not aligned to the {cs}-byte cluster")
        end = offset + length
        if offset < 0 or end > self.size:
            raise ValueError(f"range {offset}+{length} is outside the virtual size {self.size}")
        if length % cs and end != self.size:
            raise ValueError(
                "a write must cover whole clusters (only the disk's last cluster may be short)"
            )
        return offset // cs, (length + cs - 1) // cs

    # -- public ---------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store whole clusters of guest data at a cluster-aligned offset.

        A cluster already stored is overwritten in place; new clusters get
        one contiguous host run, so a sequential copy reads back with one
        read per run.
        """
        view = memoryview(data).cast("B")
        first, count = self._check_range(offset, len(view))
        if count == 0:
            return
        if self.compress:
            self._write_compressed(first, count, view)
            return
        cs = self.cluster_size
        existing = [self._entry(first + i) & OFFSET_MASK for i in range(count)]
        if not any(existing):
            # Tables first, so that consecutive writes get consecutive data
            # clusters and a full backup reads back as one run per range.
            for l1i in range(first // self.l2_entries, (first + count - 1) // self.l2_entries + 1):
                self._table(l1i, create=True)
            host = self._alloc(count)
            self._write_padded(view, host)
            self._set_entries(first, range(host | OFLAG_COPIED, (host | OFLAG_COPIED) + count * cs, cs))
            self.data_clusters += count
            self._start_writeback()
            return
        for i, old in enumerate(existing):
            chunk = view[i * cs : (i + 1) * cs]
            if old:
                self._write_padded(chunk, old)
                self._set_entries(first + i, [old | OFLAG_COPIED])
            else:
                host = self._alloc(1)
                self._write_padded(chunk, host)
                self._set_entries(first + i, [host | OFLAG_COPIED])
                self.data_clusters += 1
        self._start_writeback()

    # -- compressed clusters ----------------------------------------------

    def _write_compressed(self, first: int, count: int, view: memoryview) -> None:
        """Hand the clusters to the compressors; appended later, in order.

        Each cluster is written once: a frame cannot be rewritten in place,
        and a backup job never writes a cluster twice.
        """
        self._drain_overlapping(first, count)
        if any(self._entry(first + i) for i in range(count)):
            raise ValueError("a compressed image is written once per cluster")
        if not view.readonly:
            view = memoryview(bytes(view))  # the caller may reuse its buffer
        if self._compressor is None:
            from engine.qcow2.compress import ClusterCompressor

            self._compressor = ClusterCompressor(self.cluster_size)
        self._pending_clusters.update(range(first, first + count))
        self._pending.append((first, view, self._compressor.submit(view)))
        self._pending_bytes += len(view)
        while self._pending_bytes > _PENDING_BYTES:
            self._drain_one()

    def _drain_overlapping(self, first: int, count: int) -> None:
        """Append pending clusters up to the last that overlaps [first, first+count)."""
        marks = self._pending_clusters
        if not marks or marks.isdisjoint(range(first, first + count)):
            return  # the usual case, told without walking the pending list
        cs = self.cluster_size
        last = -1
        for i, (f, v, _) in enumerate(self._pending):
            if f < first + count and first < f + -(-len(v) // cs):
                last = i
        for _ in range(last + 1):
            self._drain_one()

    def flush(self) -> None:
        """Append every pending cluster (their L2 entries set)."""
        while self._pending:
            self._drain_one()

    def _drain_one(self) -> None:
        """Append the oldest pending chunk: frames packed, the rest plain."""
        first, view, futures = self._pending.popleft()
        self._pending_bytes -= len(view)
        frames: list[bytes | None] = []
        for fut in futures:
            frames.extend(fut.result())
        cs = self.cluster_size
        count = len(frames)
        self._pending_clusters.difference_update(range(first, first + count))
        # Tables first, so that frames and plain runs stay contiguous.
        for l1i in range(first // self.l2_entries, (first + count - 1) // self.l2_entries + 1):
            self._table(l1i, create=True)
        entries: list[int] = [0] * count
        runs: list[tuple[int, bytearray]] = []  # contiguous frame bytes to write
        for i, frame in enumerate(frames):
            if frame is not None:
                off = self._place(len(frame))
                if runs and runs[-1][0] + len(runs[-1][1]) == off:
                    runs[-1][1].extend(frame)
                else:
                    runs.append((off, bytearray(frame)))
                extra = ((off + len(frame) - 1) >> 9) - (off >> 9)
                entries[i] = OFLAG_COMPRESSED | (extra << (62 - (self.cluster_bits - 8))) | off
                self.compressed_clusters += 1
                self.compressed_bytes += len(frame)
        for off, buf in runs:
            self._pwrite(buf, off)
        plain = [i for i, f in enumerate(frames) if f is None]
        if plain:
            host = self._alloc(len(plain))
            j = 0
            while j < len(plain):
                k = j + 1
                while k < len(plain) and plain[k] == plain[k - 1] + 1:
                    k += 1
                start = plain[j]
                self._write_padded(view[start * cs : plain[k - 1] * cs + cs], host + j * cs)
                j = k
            for j, i in enumerate(plain):
                entries[i] = (host + j * cs) | OFLAG_COPIED
            self.data_clusters += len(plain)
        self._set_entries(first, entries)
        self._start_writeback()

    def _place(self, length: int) -> int:
        """Host offset for a frame of ``length`` bytes, refcounts counted.

        Packed after the previous frame; it may run on into the next host
        cluster only if that is the next one in the file (QEMU's rule), so
        otherwise it starts a fresh cluster, leaving the old one's tail
        unused.
        """
        cs = self.cluster_size
        off = self._cpos
        if off and (
            (off + length > self._cend and self._cend != self._next_free)
            or self._crefs[off // cs] >= _MAX_REFCOUNT
        ):
            off = 0
        if not off:
            off = self._alloc(1)
            self._cend = off + cs
        end = off + length
        if end > self._cend:
            more = -(-(end - self._cend) // cs)
            self._alloc(more)  # right after _cend: checked above
            self._cend += more * cs
        first_c, last_c = off // cs, (end - 1) // cs
        if len(self._crefs) <= last_c:
            self._crefs.extend(array("H", bytes(2 * (last_c + 1 - len(self._crefs)))))
        for c in range(first_c, last_c + 1):
            self._crefs[c] += 1
        self._cpos = end if end < self._cend else 0
        return off

    def _start_writeback(self) -> None:
        """Start writing back what was appended since the last call, every 1 MiB.

        On Linux, POSIX_FADV_DONTNEED starts asynchronous writeback of the
        range's dirty pages without waiting for it (and drops pages already
        clean: a backup has no reason to stay in the page cache; just
        written, none is clean yet: see below). Without
        this the kernel holds everything until the fsync at commit, and the
        disk idles while the copy runs: a 1 GiB full backup took 3.7 s
        instead of 2.7 s, a 100 MiB incremental 0.39 s instead of 0.27 s
        (medians, bench/backup_vs_qemu.py's workload). Table clusters
        allocated but not yet written are holes in the range; that is harmless.

        Every 1 MiB, not 8: a small incremental (164 scattered 64 KiB
        clusters) had most of its 10 MiB still dirty at commit, and its
        fsync waited 7.1 ms for it after the copy, against 2.7 ms (writes
        and commit 11.6 ms against 6.6 ms, medians of 5). Fulls, written
        8 MiB at a time, give the advice once a write either way (512 MiB:
        363 ms at 8 MiB, 339 ms at 1 MiB, medians of 4).

        Dropped behind: the advice on pages just written only starts their
        writeback (dirty pages are not dropped), so a full kept every page
        of its image in the page cache, 512 MiB for a 512 MiB disk, each a
        page the kernel had to find and zero first. Advised again
        _DROP_BEHIND later, once clean, they are dropped, and the same few
        tens of MiB of pages serve the whole copy. On a virtual machine
        whose free memory goes back to its host (virtio-balloon free page
        reporting) a fresh page costs a fault in the host too: a hot
        512 MiB full after 10 s of quiet took 1.19 s (0.85 s of it system
        time) keeping its pages, 0.67 s (0.33 s) dropping them, medians of
        4 alternating runs. Pages still under writeback are left alone by
        the advice; the commit drops what is left after its fsync.
        """
        end = self._next_free
        start = self._writeback_from
        if end - start < _WRITEBACK_BYTES or _fadvise is None:
            return
        try:
            _fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
            # The same advice a little later, on pages whose writeback
            # has had time to finish, drops them (see the docstring).
            behind = start - _DROP_BEHIND
            if behind > self._dropped_to:
                _fadvise(self.fd, self._dropped_to, behind - self._dropped_to, os.POSIX_FADV_DONTNEED)
                self._dropped_to = behind
        except OSError:
            pass  # advice only: a file system that refuses it loses nothing
        self._writeback_from = end

    def _write_padded(self, view: memoryview, host: int) -> None:
        self._pwrite(view, host)
        tail = len(view) % self.cluster_size
        if tail:
            self._pwrite(bytes(self.cluster_size - tail), host + len(view))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Mark whole clusters as reading zeros (the L2 zero flag), storing nothing.

        Unlike leaving them unallocated, this hides whatever the backing
        file holds there: the way a backup says "this was zeroed".
        """
        first, count = self._check_range(offset, length)
        self._drain_overlapping(first, count)
        entries = []
        for i in range(count):
            if self._entry(first + i) & OFLAG_COMPRESSED:
                raise ValueError("a compressed cluster cannot be zeroed in place")
            old = self._entry(first + i) & OFFSET_MASK
            # A cluster that had data keeps its host cluster (QEMU's
            # "zero, allocated"), so nothing leaks.
            entries.append(old | OFLAG_COPIED | OFLAG_ZERO if old else OFLAG_ZERO)
        self._set_entries(first, entries)

    def stored_bytes(self) -> int:
        """Bytes of guest data this image stores (not counting metadata):
        a compressed cluster counts its frame's bytes.

        Not the padding past the disk's end in its last cluster: a job
        that copied a whole disk of 16 MiB + 4 KiB says it stored that
        much, and list, du and the xattr must say the same.
        """
        self.flush()
        cs = self.cluster_size
        stored = self.data_clusters * cs + self.compressed_bytes
        tail = self.size % cs
        last = self._entry(self.size // cs) if tail else 0
        if last & OFFSET_MASK and not last & OFLAG_COMPRESSED:
            stored -= cs - tail
        return stored

    def _header(self, l1_offset: int, reftable_offset: int, reftable_clusters: int) -> Header:
        return Header(
            version=3,
            cluster_bits=self.cluster_bits,
            size=self.size,
            l1_size=self.l1_size,
            l1_table_offset=l1_offset,
            refcount_table_offset=reftable_offset,
            refcount_table_clusters=reftable_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            refcount_order=_REFCOUNT_ORDER,
            incompatible_features=INCOMPAT_COMPRESSION if self.compress else 0,
            compression_type=COMPRESSION_ZSTD if self.compress else COMPRESSION_ZLIB,
        )

    def commit(self) -> int:
        """Make the image complete and durable; returns its file size."""
        if self._closed:
            raise ValueError("image already committed or aborted")
        cs = self.cluster_size
        try:
            self.flush()
            self._stop_compressor()
            for l1i in sorted(self._l2_dirty):
                self._pwrite(_to_be(self._l2[l1i]), self._l1[l1i])
            self._l2_dirty.clear()

            l1_offset = 0
            if self.l1_size:
                l1_clusters = (self.l1_size * 8 + cs - 1) // cs
                l1_offset = self._alloc(l1_clusters)
                l1 = array("Q", ((e | OFLAG_COPIED) if e else 0 for e in self._l1))
                raw = _to_be(l1)
                self._pwrite(raw + bytes(l1_clusters * cs - len(raw)), l1_offset)

            reftable_offset, reftable_clusters = self._write_refcounts()
            self._fsync()
            header = encode_header_cluster(
                self._header(l1_offset, reftable_offset, reftable_clusters),
                cs,
                self.backing_file,
                self.backing_format,
            )
            self._pwrite(header, 0)
            self._fsync()
            if _fadvise is not None:
                try:
                    _fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean now: a backup is not read soon
                except OSError:
                    pass
        except BaseException:
            self.abort()
            raise
        durable.fs.close(self.fd)
        self._closed = True
        return self._next_free

    def _write_refcounts(self) -> tuple[int, int]:
        """Refcount blocks and table for clusters [0, end): every one is 1,
        but those holding frames: one per frame touching it."""
        cs = self.cluster_size
        per_block = cs * 8 // (1 << _REFCOUNT_ORDER)
        used = self._next_free // cs
        blocks = table = 0
        while True:
            total = used + blocks + table
            need_blocks = (total + per_block - 1) // per_block
            need_table = (need_blocks * 8 + cs - 1) // cs
            if (need_blocks, need_table) == (blocks, table):
                break
            blocks, table = need_blocks, need_table
        if table * cs > MAX_REFTABLE_BYTES:
            raise UsageError("image too large for QEMU's 8 MiB refcount table limit")
        total = used + blocks + table
        blocks_offset = self._alloc(blocks)
        table_offset = self._alloc(table)
        one = (1).to_bytes(2, "big")
        full_block = one * per_block
        import numpy as np

        crefs = np.frombuffer(self._crefs, dtype=np.uint16) if len(self._crefs) else None
        # Refcount blocks, written in large sequential chunks.
        buf = bytearray()
        pos = blocks_offset
        for b in range(blocks):
            ones = min(per_block, total - b * per_block)
            block = full_block if ones == per_block else one * ones + bytes(2 * (per_block - ones))
            if crefs is not None and b * per_block < len(crefs):
                # Host clusters holding frames: one reference per frame.
                counts = np.frombuffer(block, dtype=">u2").copy()
                part = crefs[b * per_block : (b + 1) * per_block]
                counts[: len(part)] = np.where(part > 0, part, counts[: len(part)])
                block = counts.tobytes()
            buf += block
            if len(buf) >= _WRITE_CHUNK:
                self._pwrite(buf, pos)
                pos += len(buf)
                buf = bytearray()
        if buf:
            self._pwrite(buf, pos)
        reftable = array("Q", (blocks_offset + b * cs for b in range(blocks)))
        raw = _to_be(reftable)
        self._pwrite(raw + bytes(table * cs - len(raw)), table_offset)
        assert self._next_free == total * cs
        return table_offset, table

    def _stop_compressor(self) -> None:
        if self._compressor is not None:
            self._compressor.close()
            self._compressor = None

    def _fsync(self) -> None:
        try:
            durable.fs.fsync(self.fd)
        except OSError as e:
            raise self._io_error("fsync", e) from None

    def abort(self) -> None:
        """Close and remove the unfinished image."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._stop_compressor()
        try:
            durable.fs.close(self.fd)
        finally:
            try:
                durable.fs.unlink(self.path)
            except FileNotFoundError:
                pass
