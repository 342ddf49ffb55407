"""One shape for every guest filesystem: entries with the guest's attributes, listings, data.

Each filesystem module (fs_ext, fs_xfs, fs_btrfs, fs_fat, fs_ntfs) adapts
its Dissect parser to ``GuestFS``; the volume (engine/guest/volume.py)
adds the lock, the work budget and the error translation around it, so
the adapters stay plain.

Names are bytes, as the guest stored them (Dissect decodes them with
``surrogateescape``; ``os.fsencode`` gives the bytes back). A name that
cannot be a file name on the host (empty, `.`, `..`, holding `/` or NUL)
is left out of a listing and logged: a crafted directory cannot make a
path escape its parent.
"""

from __future__ import annotations

import logging
import os
import stat
from bisect import bisect_right
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from engine.guest.reader import DiskReader, GuestDamaged

log = logging.getLogger("backupfs.guest")

MAX_DIR_ENTRIES = 1_000_000  # entries one directory may list (a real one: tens of thousands)
MAX_LINK = 4096  # PATH_MAX: a symlink target longer than this is crafted
MAX_XATTRS = 1024
MAX_XATTR_BYTES = 64 * 1024  # the kernel's XATTR_SIZE_MAX


@dataclass(slots=True)
class GuestEntry:
    """A file, directory, link or node of the guest, as stat shows it.

    ``key`` identifies the inode within its volume (hard links share it);
    ``ref`` is the parser's own object for it, or what finds it again.
    Slotted: a volume keeps up to CACHED_ENTRIES of them in its listings
    (engine/guest/volume.py), and a dict per entry would double that.
    """

    key: Hashable
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    blocks: int = 0  # 512-byte units the guest allocated
    ref: Any = field(default=None, repr=False, compare=False)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


Runs = list[tuple[int | None, int]]  # (byte offset in the volume or None for a hole, length)


class FileData:
    """A regular file's bytes: by its runs straight from the volume (no
    parser, no lock: reads of one file run in parallel), or through the
    parser's stream (inline, compressed or resident data) under the
    volume's lock."""

    def __init__(self, size: int, runs: Runs | None = None, stream: BinaryIO | None = None,
                 reader: DiskReader | None = None) -> None:
        self.size = size
        self._runs = runs
        self._stream = stream
        self._reader = reader
        self._starts: list[int] = []
        pos = 0
        for _, length in runs or []:
            self._starts.append(pos)
            pos += length

    @property
    def direct(self) -> bool:
        return self._runs is not None

    def data_spans(self) -> list[tuple[int, int]]:
        """The (start, end) ranges of the file that may hold data, in order: all of it
        unless its runs are known, then only those that are not holes. What a copy
        reads: a sparse file of a terabyte with a few blocks costs those blocks."""
        if self._runs is None:
            return [(0, self.size)] if self.size else []
        out: list[tuple[int, int]] = []
        for start, (where, length) in zip(self._starts, self._runs):
            end = min(start + length, self.size)
            if where is None or start >= end:
                continue
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    def byte_runs(self) -> Runs | None:
        """Where the file's bytes lie in its volume (offsets from the volume's
        start, None for a hole), in order; None when read through the parser."""
        return None if self._runs is None else list(self._runs)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the file, short at its end."""
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        if self._runs is None:
            assert self._stream is not None
            self._stream.seek(offset)
            return self._stream.read(end - offset)
        return self._read_runs(offset, end)

    def _read_runs(self, offset: int, end: int) -> bytes:
        assert self._runs is not None and self._reader is not None
        out = []
        i = max(0, bisect_right(self._starts, offset) - 1)
        pos = offset
        while pos < end and i < len(self._runs):
            where, length = self._runs[i]
            start = self._starts[i]
            take = min(end, start + length) - pos
            if take > 0:
                if where is None:
                    out.append(bytes(take))
                else:
                    piece = self._reader.pread(where + pos - start, take)
                    out.append(piece + bytes(take - len(piece)))  # past the volume's end: zeros
                pos += take
            i += 1
        if pos < end:  # the runs end before the size: the rest is a hole
            out.append(bytes(end - pos))
        return b"".join(out)


def block_runs(runs: Iterable[tuple[int | None, int]], block_size: int, size: int) -> Runs:
    """A parser's runlist in blocks as byte runs covering at least ``size``."""
    out: Runs = []
    covered = 0
    for block, count in runs:
        if covered >= size:
            break
        if count <= 0:
            continue
        out.append((None if block is None else block * block_size, count * block_size))
        covered += count * block_size
    return out


def name_bytes(name: str | bytes) -> bytes | None:
    """A guest's name as host bytes, or None if it cannot be a file name here."""
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw or len(raw) > 255 * 4:
        return None
    return raw


class GuestFS:
    """What each filesystem adapter provides. The volume calls these under
    its lock and the request's budget; they may raise anything, which the
    volume turns into GuestDamaged."""

    kind = ""
    label = ""

    def root(self) -> GuestEntry:
        raise NotImplementedError

    def children(self, entry: GuestEntry) -> Iterable[tuple[str | bytes, GuestEntry]]:
        """The entries of a directory; `.` and `..` may be among them (left out later)."""
        raise NotImplementedError

    def readlink(self, entry: GuestEntry) -> bytes:
        raise NotImplementedError

    def xattrs(self, entry: GuestEntry) -> dict[bytes, bytes]:
        return {}

    def data(self, entry: GuestEntry) -> FileData:
        raise NotImplementedError


def check_link_size(size: int, what: str) -> None:
    """Refuse a symlink whose recorded size no real target has, before
    anything of that size is read or made (the guest sets i_size: 2^40)."""
    if size > MAX_LINK or size < 0:
        raise GuestDamaged(f"{what}: a symlink target of {size} bytes")


def check_link(target: bytes, what: str) -> bytes:
    check_link_size(len(target), what)
    return target


def user_xattrs(pairs: Iterable[tuple[str, bytes]]) -> dict[bytes, bytes]:
    """The ``user.*`` attributes of a guest file, bounded: the others
    (security.*, trusted.*, system.*) mean something only to the guest's kernel."""
    out: dict[bytes, bytes] = {}
    for n, (name, value) in enumerate(pairs):
        if n >= MAX_XATTRS:
            break
        if name.startswith("user.") and len(value) <= MAX_XATTR_BYTES:
            out[os.fsencode(name)] = bytes(value)
    return out
