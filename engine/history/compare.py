"""One path in two backups: what changed, if anything.

``A`` added, ``D`` deleted, ``M`` content changed (a file's bytes, a
symlink's target), ``m`` metadata only (mode, owner, group, modification
time, ``user.*`` xattrs). Access and change times are not compared: the
guest's kernel moves them on every read and every change, so they would
mark everything. A path whose type changed is a ``D`` and an ``A``.

A regular file's content is compared where it can have changed: where its
runs (in either backup) touch the disk ranges that changed between the
two (engine/history/blocks.py), or wholly when its data is read through
the parser (compressed, inline) and its size, times or inode moved.
Same size and same mtime is not "same content": bytes written back with
the old time restored are still found.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from engine.guest.guestfs import FileData, GuestEntry
from engine.guest.volume import GuestPath, Volume, show_path
from engine.history.blocks import Ranges, overlaps

PIECE = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True, order=True)
class Change:
    volume: str
    path: bytes  # within the volume, no leading slash
    op: str  # A, D, M or m


def _kind(mode: int) -> int:
    return stat.S_IFMT(mode)


def metadata_differs(old: Volume, new: Volume, path: GuestPath, a: GuestEntry, b: GuestEntry) -> bool:
    if (stat.S_IMODE(a.mode), a.uid, a.gid, a.mtime_ns) != (stat.S_IMODE(b.mode), b.uid, b.gid, b.mtime_ns):
        return True
    if a.is_link:
        return False  # a symlink's own xattrs are not shown
    return _at(old, path, old.fs.xattrs, a) != _at(new, path, new.fs.xattrs, b)


def _at(volume: Volume, path: GuestPath, fn: Callable[[GuestEntry], T], entry: GuestEntry) -> T:
    """``fn`` of the entry already in hand (no second lookup of ``path``: on ext, a lookup
    lists the whole parent directory), under the volume's lock and budget."""
    return volume.run(show_path(path), fn, entry)


def content_differs(old: Volume, new: Volume, path: GuestPath, a: GuestEntry, b: GuestEntry,
                    changed: Ranges) -> bool:
    """Do the bytes differ? (Both are the same type.)"""
    if a.is_link:
        return _at(old, path, old.fs.readlink, a) != _at(new, path, new.fs.readlink, b)
    if not a.is_file:
        return a.rdev != b.rdev
    if a.size != b.size:
        return True
    if a.size == 0:
        return False
    da, db = _at(old, path, old.fs.data, a), _at(new, path, new.fs.data, b)
    spans = _spans_to_compare(da, db, a, b, changed)
    for start, end in spans:
        pos = start
        while pos < end:
            n = min(PIECE, end - pos)
            if old.read_data(da, pos, n) != new.read_data(db, pos, n):
                return True
            pos += n
    return False


def _spans_to_compare(da: FileData, db: FileData, a: GuestEntry, b: GuestEntry,
                      changed: Ranges) -> list[tuple[int, int]]:
    """The file's byte ranges that may differ."""
    ra, rb = da.byte_runs(), db.byte_runs()
    if ra is None or rb is None:
        unmoved = a.key == b.key and (a.mtime_ns, a.ctime_ns) == (b.mtime_ns, b.ctime_ns)
        return [] if unmoved and not changed else [(0, a.size)]
    spans = []
    for runs in (ra, rb):
        pos = 0
        for where, length in runs:
            if where is not None and overlaps(changed, where, where + length):
                spans.append((pos, min(pos + length, a.size)))
            pos += length
    # Where the two map the same logical range to different places, compare it too.
    spans.extend(_moved(ra, rb, a.size))
    return _merged(spans)


def _moved(ra: list[tuple[int | None, int]], rb: list[tuple[int | None, int]], size: int) -> list[tuple[int, int]]:
    """Logical ranges that the two versions map differently."""
    def cuts(runs: list[tuple[int | None, int]]) -> list[tuple[int, int, int | None]]:
        out, pos = [], 0
        for where, length in runs:
            out.append((pos, pos + length, where))
            pos += length
        return out

    out = []
    a, b = cuts(ra), cuts(rb)
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if s < e:
            wa = None if a[i][2] is None else a[i][2] + (s - a[i][0])
            wb = None if b[j][2] is None else b[j][2] + (s - b[j][0])
            if wa != wb:
                out.append((s, min(e, size)))
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(x for x in spans if x[0] < x[1]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def compare(volume: str, old: Volume, new: Volume, path: GuestPath, a: GuestEntry, b: GuestEntry,
            changed: Ranges) -> list[Change]:
    """The change lines for one path present in both backups."""
    where = b"/".join(path)
    if _kind(a.mode) != _kind(b.mode):
        return [Change(volume, where, "D"), Change(volume, where, "A")]
    if content_differs(old, new, path, a, b, changed):
        return [Change(volume, where, "M")]
    if metadata_differs(old, new, path, a, b):
        return [Change(volume, where, "m")]
    return []
