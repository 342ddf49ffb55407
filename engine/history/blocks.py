"""The disk ranges that may differ between two backups, from the images' own tables.

Two backups of a device read through chains that share their older
layers. Where both read the same layer's bytes (the same image file), they
agree; they can differ only where a layer that one chain has and the other
has not holds something of its own: data, compressed or zero clusters.
So the union of those layers' non-fall-through extents bounds every
change, and no data is read to find it. After a prune merged backups, the
layers are today's files: the rule still holds (a merge rewrites a child
to read as before).
"""

from __future__ import annotations

import os

import numpy as np

from engine.chain import ChainView
from engine.qcow2.layers import UNALLOC

Ranges = list[tuple[int, int]]  # (start, end) in bytes, sorted, merged


def _identity(path: str, fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def changed_ranges(old: ChainView, new: ChainView) -> Ranges:
    """Byte ranges of the disk where ``old`` and ``new`` may read differently.

    A size change counts as a change of everything past the smaller size.
    """
    old_ids = {_identity(layer.path, layer.fd) for layer in old.layers}
    new_ids = {_identity(layer.path, layer.fd) for layer in new.layers}
    pieces: list[np.ndarray] = []
    for layer in list(old.layers) + list(new.layers):
        ident = _identity(layer.path, layer.fd)
        if ident in old_ids and ident in new_ids:
            continue
        rows = np.asarray(layer.extents())
        if len(rows):
            held = rows[rows[:, 2] != UNALLOC]
            pieces.append(held[:, :2].astype(np.uint64))
    if old.size != new.size:
        lo, hi = sorted((old.size, new.size))
        pieces.append(np.array([[lo, hi]], dtype=np.uint64))
    return merge(np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.uint64))


def merge(rows: np.ndarray) -> Ranges:
    """(start, end) rows as sorted ranges, touching and overlapping ones joined."""
    if not len(rows):
        return []
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    out: Ranges = []
    start, end = int(rows[0, 0]), int(rows[0, 1])
    for s, e in rows[1:].tolist():
        if s <= end:
            end = max(end, e)
        else:
            out.append((start, end))
            start, end = s, e
    out.append((start, end))
    return out


def clip(ranges: Ranges, offset: int, size: int) -> Ranges:
    """The ranges inside [offset, offset+size), relative to ``offset`` (a volume's own)."""
    out = []
    for s, e in ranges:
        s2, e2 = max(s, offset), min(e, offset + size)
        if s2 < e2:
            out.append((s2 - offset, e2 - offset))
    return out


def overlaps(ranges: Ranges, start: int, end: int) -> bool:
    """Does any range touch [start, end)? (``ranges`` sorted: a bisection.)"""
    from bisect import bisect_right

    i = bisect_right(ranges, (start, 1 << 64)) - 1
    if i >= 0 and ranges[i][1] > start:
        return True
    return i + 1 < len(ranges) and ranges[i + 1][0] < end
