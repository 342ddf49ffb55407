"""Per-granule checksums of what each backup captured.

Every backup records an xxh3-64 checksum for each bitmap granule it
defines (a full defines every granule, zeros included; an incremental the
granules of the copy clusters it wrote). The chain's checksums at backup k
are the overlay of the records from the full up to k. They serve twice:
an untrusted bitmap is replaced by comparing the device against them, and
`verify` re-reads stored clusters against them.

The granule is the device's bitmap granularity, which divides every copy
cluster, so records stay comparable when target cluster sizes differ.
xxh3 runs at many GB/s: checksumming never slows the copy down.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import numpy as np
import xxhash
from bitarray import bitarray
from bitarray.util import sc_decode, sc_encode

from engine.errors import BackupfsError
from engine.fsutil import atomic_write, write_new
from engine.limits import MAX_GRANULARITY, MAX_GRANULES

_MAGIC = b"BFSSUMS1"
_HEAD = struct.Struct("<8sIQQQ")  # magic, granularity, device size, defined count, bitmap length

# Sanity bounds on what a record file may claim: the largest granularity,
# and no more granules than a device may have (engine/limits.py): a header
# claiming more would size the bitmap decoded from it.
_MAX_GRANULE = MAX_GRANULARITY
_MAX_GRANULES = MAX_GRANULES

_zero_hash_cache: dict[int, int] = {}


def zero_hash(length: int) -> int:
    h = _zero_hash_cache.get(length)
    if h is None:
        h = _zero_hash_cache[length] = xxhash.xxh3_64_intdigest(bytes(length))
    return h


def granule_hashes(data: memoryview | bytes, granularity: int) -> list[int]:
    """Checksums of consecutive granules of ``data`` (the last may be short)."""
    view = memoryview(data)
    digest = xxhash.xxh3_64_intdigest
    return [digest(view[i : i + granularity]) for i in range(0, len(view), granularity)]


class ChecksumError(BackupfsError):
    pass


class ChecksumRecord:
    """Checksums of the granules one backup defines.

    Two shapes. A record being built (by a job or a prune) is filled in any
    order, so it holds a dense array, one slot per granule, allocated at the
    first value. A loaded record holds only the values of the granules it
    defines, in granule order, as its file stores them: an incremental
    defines a few percent of a device, and opening a backup reads its whole
    lineage. Loaded dense, a 64-deep lineage of a 1 TiB device (16 Mi
    granules of 64 KiB) took 64 x 128 MiB to open.
    """

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.granularity = granularity
        self.count = (size + granularity - 1) // granularity
        self.defined = bitarray(self.count, endian="little")
        self.defined.setall(0)
        self._dense: np.ndarray | None = None
        self._packed: np.ndarray | None = None  # loaded: values of the defined granules

    # -- building -----------------------------------------------------------------------

    def _slots(self) -> np.ndarray:
        if self._dense is None:
            self._dense = self._expand()
            self._packed = None
        return self._dense

    def set(self, first_granule: int, hashes: list[int]) -> None:
        n = len(hashes)
        self._slots()[first_granule : first_granule + n] = hashes
        self.defined[first_granule : first_granule + n] = 1

    def set_zero(self, first_granule: int, n: int) -> None:
        """Granules that read as zeros (the device's short last granule too)."""
        g = self.granularity
        slots = self._slots()
        slots[first_granule : first_granule + n] = zero_hash(g)
        self.defined[first_granule : first_granule + n] = 1
        last = self.count - 1
        if first_granule <= last < first_granule + n and self.size % g:
            slots[last] = zero_hash(self.size % g)

    # -- reading ------------------------------------------------------------------------

    def packed(self) -> np.ndarray:
        """The values of the defined granules, in granule order."""
        if self._packed is not None:
            return self._packed
        if self._dense is None:
            return np.zeros(0, dtype=np.uint64)
        if self.defined.all():
            return self._dense  # a full: every granule (its index array alone was 8 bytes a granule)
        return self._dense[set_bits(self.defined)]

    @property
    def hashes(self) -> np.ndarray:
        """One writable slot per granule (0 where not defined); makes a loaded record dense."""
        return self._slots()

    def _expand(self) -> np.ndarray:
        out = np.zeros(self.count, dtype=np.uint64)
        if self._packed is not None and len(self._packed):
            out[set_bits(self.defined)] = self._packed
        return out

    def memory_bytes(self) -> int:
        n = len(self.defined) // 8
        for a in (self._dense, self._packed):
            if a is not None:
                n += a.nbytes
        return n

    # -- files --------------------------------------------------------------------------

    def encode(self) -> bytes:
        return b"".join(self.encode_parts())

    def encode_parts(self) -> list[bytes | memoryview]:
        """The file, in pieces that are written one after the other.

        Not joined: the values of a 4 TiB full are 512 MiB, and copying
        them into one bytes object (after a little-endian copy, after an
        index copy) took the backup to 2.3 GB of memory at its end.
        """
        values = np.ascontiguousarray(self.packed(), dtype="<u8")  # no copy when already so
        bits = sc_encode(self.defined)
        head = _HEAD.pack(_MAGIC, self.granularity, self.size, len(values), len(bits)) + bits
        raw = memoryview(values).cast("B")
        digest = xxhash.xxh3_64()
        digest.update(head)
        digest.update(raw)
        return [head, raw, digest.digest()]

    def save(self, path: str, atomic: bool = True) -> None:
        """Durable file; ``atomic=False`` writes in place (a new name the caller commits)."""
        if atomic:
            atomic_write(path, self.encode_parts())
        else:
            write_new(path, self.encode_parts())

    @classmethod
    def load(cls, path: str) -> ChecksumRecord:
        try:
            with open(path, "rb", buffering=0) as f:
                length = os.fstat(f.fileno()).st_size
                data = bytearray(length)  # writable: overlay() may adopt the values in place
                view, got = memoryview(data), 0
                while got < length and (n := f.readinto(view[got:])):
                    got += n
                del view  # done filling; the values get their own view below
        except OSError as e:
            raise ChecksumError(f"{path}: cannot read checksums: {e.strerror}") from None
        if got != length or length < _HEAD.size + 8 or data[:8] != _MAGIC:
            raise ChecksumError(f"{path}: not a backupfs checksum file")
        body = memoryview(data)[:-8]
        if xxhash.xxh3_64_digest(body) != data[-8:]:
            raise ChecksumError(f"{path}: checksum file is damaged")
        _m, gran, size, count, blen = _HEAD.unpack_from(body, 0)
        if _HEAD.size + blen + 8 * count != len(body):
            raise ChecksumError(f"{path}: checksum file is damaged: its lengths do not add up")
        # Checked before anything is sized by them: a bitmap of the claimed
        # granules is allocated next.
        if gran < 512 or gran & (gran - 1) or gran > _MAX_GRANULE:
            raise ChecksumError(f"{path}: checksum file is damaged: granularity {gran}")
        granules = -(-size // gran)
        if granules > _MAX_GRANULES or count > granules:
            raise ChecksumError(f"{path}: checksum file is damaged: {count} of {granules} granules")
        encoded = body[_HEAD.size : _HEAD.size + blen]
        try:
            if _sc_nbits(encoded) != granules:  # before decoding allocates that many bits
                raise ChecksumError(f"{path}: checksum file does not match its device")
            bits = sc_decode(encoded)
        except (ValueError, OverflowError, TypeError, StopIteration) as e:
            raise ChecksumError(f"{path}: checksum file is damaged: {e}") from None
        if len(bits) != granules or bits.count(1) != count:
            raise ChecksumError(f"{path}: checksum file does not match its device")
        rec = cls.__new__(cls)
        rec.size, rec.granularity, rec.count = size, gran, granules
        rec.defined = bitarray(bits, endian="little")
        rec._dense = None
        rec._packed = np.frombuffer(data, dtype="<u8", offset=_HEAD.size + blen, count=count)
        return rec

    def take_dense(self) -> np.ndarray:
        """The dense array, reusing the record's own memory where it can; empties the record."""
        if self._dense is not None:
            out = self._dense
        elif self._packed is not None and len(self._packed) == self.count and self._packed.flags.writeable:
            out = self._packed  # defines every granule (a full): its values are the dense array
        else:
            out = self._expand()
        self._dense = self._packed = None
        self.defined = bitarray(self.count, endian="little")
        self.defined.setall(0)
        return out


def _sc_nbits(encoded: memoryview) -> int:
    """The bit count an ``sc_encode`` stream declares, from its header alone.

    The header is one byte (bits 0-3: how many little-endian length bytes
    follow; bit 4: bit order; bits 5-7: zero), then the length. bitarray's
    own ``sc_stat`` reads the same field but scans every block in Python
    on the way: 75 ms a record for a 1 TiB device, 4.8 s of the 6 s it took
    to open the checksums of a 64-deep lineage (bench/large_device.py).
    ``sc_decode`` checks the blocks itself, and ``load`` checks its result.
    """
    if not len(encoded):
        raise ValueError("the bitmap is empty")
    head = encoded[0]
    if head & 0xE0:
        raise ValueError(f"invalid bitmap header 0x{head:02x}")
    width = head & 0x0F
    if len(encoded) < 1 + width:
        raise ValueError("the bitmap header is cut short")
    return int.from_bytes(encoded[1 : 1 + width], "little")


def set_bits(bits: bitarray) -> np.ndarray:
    """Indices of the set bits, ascending.

    Through the bytes, not a byte per bit: a record of a 1 TiB device has
    16 Mi bits, mostly clear, and unpacking them all for a boolean mask cost
    55 ms per record and its assignment 270 ms; finding and using the
    indices takes about a tenth of that.
    """
    endian = bits.endian() if callable(bits.endian) else bits.endian  # a method before bitarray 3
    if endian != "little":
        bits = bitarray(bits, endian="little")
    raw = np.frombuffer(bits, dtype=np.uint8)  # little-endian bitarray: bit i is byte i//8, bit i%8
    nz = np.flatnonzero(raw)
    pos = np.flatnonzero(np.unpackbits(raw[nz], bitorder="little"))
    idx = nz[pos >> 3] * 8 + (pos & 7)
    return idx[idx < len(bits)]  # the pad bits of the last byte are not ours


class Unrecorded:
    """A layer of a lineage whose checksum record is missing or unreadable.

    ``covers``: the granules its image holds. What it holds hides whatever
    older records say there, and nothing says what it should be: overlay()
    leaves those granules unchecked until a newer record defines them.
    """

    def __init__(self, covers: bitarray) -> None:
        self.defined = covers


def overlay(records: Iterable[ChecksumRecord | Unrecorded]) -> tuple[np.ndarray, bitarray]:
    """The chain's checksums: newest record wins; records ordered oldest first.

    Consumes the records (the oldest lends its memory to the result), and
    takes them one at a time: given a generator that loads each as it is
    asked for, only the result and one record are in memory at once.
    Returns (hashes, defined): granules no record defines are not known.
    """
    hashes: np.ndarray | None = None
    defined: bitarray | None = None
    for rec in records:
        if hashes is None or defined is None:
            if isinstance(rec, Unrecorded):
                defined = bitarray(len(rec.defined), endian="little")
                defined.setall(0)
                hashes = np.zeros(len(defined), dtype=np.uint64)
            else:
                defined = rec.defined.copy()
                hashes = rec.take_dense()
            continue
        if len(rec.defined) != len(defined):
            raise ChecksumError("checksum records of one lineage cover different device sizes")
        if isinstance(rec, Unrecorded):
            defined &= ~rec.defined
        elif rec.defined.any():
            hashes[set_bits(rec.defined)] = rec.packed()
            defined |= rec.defined
    if hashes is None or defined is None:
        raise ValueError("no records")
    return hashes, defined


__all__ = ["ChecksumRecord", "ChecksumError", "Unrecorded", "granule_hashes", "overlay", "zero_hash"]
