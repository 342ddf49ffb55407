"""Checksummed reads and verification: never hand out wrong bytes silently.

A backup's granules have the checksums recorded when they were copied (the
overlay of its lineage's records). ``VerifiedView`` reads whole granules
and checks each one before returning any of its bytes: a damaged cluster
becomes an error for that range (EIO through the mount), not wrong data.
``verify_backup`` re-reads everything a backup stores and checks the image
structure and its link to its parent.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash
from bitarray import bitarray

from engine.bitmap import bit_runs
from engine.catalog import BackupRecord
from engine.chain import ChainView
from engine.checksums import ChecksumError, ChecksumRecord, overlay, set_bits, zero_hash
from engine.errors import BackupfsError, ImageError
from engine.job import cancelled, units_of_extents
from engine.qcow2.check import check_image
from engine.qcow2.layers import UNALLOC, Qcow2Layer, open_layer
from engine.text import escape, one_line

_VERIFY_CHUNK = 8 * 1024 * 1024
_AT_OFFSET = re.compile(r" at offset (\d+)$")
_SUMMARY = re.compile(r"\d+ backups? checked, \d+ bad, (\d+) bytes re-read")


class ChecksumMismatch(BackupfsError):
    errno = errno.EIO

    def __init__(self, backup: str, offset: int, length: int) -> None:
        self.backup = backup
        self.offset = offset
        super().__init__(
            f"backup {backup}: data at offset {offset} (+{length} bytes) fails its checksum; "
            "the image is damaged there"
        )


def lineage_hashes(records: Iterable[ChecksumRecord]) -> tuple[np.ndarray, bitarray]:
    """Checksums of a backup from its lineage's records, oldest first."""
    return overlay(records)


class VerifiedView:
    """A ChainView whose reads are checked granule by granule."""

    def __init__(self, view: ChainView, backup: str, granularity: int, hashes: np.ndarray,
                 defined: bitarray) -> None:
        self.view = view
        self.backup = backup
        self.path = view.path
        self.size = view.size
        self.granularity = granularity
        self._hashes = hashes
        self._defined = defined
        # Granules checked once (or with nothing to check) are read as they
        # are from then on: a granule-sized read for every request would
        # make a 4 KiB read at 64 MiB granularity read and hash 64 MiB. The
        # images do not change while they are backups; a second read of a
        # granule gets what the first one checked.
        self._checked = ~defined

    def close(self) -> None:
        self.view.close()

    def __enter__(self) -> VerifiedView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advise(self, offset: int, length: int) -> int:
        return self.view.advise(offset, length)

    def memory_bytes(self) -> int:
        """The chain index, and the checksums: 8 bytes and a bit per granule."""
        return self.view.memory_bytes() + self._hashes.nbytes + 2 * (len(self._defined) // 8)

    def read(
        self, offset: int, length: int, nowait: bool = False, into: bytearray | None = None
    ) -> bytearray | memoryview:
        end = min(offset + length, self.size)
        if end <= offset:
            return bytearray()
        g = self.granularity
        first, stop = offset // g, -(-end // g)
        if self._checked.find(0, first, stop) < 0:  # all checked (no slice copy on this hot path)
            return self.view.read(offset, end - offset, nowait=nowait, into=into)
        a = first * g
        b = min(stop * g, self.size)
        buf = self.view.read(a, b - a, nowait=nowait, into=into)
        self.check(a, memoryview(buf))
        self._checked[first:stop] = 1
        if a == offset and b == end:
            return buf
        return memoryview(buf)[offset - a : end - a]

    def pending(self, offset: int, length: int) -> list[Future[list[bytes | None]]] | None:
        """ChainView.pending of what ``read(offset, length)`` reads (whole
        granules, while they are not checked yet)."""
        end = min(offset + length, self.size)
        if end <= offset:
            return None
        g = self.granularity
        first, stop = offset // g, -(-end // g)
        if self._checked.find(0, first, stop) < 0:
            return self.view.pending(offset, end - offset)
        a = first * g
        return self.view.pending(a, min(stop * g, self.size) - a)

    def check(self, offset: int, data: memoryview) -> None:
        """Raise ChecksumMismatch unless every recorded granule in ``data`` matches."""
        g = self.granularity
        first = offset // g
        digest = xxhash.xxh3_64_intdigest
        hashes = self._hashes
        defined = self._defined
        for i in range(0, len(data), g):
            k = first + i // g
            if defined[k] and digest(data[i : i + g]) != int(hashes[k]):
                raise ChecksumMismatch(self.backup, offset + i, min(g, len(data) - i))


def _zero_mismatches(granules: bitarray, hashes: np.ndarray, granularity: int, size: int) -> list[int]:
    """The granules among ``granules`` (which read as zeros) whose recorded checksum is not zeros'."""
    out: list[int] = []
    zero = np.uint64(zero_hash(granularity))
    step = 1 << 20  # granules at a time: a 4 TiB disk has 64 Mi of them
    for start in range(0, len(granules), step):
        part = granules[start : start + step]
        if not part.any():
            continue
        index = set_bits(part) + start
        out.extend(int(k) for k in index[hashes[index] != zero])
    tail = size % granularity
    last = len(granules) - 1
    if tail and granules[last]:  # the disk's short last granule: zeros of its own length
        out = [k for k in out if k != last]
        if int(hashes[last]) != zero_hash(tail):
            out.append(last)
    return out


def held_granules(image: str, size: int, granularity: int) -> bitarray:
    """The granules of a ``size``-byte disk that one image itself holds."""
    with open_layer(image, "qcow2") as layer:
        rows = layer.extents()
        return units_of_extents(rows[rows[:, 2] != UNALLOC], granularity, size)


# -- verify -------------------------------------------------------------------------------


@dataclass
class Problem:
    backup: str
    what: str
    offset: int | None = None
    harms_reads: bool = True  # not so for leaked clusters: space lost, nothing read wrong
    inherited: bool = False  # its own image is sound; it reads through a damaged parent

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{self.backup}: {self.what}{where}"


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0
    advice: list[str] = field(default_factory=list)  # what to do about the damage (engine/damage.py)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"BAD {one_line(str(p))}" for p in self.problems]
        bad = {p.backup for p in self.problems}
        for b in self.checked:
            if b not in bad:
                lines.append(f"ok  {escape(b)}")
        lines.append(
            f"{len(self.checked)} backup{'' if len(self.checked) == 1 else 's'} checked, {len(bad)} bad, "
            f"{self.bytes_read} bytes re-read"
        )
        lines += [one_line(a) for a in self.advice]
        return "\n".join(lines)

    def data(self) -> dict[str, Any]:
        """The report for scripts (verify --json, and the mount's job status):
        raw text, offsets and sizes in bytes (README "Output for scripts")."""
        bad = {p.backup for p in self.problems}
        return {
            "ok": self.ok,
            "checked": list(self.checked),
            "bad": [b for b in self.checked if b in bad] + sorted(bad - set(self.checked)),
            "problems": [{"backup": p.backup, "problem": p.what, "offset": p.offset, "harms_reads": p.harms_reads,
                          "inherited": p.inherited}
                         for p in self.problems],
            "bytes_read": self.bytes_read,
            "advice": list(self.advice),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> VerifyReport:
        """The report ``data()`` gave (read back from the mount's job status)."""
        return cls(
            checked=[str(b) for b in data["checked"]],
            problems=[Problem(str(p["backup"]), str(p["problem"]), p["offset"], bool(p["harms_reads"]),
                              bool(p.get("inherited", False)))
                      for p in data["problems"]],
            bytes_read=int(data["bytes_read"]),
            advice=[str(a) for a in data.get("advice", [])],
        )

    @classmethod
    def from_rendered(cls, lines: Iterable[str]) -> VerifyReport:
        """The report read back from ``render()``'s lines: for a verify
        through the mount whose report was too big for the job status
        (an xattr holds 64 KiB), whose text holds all of it. Text as
        ``render`` escaped it; harms_reads inferred (leaks alone are
        harmless)."""
        report = cls()
        seen: set[str] = set()
        summarised = False
        for line in lines:
            if summarised:  # what follows the summary is the advice
                report.advice.append(line)
            elif line.startswith("BAD "):
                backup, _sep, what = line[4:].partition(": ")
                m = _AT_OFFSET.search(what)
                offset = int(m.group(1)) if m else None
                what = what[: m.start()] if m else what
                harmless = what.startswith("image structure: ") and what.endswith(" leaked clusters")
                report.problems.append(Problem(backup, what, offset, not harmless))
                if backup not in seen:
                    seen.add(backup)
                    report.checked.append(backup)
            elif line.startswith("ok  "):
                report.checked.append(line[4:])
            elif (m := _SUMMARY.fullmatch(line)) is not None:
                report.bytes_read = int(m.group(1))
                summarised = True
        report.checked.sort()  # ids sort by time: the order a verify checks them in
        return report

    def merge(self, other: VerifyReport) -> None:
        """Add another device's report to this one (a mounted verify asks each device's mount)."""
        self.checked += other.checked
        self.problems += other.problems
        self.bytes_read += other.bytes_read
        self.advice += [a for a in other.advice if a not in self.advice]


def verify_backup(
    repo_path: str,
    rec: BackupRecord,
    parent: BackupRecord | None,
    lineage_records: Callable[[], Iterable[ChecksumRecord]],
    report: VerifyReport,
    on_bytes: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Structure, link and stored data of one backup, into ``report``.

    Raises JobCancelled when ``cancel`` is set: a verify of a big chain
    reads for minutes, and whoever asked for it may give up.
    """
    report.checked.append(rec.id)
    try:
        _verify_one(repo_path, rec, parent, lineage_records, report, on_bytes, cancel)
    except (ImageError, OSError) as e:
        if isinstance(e, ImageError) and e.out_of_resources:
            raise  # no descriptors or memory left: that says nothing about the backup
        # A read that fails outright (a bad sector under a table): this
        # backup is bad, and the others are still checked.
        reason = e.problem if isinstance(e, ImageError) else e.strerror or str(e)
        report.problems.append(Problem(rec.id, f"image unreadable: {reason}"))


def _verify_one(
    repo_path: str,
    rec: BackupRecord,
    parent: BackupRecord | None,
    lineage_records: Callable[[], Iterable[ChecksumRecord]],
    report: VerifyReport,
    on_bytes: Callable[[int], None] | None,
    cancel: threading.Event | None,
) -> None:
    image = os.path.join(repo_path, rec.image)
    if not os.path.exists(image):
        report.problems.append(Problem(rec.id, f"image {rec.image} is missing"))
        return
    # 1. The image's own structure.
    try:
        check = check_image(image)
    except ImageError as e:
        if e.out_of_resources:
            raise
        report.problems.append(Problem(rec.id, f"image unreadable: {e.problem}"))
        return
    for message in check.errors[:10]:
        report.problems.append(Problem(rec.id, f"image structure: {message}"))
    if check.leak_count:
        report.problems.append(Problem(rec.id, f"image structure: {check.leak_count} leaked clusters",
                                       harms_reads=False))
    # 2. The link to its parent.
    layer = open_layer(image, "qcow2")
    try:
        assert isinstance(layer, Qcow2Layer)
        backing = layer.backing_file
        size = layer.size
    finally:
        layer.close()
    expected = f"{parent.id}.qcow2" if parent is not None else None
    if rec.parent is not None and parent is None:
        report.problems.append(Problem(rec.id, f"parent {rec.parent} is missing from the catalog"))
    elif backing != expected:
        report.problems.append(
            Problem(rec.id, f"backing file is {backing!r}, should be {expected!r} (the parent's image)")
        )
    if size != rec.size:
        report.problems.append(Problem(rec.id, f"virtual size {size}, catalog says {rec.size}"))
    if any(p.backup == rec.id and p.harms_reads for p in report.problems):
        return  # no point re-reading data through a broken image or chain (a leak is no reason)
    # 3. Every granule this backup stores, against its recorded checksum.
    if rec.checksums is None:
        return
    try:
        own = ChecksumRecord.load(os.path.join(repo_path, rec.checksums))
        hashes, defined = lineage_hashes(lineage_records())
    except ChecksumError as e:
        report.problems.append(Problem(rec.id, str(e)))
        return
    # What the image holds beyond what its record accounts for: an L2 entry
    # turned into a zero cluster, a write into the image. Reading there
    # hides what the parent holds, and nothing checks it.
    extra = held_granules(image, rec.size, rec.granularity) & ~own.defined
    if extra.any():
        report.problems.append(Problem(
            rec.id, "the image holds data its checksum record does not cover (changed after the backup)",
            extra.index(1) * rec.granularity))
        return
    try:
        view = ChainView.open(image, tip_format="qcow2")
    except ImageError as e:
        if e.out_of_resources:
            raise
        report.problems.append(Problem(rec.id, f"chain unreadable: {e}"))
        return
    checker = VerifiedView(view, rec.id, rec.granularity, hashes, defined)
    g = rec.granularity
    chunk = max(g, _VERIFY_CHUNK // g * g)
    try:
        # Granules where the chain holds nothing read as zeros: their
        # recorded checksums are compared with the zero checksum, not read
        # and hashed (a full of a thin 4 TiB disk re-read 4 TiB of zeros).
        may_hold = bitarray(len(own.defined), endian="little")
        may_hold.setall(0)
        for a, b in view.allocated_ranges():
            may_hold[a // g : -(-b // g)] = 1
        for k in _zero_mismatches(own.defined & ~may_hold, hashes, g, rec.size):
            report.problems.append(Problem(rec.id, "stored data fails its checksum", k * g))
        for first, stop in bit_runs(own.defined & may_hold):
            pos = first * g
            end = min(stop * g, rec.size)
            while pos < end:
                if cancel is not None and cancel.is_set():
                    raise cancelled(cancel, "verify")
                n = min(chunk, end - pos)
                try:
                    data = view.read(pos, n)
                    checker.check(pos, memoryview(data))
                except ChecksumMismatch as e:
                    report.problems.append(Problem(rec.id, "stored data fails its checksum", e.offset))
                    # Keep going past the bad granule to find every damaged one.
                    bad_end = e.offset - e.offset % g + g
                    n = max(bad_end - pos, g)
                except ImageError as e:
                    report.problems.append(Problem(rec.id, f"unreadable: {e.problem}", pos))
                except OSError as e:
                    report.problems.append(Problem(rec.id, f"unreadable: {e.strerror}", pos))
                report.bytes_read += n
                if on_bytes is not None:
                    on_bytes(n)
                pos += n
    finally:
        view.close()

