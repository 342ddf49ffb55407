"""Dirty bitmaps: which granules of a device were written, and their lifecycle.

One bit per granule (a power of two, 512 B to 64 MiB), little-endian
bitarray so the persisted bytes mean the same on every machine. The
lifecycle is QEMU's three operations, named, so no dirty bit can fall
between flags:

- ``freeze``: a job takes the current bits; a fresh successor records the
  writes that arrive while it runs;
- ``abdicate``: the job succeeded, its frozen bits are dropped;
- ``reclaim``: the job failed or was cancelled, its frozen bits go back
  into the successor, so the next job copies them again.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash
from bitarray import bitarray
from bitarray.util import sc_decode, sc_encode

from engine.checksums import _sc_nbits
from engine.errors import BackupfsError, UsageError
from engine.fsutil import atomic_write
from engine.limits import MAX_GRANULARITY, MAX_GRANULES, granule_count

MIN_GRANULARITY = 512


def validate_granularity(granularity: int) -> int:
    if granularity <= 0 or granularity & (granularity - 1):
        raise UsageError(f"granularity {granularity} is not a power of two")
    if not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY:
        raise UsageError(f"granularity {granularity} out of range (512 B to 64 MiB)")
    return granularity


class DirtyBitmap:
    """The dirty granules of a device of ``size`` bytes."""

    def __init__(self, size: int, granularity: int, bits: bitarray | None = None) -> None:
        validate_granularity(granularity)
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        n = (size + granularity - 1) >> self.shift
        if bits is None:
            bits = bitarray(n, endian="little")
            bits.setall(0)
        elif len(bits) != n or bits.endian != "little":
            raise ValueError(f"bitmap of {len(bits)} bits for {n} granules")
        self.bits = bits

    def mark(self, offset: int, length: int) -> None:
        """Mark every granule that [offset, offset+length) touches."""
        if length <= 0:
            return
        end = min(offset + length, self.size)
        if offset >= end:
            return
        self.bits[offset >> self.shift : ((end - 1) >> self.shift) + 1] = 1

    def clear(self) -> None:
        self.bits.setall(0)

    def count(self) -> int:
        """Dirty granules."""
        return self.bits.count(1)

    def dirty_bytes(self) -> int:
        """Dirty bytes, the short last granule counted as what it covers."""
        n = self.count()
        if n and self.bits[-1] and self.size % self.granularity:
            return (n - 1) * self.granularity + self.size % self.granularity
        return n * self.granularity

    def is_dirty(self, offset: int, length: int) -> bool:
        if length <= 0:
            return False
        end = min(offset + length, self.size)
        return self.bits.find(1, offset >> self.shift, ((end - 1) >> self.shift) + 1) >= 0

    def granule_runs(self) -> Iterator[tuple[int, int]]:
        """(first, stop) granule index ranges of dirty bits, in order."""
        return bit_runs(self.bits)

    def runs(self) -> Iterator[tuple[int, int]]:
        """(start, end) byte ranges of dirty data, clipped to the device size."""
        g = self.shift
        for first, stop in self.granule_runs():
            yield first << g, min(stop << g, self.size)

    def merge(self, other: DirtyBitmap) -> None:
        """OR ``other``'s bits into ours."""
        if (other.size, other.granularity) != (self.size, self.granularity):
            raise ValueError("cannot merge bitmaps of different geometry")
        self.bits |= other.bits

    def copy(self) -> DirtyBitmap:
        return DirtyBitmap(self.size, self.granularity, self.bits.copy())

    def run_count(self) -> int:
        """Dirty runs, counted as the bits set whose predecessor is clear.

        Whole-bitmap operations in C: the bitmap file's summary shows this
        for every `stat` and `cat`, and a fragmented bitmap of a 1 TiB
        device has hundreds of thousands of runs (walking them took a
        Python step each).
        """
        bits = self.bits
        if not bits.any():
            return 0
        starts = bits & ~(bits >> 1)  # little-endian: ``>> 1`` moves bit i to i + 1
        return starts.count(1)


def bit_runs(bits: bitarray) -> Iterator[tuple[int, int]]:
    """(first, stop) index ranges of the set bits, in order.

    A find(1)/find(0) loop: each run costs two C-level searches, never a
    Python step per bit.
    """
    n = len(bits)
    pos = bits.find(1)
    while pos >= 0:
        stop = bits.find(0, pos)
        if stop < 0:
            stop = n
        yield pos, stop
        if stop >= n:
            return
        pos = bits.find(1, stop)


class TrackedBitmap:
    """A device's bitmap with its freeze / abdicate / reclaim lifecycle.

    ``active`` always receives new writes. While a job runs, ``frozen`` holds
    the bits the job is copying. Not thread-safe by itself: the device
    serialises these calls with its write lock.
    """

    def __init__(self, active: DirtyBitmap, trusted: bool = True) -> None:
        self.active = active
        self.frozen: DirtyBitmap | None = None
        # False when writes may have escaped the bitmap (unclean stop, source
        # changed behind our back): jobs must compare checksums instead.
        self.trusted = trusted

    def freeze(self) -> DirtyBitmap:
        """Hand the current bits to a job; new writes go to a fresh successor."""
        if self.frozen is not None:
            raise RuntimeError("bitmap already frozen by a running job")
        self.frozen = self.active
        self.active = DirtyBitmap(self.frozen.size, self.frozen.granularity)
        return self.frozen

    def abdicate(self) -> None:
        """The job succeeded: its bits are in the backup, drop them."""
        if self.frozen is None:
            raise RuntimeError("no frozen bitmap to abdicate")
        self.frozen = None

    def reclaim(self) -> None:
        """The job failed: its bits are still to be copied, merge them back."""
        if self.frozen is None:
            raise RuntimeError("no frozen bitmap to reclaim")
        self.active.merge(self.frozen)
        self.frozen = None

    def pending(self) -> DirtyBitmap:
        """Everything not yet in a good backup: active plus any frozen bits."""
        out = self.active.copy()
        if self.frozen is not None:
            out.merge(self.frozen)
        return out


# -- persistence --------------------------------------------------------------

_MAGIC = b"BFSBITM1"
# magic, flags, granularity, device size, source size, mtime_ns, inode, dev, payload length;
# then the payload, then (untrusted only) why, in UTF-8, up to the checksum: a
# reason kept across a remount tells the administrator what happened, not
# just that the next backup will scan. (A version without the reason reads
# such a file as unreadable, which also means untrusted.)
_HEAD = struct.Struct("<8sIIQQqQQQ")
MAX_REASON = 512
FLAG_IN_USE = 1
FLAG_UNTRUSTED = 2


@dataclass(frozen=True)
class SourceIdentity:
    """What we remember of a source, to notice changes made behind our back."""

    size: int
    mtime_ns: int
    inode: int
    dev: int

    @classmethod
    def of(cls, path: str, size: int) -> SourceIdentity:
        st = os.stat(path)
        return cls(size, st.st_mtime_ns, st.st_ino, st.st_dev)

    @classmethod
    def of_fd(cls, fd: int, size: int) -> SourceIdentity:
        """The identity of the file we hold open: if the path now names
        another file, a later mount sees the difference."""
        st = os.fstat(fd)
        return cls(size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass
class StoredBitmap:
    bitmap: DirtyBitmap
    in_use: bool
    identity: SourceIdentity
    trusted: bool = True
    reason: str | None = None  # why it is untrusted, as the distrust said it


class BitmapFileError(BackupfsError):
    """A persisted bitmap that is unreadable: treat the device as untrusted."""


def encode_bitmap(
    bitmap: DirtyBitmap, identity: SourceIdentity, in_use: bool, trusted: bool = True,
    reason: str | None = None,
) -> bytes:
    payload = sc_encode(bitmap.bits)
    why = b"" if trusted or not reason else reason.encode("utf-8")[:MAX_REASON]
    head = _HEAD.pack(
        _MAGIC,
        (FLAG_IN_USE if in_use else 0) | (0 if trusted else FLAG_UNTRUSTED),
        bitmap.granularity,
        bitmap.size,
        identity.size,
        identity.mtime_ns,
        identity.inode,
        identity.dev,
        len(payload),
    )
    body = head + payload + why
    return body + xxhash.xxh3_64_digest(body)


def decode_bitmap(path: str, data: bytes) -> StoredBitmap:
    if len(data) < _HEAD.size + 8 or data[:8] != _MAGIC:
        raise BitmapFileError(f"{path}: not a backupfs bitmap")
    body, digest = data[:-8], data[-8:]
    if xxhash.xxh3_64_digest(body) != digest:
        raise BitmapFileError(f"{path}: bitmap checksum mismatch")
    magic, flags, gran, size, ssize, mtime, ino, dev, plen = _HEAD.unpack_from(body, 0)
    end = _HEAD.size + plen
    if end > len(body) or len(body) - end > MAX_REASON:
        raise BitmapFileError(f"{path}: bitmap length mismatch")
    _check_geometry(path, gran, size, body[_HEAD.size : end])
    try:
        bits = sc_decode(body[_HEAD.size : end])
        if bits.endian != "little":
            bits = bitarray(bits, endian="little")
        bitmap = DirtyBitmap(size, gran, bits)
    except (ValueError, TypeError, UsageError) as e:
        raise BitmapFileError(f"{path}: bitmap does not decode: {e}") from None
    return StoredBitmap(
        bitmap,
        bool(flags & FLAG_IN_USE),
        SourceIdentity(ssize, mtime, ino, dev),
        not flags & FLAG_UNTRUSTED,
        body[end:].decode("utf-8", "replace") or None,
    )


def _check_geometry(path: str, granularity: int, size: int, payload: bytes) -> None:
    """Refuse a header whose numbers would size the bitmap beyond what any
    device has, before decoding allocates it: the payload declares its own
    bit count, and a damaged or crafted file can claim 2^50 bits."""
    if not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY or granularity & (granularity - 1):
        raise BitmapFileError(f"{path}: bitmap is damaged: granularity {granularity}")
    granules = granule_count(size, granularity)
    if granules > MAX_GRANULES:
        raise BitmapFileError(f"{path}: bitmap is damaged: {granules} granules, more than any device has")
    try:
        declared = _sc_nbits(memoryview(payload))
    except ValueError as e:
        raise BitmapFileError(f"{path}: bitmap does not decode: {e}") from None
    if declared != granules:
        raise BitmapFileError(f"{path}: bitmap is damaged: {declared} bits for {granules} granules")


def save_bitmap(
    path: str, bitmap: DirtyBitmap, identity: SourceIdentity, in_use: bool, trusted: bool = True,
    reason: str | None = None,
) -> None:
    """Replace the persisted bitmap atomically."""
    atomic_write(path, encode_bitmap(bitmap, identity, in_use, trusted, reason))


def load_bitmap(path: str) -> StoredBitmap:
    with open(path, "rb") as f:
        return decode_bitmap(path, f.read())

