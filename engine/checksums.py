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

import struct

import numpy as np
import xxhash
from bitarray import bitarray
from bitarray.util import sc_decode, sc_encode

from engine.errors import BackupfsError
from engine.fsutil import atomic_write, write_new

_MAGIC = b"BFSSUMS1"
_HEAD = struct.Struct("<8sIQQQ")  # magic, granularity, device size, defined count, bitmap length

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
    """Checksums of the granules one backup defines."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.granularity = granularity
        self.count = (size + granularity - 1) // granularity
        self.defined = bitarray(self.count, endian="little")
        self.defined.setall(0)
        self.hashes = np.zeros(self.count, dtype=np.uint64)

    def set(self, first_granule: int, hashes: list[int]) -> None:
        n = len(hashes)
        self.hashes[first_granule : first_granule + n] = hashes
        self.defined[first_granule : first_granule + n] = 1

    def set_zero(self, first_granule: int, n: int) -> None:
        """Granules that read as zeros (the device's short last granule too)."""
        g = self.granularity
        self.hashes[first_granule : first_granule + n] = zero_hash(g)
        self.defined[first_granule : first_granule + n] = 1
        last = self.count - 1
        if first_granule <= last < first_granule + n and self.size % g:
            self.hashes[last] = zero_hash(self.size % g)

    def encode(self) -> bytes:
        idx = np.frombuffer(self.defined.unpack(zero=b"\x00", one=b"\x01"), dtype=np.uint8).astype(bool)
        values = self.hashes[idx].astype("<u8").tobytes()
        bits = sc_encode(self.defined)
        body = _HEAD.pack(_MAGIC, self.granularity, self.size, int(idx.sum()), len(bits)) + bits + values
        return body + xxhash.xxh3_64_digest(body)

    def save(self, path: str, atomic: bool = True) -> None:
        """Durable file; ``atomic=False`` writes in place (a new name the caller commits)."""
        if atomic:
            atomic_write(path, self.encode(), 0o644)
        else:
            write_new(path, self.encode(), 0o644)

    @classmethod
    def load(cls, path: str) -> ChecksumRecord:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ChecksumError(f"{path}: cannot read checksums: {e.strerror}") from None
        if len(data) < _HEAD.size + 8 or data[:8] != _MAGIC:
            raise ChecksumError(f"{path}: not a backupfs checksum file")
        body, digest = data[:-8], data[-8:]
        if xxhash.xxh3_64_digest(body) != digest:
            raise ChecksumError(f"{path}: checksum file is damaged")
        _m, gran, size, count, blen = _HEAD.unpack_from(body, 0)
        rec = cls(size, gran)
        try:
            bits = sc_decode(body[_HEAD.size : _HEAD.size + blen])
        except ValueError as e:
            raise ChecksumError(f"{path}: checksum file is damaged: {e}") from None
        values = np.frombuffer(body, dtype="<u8", offset=_HEAD.size + blen, count=count)
        if len(bits) != rec.count or bits.count(1) != count:
            raise ChecksumError(f"{path}: checksum file does not match its device")
        rec.defined = bitarray(bits, endian="little")
        idx = np.frombuffer(rec.defined.unpack(zero=b"\x00", one=b"\x01"), dtype=np.uint8).astype(bool)
        rec.hashes[idx] = values
        return rec


def overlay(records: list[ChecksumRecord]) -> tuple[np.ndarray, bitarray]:
    """The chain's checksums: newest record wins; records ordered oldest first.

    Returns (hashes, defined): granules no record defines are not known.
    """
    if not records:
        raise ValueError("no records")
    base = records[0]
    hashes = base.hashes.copy()
    defined = base.defined.copy()
    for rec in records[1:]:
        mask = np.frombuffer(rec.defined.unpack(zero=b"\x00", one=b"\x01"), dtype=np.uint8).astype(bool)
        hashes[mask] = rec.hashes[mask]
        defined |= rec.defined
    return hashes, defined


__all__ = ["ChecksumRecord", "ChecksumError", "granule_hashes", "overlay", "zero_hash"]
