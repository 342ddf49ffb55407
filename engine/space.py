"""How much room a backup may take, and how much the repository's disk has.

A full backup that cannot fit used to copy for minutes and then fail with
ENOSPC; and a failure said only "disk full", not by how much. The bound
here is an upper bound of what one backup writes into the repository: its
copy clusters whole (the aligned-copy rule), every table the qcow2 writer
(engine/qcow2/writer.py) appends for them, its header cluster, and its
checksum record. Nothing here writes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from engine.units import format_size

_REFCOUNT_BITS = 16  # the writer's refcount width (QEMU's default)
_MAX_EXTENTS = 100_000  # data extents asked of SEEK_DATA before giving up and counting the rest as data


def image_bound(copy_units: int, unit: int, cluster_size: int, size: int, granularity: int) -> int:
    """Bytes a backup of ``copy_units`` copy clusters of ``unit`` bytes may
    write: data, L2 tables, L1 table, refcounts, header, checksum record."""
    cs = cluster_size
    clusters_in_disk = -(-size // cs)
    data_clusters = min(copy_units * (unit // cs), clusters_in_disk)
    l2_entries = cs // 8
    l1_entries = -(-clusters_in_disk // l2_entries)
    l2_tables = min(l1_entries, data_clusters)
    l1_clusters = -(-l1_entries * 8 // cs)
    used = 1 + data_clusters + l2_tables + l1_clusters  # 1: the header
    per_block = cs * 8 // _REFCOUNT_BITS
    blocks = -(-used // per_block) + 1  # +1: the blocks and table count themselves
    table = -(-blocks * 8 // cs) + 1
    image = (used + blocks + table) * cs
    granules = -(-size // granularity)
    stored_granules = min(granules, -(-data_clusters * cs // granularity))
    checksums = 4096 + 8 * stored_granules + granules // 8  # head, one value a stored granule, a bit each
    return image + checksums


def data_runs(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges of a source that may hold data, as the file system tells
    (SEEK_DATA/SEEK_HOLE): holes of a sparse file are left out; a block
    device, or a file system that cannot tell, is data throughout."""
    pos = 0
    asked = 0
    while pos < size:
        if asked >= _MAX_EXTENTS:
            yield pos, size
            return
        asked += 1
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # a hole up to the end
            yield pos, size
            return
        if data >= size:
            return
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        yield data, hole
        pos = hole


def free_bytes(path: str) -> int | None:
    """Bytes an unprivileged writer may still use on the disk holding ``path`` (None: cannot tell)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def room_text(needed: int, free: int | None, subject: str = "it needs", when: str = "") -> str:
    """'it needs up to 32 MiB (33554432 bytes) and 11.9 MiB (12480512 bytes) were free': both numbers, exact too."""
    have = "an unknown amount was" if free is None else f"{format_size(free)} ({free} bytes) were"
    return f"{subject} up to {format_size(needed)} ({needed} bytes) and {have} free{when}"
