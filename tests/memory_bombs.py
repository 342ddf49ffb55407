"""Small files that claim a lot: qcow2 images with millions of mapping
entries, for the tests that memory is bounded by what an image holds.

Written directly (no QEMU can make them): every L2 entry is chosen, and
the refcounts are exact, so `qemu-img check` finds nothing wrong with them.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
COMPRESSED_FLAG = 1 << 62
ZERO_FLAG = 1
COPIED_FLAG = 1 << 63
_REFCOUNT_ORDER = 6  # 64-bit refcounts: one cluster can be referenced millions of times


def _header(virtual_size: int, l1_entries: int, l1_offset: int, reftable_offset: int) -> bytes:
    """A version 3 header, 104 bytes, no extensions, no backing file."""
    return struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, CLUSTER_BITS, virtual_size, 0, l1_entries, l1_offset,
        reftable_offset, 1, 0, 0, 0, 0, 0, _REFCOUNT_ORDER, 104,
    ) + b"\0" * 8  # the end-of-extensions marker


def write_mapped_image(path: Path, l2_tables: int, entry_of: np.ndarray | None = None,
                       virtual_size: int | None = None) -> int:
    """A qcow2 image whose ``l2_tables`` L2 tables each repeat ``entry_of``
    (one uint64 per L2 entry), or, by default, map every cluster to one
    compressed cluster of zeros. Returns the number of mapped entries.

    Layout: header, L1, refcount table, refcount block, the compressed
    cluster, then the L2 tables.
    """
    data_cluster = 4
    first_l2 = 5
    clusters = first_l2 + l2_tables
    if clusters > CLUSTER // 8:
        raise ValueError("one refcount block must cover the file")
    deflated = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = deflated.compress(bytes(CLUSTER)) + deflated.flush()
    assert len(payload) <= 512
    descriptor = COMPRESSED_FLAG | (data_cluster * CLUSTER)  # one sector: a size field of 0
    if entry_of is None:
        entry_of = np.full(L2_ENTRIES, descriptor, dtype=np.uint64)
    size = virtual_size if virtual_size is not None else l2_tables * L2_ENTRIES * CLUSTER
    refs = np.zeros(CLUSTER // 8, dtype=np.uint64)
    refs[:first_l2] = 1
    refs[first_l2:clusters] = 1
    compressed_refs = int(np.count_nonzero(entry_of & np.uint64(COMPRESSED_FLAG))) * l2_tables
    refs[data_cluster] = compressed_refs
    l1 = np.zeros(CLUSTER // 8, dtype=">u8")
    l1[:l2_tables] = (np.arange(first_l2, clusters, dtype=np.uint64) * np.uint64(CLUSTER)) | np.uint64(COPIED_FLAG)
    reftable = np.zeros(CLUSTER // 8, dtype=">u8")
    reftable[0] = 3 * CLUSTER
    table = entry_of.astype(">u8").tobytes()
    with open(path, "wb") as f:
        f.write(_header(size, l2_tables, CLUSTER, 2 * CLUSTER).ljust(CLUSTER, b"\0"))
        f.write(l1.tobytes())
        f.write(reftable.tobytes())
        f.write(refs.astype(">u8").tobytes())
        f.write(payload.ljust(CLUSTER, b"\0"))
        for _ in range(l2_tables):
            f.write(table)
    return int(np.count_nonzero(entry_of)) * l2_tables


def write_zero_stripes(path: Path, l2_tables: int) -> int:
    """Every other cluster a zero cluster, the rest unallocated: one extent
    per cluster, with nothing to copy (an import reads no data)."""
    entries = np.zeros(L2_ENTRIES, dtype=np.uint64)
    entries[::2] = ZERO_FLAG
    return write_mapped_image(path, l2_tables, entries)


def write_huge_header(path: Path, virtual_size: int) -> None:
    """A qcow2 image of 2 MiB clusters claiming ``virtual_size`` bytes with
    nothing mapped: its L1 table (up to QEMU's 32 MiB) is a hole of a
    sparse file, so the file takes a few clusters on disk."""
    bits = 21
    cluster = 1 << bits
    l1_entries = -(-virtual_size // (cluster * (cluster // 8)))
    l1_bytes = -(-l1_entries * 8 // cluster) * cluster
    reftable = cluster + l1_bytes
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, bits, virtual_size, 0, l1_entries, cluster,
        reftable, 1, 0, 0, 0, 0, 0, 4, 104,
    ) + b"\0" * 8
    with open(path, "wb") as f:
        f.write(header)
        f.seek(reftable)
        f.write((reftable + cluster).to_bytes(8, "big"))  # one refcount block, after the table
        f.truncate(reftable + 2 * cluster)
