"""Structural check of one qcow2 image, like `qemu-img check` without repair.

Counts every reference the image makes (header, L1/L2 tables, data and
compressed clusters, refcount structures, internal snapshots, persistent
bitmaps), compares the counts with the stored refcounts, and reports:
errors (a cluster referenced more often than its refcount says, tables out
of bounds or misaligned, overlapping metadata, wrong COPIED flags) and
leaks (refcount > 0 but nothing references the cluster). Work and memory
are bounded by the file size: one counter per host cluster.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.errors import ImageError
from engine.qcow2.format import (
    AUTOCLEAR_BITMAPS,
    INCOMPAT_DIRTY,
    L1E_RESERVED,
    L2E_RESERVED,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_RESERVED,
)
from engine.qcow2.layers import Qcow2Layer, open_layer
from engine.text import escape, one_line

_MAX_MESSAGES = 50

# Roles a cluster can play; metadata must never share a cluster.
_HEADER, _L1, _L2, _REFTABLE, _REFBLOCK, _DATA, _COMPRESSED, _SNAPTABLE, _BITMAP_META, _BITMAP_DATA = range(1, 11)
_ROLE_NAMES = {
    _HEADER: "header",
    _L1: "L1 table",
    _L2: "L2 table",
    _REFTABLE: "refcount table",
    _REFBLOCK: "refcount block",
    _DATA: "data cluster",
    _COMPRESSED: "compressed data",
    _SNAPTABLE: "snapshot table",
    _BITMAP_META: "bitmap table",
    _BITMAP_DATA: "bitmap data",
}


@dataclass
class CheckReport:
    path: str
    cluster_size: int = 0
    file_size: int = 0
    end_offset: int | None = None  # past the last cluster in use, as QEMU says it
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    error_count: int = 0
    leak_count: int = 0
    allocated_clusters: int = 0
    total_clusters: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error_count and not self.leak_count

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < _MAX_MESSAGES:
            self.errors.append(message)

    def leak(self, message: str) -> None:
        self.leak_count += 1
        if len(self.leaks) < _MAX_MESSAGES:
            self.leaks.append(message)

    def render(self) -> str:
        lines = [f"ERROR {one_line(m)}" for m in self.errors]
        if self.error_count > len(self.errors):
            lines.append(f"... and {self.error_count - len(self.errors)} more errors")
        lines += [f"Leaked cluster: {one_line(m)}" for m in self.leaks]
        if self.leak_count > len(self.leaks):
            lines.append(f"... and {self.leak_count - len(self.leaks)} more leaked clusters")
        lines += [one_line(note) for note in self.notes]
        if self.ok:
            lines.append(f"No errors were found on {escape(self.path)}.")
        else:
            if self.error_count:
                lines.append(f"{self.error_count} errors were found on {escape(self.path)}.")
            if self.leak_count:
                lines.append(f"{self.leak_count} leaked clusters were found on {escape(self.path)}.")
        if self.total_clusters:
            pct = 100.0 * self.allocated_clusters / self.total_clusters
            lines.append(
                f"{self.allocated_clusters}/{self.total_clusters} = {pct:.2f}% allocated"
            )
        lines.append(f"Image end offset: {self.end_offset if self.end_offset is not None else self.file_size}")
        return "\n".join(lines)


class _Checker:
    def __init__(self, layer: Qcow2Layer, report: CheckReport) -> None:
        self.layer = layer
        self.h = layer.header
        self.cs = layer.cluster_size
        self.report = report
        self.nclusters = (layer.file_size + self.cs - 1) // self.cs
        # Per host cluster, up to the highest one anything references (not
        # the file's length: a file extended by a sparse hole of terabytes
        # made this gigabytes, where QEMU needs what the image uses).
        self.refs = np.zeros(min(self.nclusters, _FIRST_CLUSTERS), dtype=np.uint32)
        self.roles = np.zeros(len(self.refs), dtype=np.uint8)
        self.snapshots = bool(self.h.nb_snapshots)
        # L2 tables are decoded once each, after every L1 table (active and
        # snapshots) has been walked: offset -> references, and the tables
        # in the order they were first met (offset, L1 index, active).
        self.l2_refs: dict[int, int] = {}
        self.l2_pending: list[tuple[int, int, bool]] = []

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self.layer.fd, length, offset)
        except OSError as e:
            raise ImageError(self.layer.path, f"cannot read at {offset:#x}: {e.strerror}") from None

    def _reach(self, n: int) -> None:
        """Let refs and roles count clusters [0, n) (n within the file)."""
        if n > len(self.refs):
            n = min(max(n, 2 * len(self.refs)), self.nclusters)
            self.refs = _grown(self.refs, n)
            self.roles = _grown(self.roles, n)

    def _shared_ok(self, role: int) -> bool:
        """May two references of this role point at the same cluster?"""
        return role == _COMPRESSED or (self.snapshots and role in (_DATA, _L2))

    def inc(self, offset: int, length: int, role: int, what: str, weight: int = 1) -> bool:
        """Count ``weight`` references to the clusters of [offset, offset+length).

        False if the range must not be walked: it lies beyond the end of the
        file, or it was already counted in the same role where sharing is an
        error. Walking such a table again would only repeat its errors, and
        is how a small hostile file (a thousand snapshots naming one L1
        table) would make the check run for hours.
        """
        if length <= 0:
            return True
        first = offset // self.cs
        last = (offset + length - 1) // self.cs
        if last >= self.nclusters:
            self.report.error(f"{what} at {offset:#x} lies beyond the end of the file")
            return False
        self._reach(last + 1)
        self.refs[first : last + 1] += weight
        prev = self.roles[first : last + 1]
        clash = (prev != 0) & ~((prev == role) & self._shared_ok(role))
        fresh = True
        if np.any(clash):
            other = int(prev[np.flatnonzero(clash)[0]])
            if other == role:
                self.report.error(f"{what} at {offset:#x} is referenced twice")
            else:
                self.report.error(f"{what} at {offset:#x} overlaps a {_ROLE_NAMES[other]}")
            fresh = not np.any(prev[clash] == role)
        self.roles[first : last + 1] = np.where(prev == 0, role, prev)
        return fresh

    def table(self, offset: int, length: int, role: int, what: str) -> bytes | None:
        if offset % self.cs:
            self.report.error(f"{what} offset {offset:#x} is not cluster-aligned")
            return None
        if not self.inc(offset, length, role, what):
            return None
        raw = self.pread(length, offset)
        if len(raw) != length:
            # Inside the last, partial cluster of the file: cut short.
            self.report.error(f"{what} at {offset:#x} is truncated by the end of the file")
            return None
        return raw

    # -- mapping tables -----------------------------------------------------

    def walk_l1(self, l1_offset: int, l1_size: int, active: bool, what: str) -> list[tuple[int, int]]:
        """Count an L1 table and the L2 tables it references; returns (entry, L2 offset) for COPIED checks.

        The L2 tables' entries are walked later, once per table, by
        ``walk_l2_tables``: snapshots share L2 tables, and a hostile L1 can
        name one table a million times; decoding it once per reference
        would cost time quadratic in the file size.
        """
        if not l1_size:
            return []
        raw = self.table(l1_offset, l1_size * 8, _L1, what)
        if raw is None:
            return []
        l1 = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        out = []
        for i in np.flatnonzero(l1).tolist():
            e = int(l1[i])
            if e & L1E_RESERVED:
                self.report.error(f"{what} entry {i} has reserved bits set ({e:#x})")
            off = e & OFFSET_MASK
            if not off:
                continue
            if off in self.l2_refs:
                self.inc(off, self.cs, _L2, f"L2 table (L1 entry {i})")
                self.l2_refs[off] += 1
            else:
                if self.table(off, self.cs, _L2, f"L2 table (L1 entry {i})") is None:
                    continue
                self.l2_refs[off] = 1
                self.l2_pending.append((off, i, active))
            out.append((e, off))
        return out

    def walk_l2_tables(self) -> None:
        """Walk every L2 table met in the L1 tables once, counting what it
        references once per reference to the table."""
        for off, l1_index, active in self.l2_pending:
            self.walk_l2(self.pread(self.cs, off), off, l1_index, active, self.l2_refs[off])

    def walk_l2(self, raw: bytes, l2_offset: int, l1_index: int, active: bool, weight: int = 1) -> None:
        h = self.h
        cs = self.cs
        words = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        entries = words[0::2] if h.extended_l2 else words
        bitmaps = words[1::2] if h.extended_l2 else None
        comp = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
        host = entries & np.uint64(OFFSET_MASK)
        std = ~comp
        where = f"L2 table at {l2_offset:#x}"
        for i in np.flatnonzero(std & ((entries & np.uint64(L2E_RESERVED)) != 0))[:5].tolist():
            self.report.error(f"{where} entry {i} has reserved bits set ({int(entries[i]):#x})")
        if h.extended_l2 and bitmaps is not None:
            alloc = bitmaps & np.uint64(0xFFFFFFFF)
            zb = bitmaps >> np.uint64(32)
            for i in np.flatnonzero(std & ((alloc & zb) != 0))[:5].tolist():
                self.report.error(f"{where} entry {i}: subcluster both allocated and zero")
            for i in np.flatnonzero(std & (alloc != 0) & (host == 0))[:5].tolist():
                self.report.error(f"{where} entry {i}: allocated subclusters without a host cluster")
        elif h.version == 2:
            for i in np.flatnonzero(std & ((entries & np.uint64(OFLAG_ZERO)) != 0))[:5].tolist():
                self.report.error(f"{where} entry {i}: zero flag in a version 2 image")
        data_idx = np.flatnonzero(std & (host != 0))
        if active:
            self.report.allocated_clusters += int(data_idx.size + np.count_nonzero(comp))
        misaligned = data_idx[(host[data_idx] % np.uint64(cs)) != 0]
        for i in misaligned[:5].tolist():
            self.report.error(f"{where} entry {i}: data offset {int(host[i]):#x} is not cluster-aligned")
        aligned = data_idx[(host[data_idx] % np.uint64(cs)) == 0]
        clusters = (host[aligned] // np.uint64(cs)).astype(np.int64)
        beyond = clusters >= self.nclusters
        for i in aligned[beyond][:5].tolist():
            self.report.error(f"{where} entry {i}: data cluster {int(host[i]):#x} lies beyond the end of the file")
        inside = clusters[~beyond]
        if inside.size:
            self._reach(int(inside.max()) + 1)
        np.add.at(self.refs, inside, weight)
        self._roles_for(inside, _DATA, where)
        if active:
            copied = (entries[aligned[~beyond]] & np.uint64(OFLAG_COPIED)) != 0
            self._copied_later.append((inside, copied, where, aligned[~beyond]))
        self._count_compressed(entries, np.flatnonzero(comp), where, weight)

    def _count_compressed(self, entries: np.ndarray, idx: np.ndarray, where: str, weight: int) -> None:
        """``inc`` for the compressed entries ``idx`` of one L2 table, all at once.

        Vectorised: a table can hold thousands of compressed entries, and a
        small hostile file millions (all naming one cluster), which took
        minutes one ``inc`` at a time.
        """
        if not idx.size:
            return
        cs = self.cs
        desc = entries[idx]
        shift = np.uint64(self.h.csize_shift)
        coff = desc & np.uint64((1 << self.h.csize_shift) - 1)
        sectors = ((desc >> shift) & np.uint64((1 << (self.h.cluster_bits - 8)) - 1)) + np.uint64(1)
        csize = sectors * np.uint64(512) - (coff & np.uint64(511))
        first = (coff // np.uint64(cs)).astype(np.int64)
        last = ((coff + csize - np.uint64(1)) // np.uint64(cs)).astype(np.int64)
        beyond = last >= self.nclusters
        self._report_entries(
            idx[beyond], coff[beyond],
            lambda i, off: f"compressed cluster ({where} entry {i}) at {off:#x} lies beyond the end of the file",
        )
        first, last, inside_idx = first[~beyond], last[~beyond], idx[~beyond]
        if first.size:
            self._reach(int(last.max()) + 1)
            for k in range(int((last - first).max()) + 1):
                spans = first + k <= last
                clusters = first[spans] + k
                np.add.at(self.refs, clusters, weight)
                prev = self.roles[clusters]
                clash = (prev != 0) & (prev != _COMPRESSED)
                self._report_entries(
                    inside_idx[spans][clash], clusters[clash],
                    lambda i, c: f"compressed cluster ({where} entry {i}) at {c * cs:#x} overlaps a "
                    f"{_ROLE_NAMES[int(self.roles[c])]}",
                )
                self.roles[clusters] = np.where(prev == 0, np.uint8(_COMPRESSED), prev)
        copied = idx[(desc & np.uint64(OFLAG_COPIED)) != 0]
        self._report_entries(copied, copied, lambda i, _: f"{where} entry {i}: compressed cluster with the COPIED flag")

    def _report_entries(self, idx: np.ndarray, offsets: np.ndarray, message: Callable[[int, int], str]) -> None:
        """One error per entry: the first messages written, the rest counted."""
        for i, off in zip(idx[:_MAX_MESSAGES].tolist(), offsets[:_MAX_MESSAGES].tolist()):
            self.report.error(message(i, off))
        self.report.error_count += max(0, len(idx) - _MAX_MESSAGES)

    def _roles_for(self, clusters: np.ndarray, role: int, where: str) -> None:
        if clusters.size == 0:
            return
        prev = self.roles[clusters]
        clash = (prev != 0) & ~((prev == role) & self._shared_ok(role))
        for c in clusters[clash][:5].tolist():
            other = _ROLE_NAMES[int(self.roles[c])]
            self.report.error(f"data cluster {c * self.cs:#x} ({where}) overlaps a {other}")
        if not self._shared_ok(role):
            uniq, counts = np.unique(clusters, return_counts=True)
            for c in uniq[counts > 1][:5].tolist():
                self.report.error(f"data cluster {c * self.cs:#x} is mapped twice ({where})")
        self.roles[clusters] = np.where(prev == 0, role, prev)

    # -- the rest of the structures ---------------------------------------

    def walk_snapshots(self) -> None:
        h = self.h
        if not h.nb_snapshots:
            return
        pos = h.snapshots_offset
        start = pos
        file_size = self.layer.file_size
        for n in range(h.nb_snapshots):
            fixed = self.pread(40, pos)
            if len(fixed) < 40:
                self.report.error(f"snapshot table entry {n} lies beyond the end of the file")
                return
            l1_off, l1_size, id_len, name_len, _s, _ns, _vm, _vms, extra = struct.unpack(">QIHHIIQII", fixed)
            # Entries are padded to 8 bytes only where another follows:
            # QEMU writes none after the last, which often ends the file.
            entry_len = 40 + extra + id_len + name_len
            if pos + entry_len > file_size or extra > 1 << 20:
                self.report.error(f"snapshot table entry {n} is truncated")
                return
            if l1_size * 8 > 32 * 1024 * 1024:
                self.report.error(f"snapshot {n} L1 table of {l1_size} entries is too large")
            else:
                self.walk_l1(l1_off, l1_size, False, f"snapshot {n} L1 table")
            end = pos + entry_len
            pos = end + (-entry_len) % 8
        self.inc(start, end - start, _SNAPTABLE, "snapshot table")

    def walk_bitmaps(self) -> None:
        ext = self.h.bitmaps_ext
        if ext is None:
            return
        if not self.h.autoclear_features & AUTOCLEAR_BITMAPS:
            self.report.notes.append("Note: the bitmaps extension is marked inconsistent; its clusters are still counted.")
        nb, dir_size, dir_off = ext
        if dir_size > 64 * 1024 * 1024:
            self.report.error(f"bitmap directory of {dir_size} bytes is too large")
            return
        raw = self.table(dir_off, dir_size, _BITMAP_META, "bitmap directory")
        if raw is None:
            return
        pos = 0
        for n in range(nb):
            if pos + 24 > len(raw):
                self.report.error(f"bitmap directory entry {n} is truncated")
                return
            t_off, t_size, _flags, _type, _gran, name_size, extra = struct.unpack_from(">QIIBBHI", raw, pos)
            entry_len = 24 + extra + name_size
            pos += entry_len + (-entry_len) % 8
            if t_size * 8 > 64 * 1024 * 1024:
                self.report.error(f"bitmap {n} table of {t_size} entries is too large")
                continue
            table = self.table(t_off, t_size * 8, _BITMAP_META, f"bitmap {n} table")
            if table is None:
                continue
            for e in np.frombuffer(table, dtype=">u8").tolist():
                off = e & OFFSET_MASK
                if off:
                    self.inc(off, self.cs, _BITMAP_DATA, f"bitmap {n} data")

    def stored_refcounts(self) -> np.ndarray | None:
        h = self.h
        cs = self.cs
        stored = np.zeros(len(self.refs), dtype=np.uint64)
        if not h.refcount_table_clusters:
            self.report.error("the image has no refcount table")
            return None
        raw = self.table(h.refcount_table_offset, h.refcount_table_clusters * cs, _REFTABLE, "refcount table")
        if raw is None:
            return None
        bits = h.refcount_bits
        per_block = cs * 8 // bits
        reftable = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        for i in np.flatnonzero(reftable).tolist():
            e = int(reftable[i])
            if e & REFT_RESERVED:
                self.report.error(f"refcount table entry {i} has reserved bits set ({e:#x})")
            off = e & ~REFT_RESERVED
            block = self.table(off, cs, _REFBLOCK, f"refcount block (table entry {i})")
            if block is None:
                continue
            first = i * per_block
            if first >= self.nclusters:
                continue
            counts = _decode_refcounts(block, bits)[: self.nclusters - first]
            used = np.flatnonzero(counts)
            if used.size:
                n = int(used[-1]) + 1
                if first + n > len(stored):
                    stored = _grown(stored, first + n)
                stored[first : first + n] = counts[:n]
        # One length for both: what the image uses, counted or stored.
        if len(stored) < len(self.refs):
            stored = _grown(stored, len(self.refs))
        elif len(stored) > len(self.refs):
            self.refs = _grown(self.refs, len(stored))
            self.roles = _grown(self.roles, len(stored))
        return stored

    def compare(self, stored: np.ndarray) -> None:
        refs = self.refs
        used = np.flatnonzero((refs != 0) | (stored != 0))
        self.report.end_offset = (int(used[-1]) + 1) * self.cs if used.size else 0
        diff = np.flatnonzero(refs != stored)
        for c in diff.tolist():
            if refs[c] == 0:
                self.report.leak(f"cluster {c} (offset {c * self.cs:#x}) refcount={int(stored[c])} reference=0")
            else:
                self.report.error(
                    f"cluster {c} (offset {c * self.cs:#x}) refcount={int(stored[c])} reference={int(refs[c])}"
                )
        self.report.total_clusters = int((self.h.size + self.cs - 1) // self.cs)

    def check_copied(self, stored: np.ndarray, l1_entries: list[tuple[int, int]]) -> None:
        for e, off in l1_entries:
            rc = int(stored[off // self.cs]) if off // self.cs < len(stored) else 0
            has = bool(e & OFLAG_COPIED)
            if has != (rc == 1):
                self.report.error(f"OFLAG_COPIED L2 table at {off:#x}: L1 entry {e:#x} refcount={rc}")
        for clusters, copied, where, idx in self._copied_later:
            rc = stored[clusters]
            wrong = copied != (rc == 1)
            for k in np.flatnonzero(wrong)[:5].tolist():
                self.report.error(
                    f"OFLAG_COPIED data cluster {int(clusters[k]) * self.cs:#x} ({where} entry {int(idx[k])}) "
                    f"refcount={int(rc[k])}"
                )
            extra = int(np.count_nonzero(wrong)) - 5
            if extra > 0:
                self.report.error_count += extra

    def run(self) -> None:
        h = self.h
        self._copied_later: list[tuple[np.ndarray, np.ndarray, str, np.ndarray]] = []
        self.inc(0, self.cs, _HEADER, "header")
        if h.incompatible_features & INCOMPAT_DIRTY:
            self.report.notes.append("Note: the image is marked dirty (lazy refcounts); refcounts may lag.")
        if h.corrupt:
            self.report.notes.append("Note: QEMU marked the image corrupt; repair it with 'qemu-img check -r all'.")
        active_l1 = self.walk_l1(h.l1_table_offset, h.l1_size, True, "L1 table")
        self.walk_snapshots()
        self.walk_l2_tables()
        self.walk_bitmaps()
        stored = self.stored_refcounts()
        if stored is None:
            return
        self.compare(stored)
        self.check_copied(stored, active_l1)


_FIRST_CLUSTERS = 1 << 16


def _grown(a: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=a.dtype)
    out[: len(a)] = a
    return out


def _decode_refcounts(block: bytes, bits: int) -> np.ndarray:
    if bits >= 8:
        dtype = {8: ">u1", 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
        return np.frombuffer(block, dtype=dtype).astype(np.uint64)
    # Sub-byte widths: entry 0 in the least significant bits of byte 0.
    unpacked = np.unpackbits(np.frombuffer(block, dtype=np.uint8), bitorder="little")
    groups = unpacked.reshape(-1, bits).astype(np.uint64)
    weights = (np.uint64(1) << np.arange(bits, dtype=np.uint64))
    return (groups * weights).sum(axis=1).astype(np.uint64)


def check_image(path: str) -> CheckReport:
    """Check one image (not its backing files). Raises ImageError only if the
    header itself is unreadable; everything else goes into the report."""
    # open_layer turns OS errors (no such file, a directory) into ImageError.
    layer = open_layer(path, "qcow2")
    assert isinstance(layer, Qcow2Layer)
    try:
        report = CheckReport(path, layer.cluster_size, layer.file_size)
        _Checker(layer, report).run()
        return report
    finally:
        layer.close()


__all__ = ["CheckReport", "check_image"]
