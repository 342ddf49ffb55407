"""What the engine shows of a guest filesystem, in the shape tests.guesttree compares.

``engine_view`` walks a volume through engine/guest's public API only
(listing, entry, readlink, xattrs, data), exactly as the mount and the CLI
use it, and returns a tests.guesttree.View: the same comparison then
checks the engine against what was put in and against the kernel.
"""

from __future__ import annotations

import hashlib
import os
import stat

from engine.guest.volume import GuestPath, Volume
from tests.guesttree import Seen, View, masked

MiB = 1024 * 1024


class FileSource:
    """A disk image file as the engine's byte source (what a backup view is in the product)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


def _seen(volume: Volume, path: GuestPath, fstype: str) -> Seen:
    e = volume.entry(path)
    common = dict(mode=stat.S_IMODE(e.mode), uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns)
    if e.is_link:
        target = volume.readlink(path).decode("utf-8", "surrogateescape")
        return Seen("symlink", target=target, **common)  # type: ignore[arg-type]
    if stat.S_ISFIFO(e.mode):
        return Seen("fifo", **common)  # type: ignore[arg-type]
    if stat.S_ISCHR(e.mode):
        return Seen("chr", rdev=(os.major(e.rdev), os.minor(e.rdev)), **common)  # type: ignore[arg-type]
    xattrs = tuple(sorted((k.decode(), v) for k, v in volume.xattrs(path).items()))
    if e.is_dir:
        return Seen("dir", xattrs=xattrs, **common)  # type: ignore[arg-type]
    digest = hashlib.sha256()
    data = volume.data(path)
    pos = 0
    while pos < e.size:
        chunk = volume.read_data(data, pos, MiB)
        assert chunk, f"short read at {pos} of {e.size}"
        digest.update(chunk)
        pos += len(chunk)
    return Seen("file", size=e.size, sha256=digest.hexdigest(), xattrs=xattrs, **common)  # type: ignore[arg-type]


def engine_view(volume: Volume, fstype: str, skip: frozenset[str] = frozenset({"lost+found"})) -> View:
    """Every name under the volume's root as the engine shows it (top-level ``skip`` left out)."""
    entries: dict[str, Seen] = {}
    keys: dict[object, set[str]] = {}
    todo: list[GuestPath] = [()]
    while todo:
        path = todo.pop()
        for name, entry in volume.listing(path).items():
            child = path + (name,)
            rel = b"/".join(child).decode("utf-8", "surrogateescape")
            if not path and rel in skip:
                continue
            entries[rel] = masked(_seen(volume, child, fstype), fstype)
            if entry.is_dir:
                todo.append(child)
            elif entry.nlink > 1:
                keys.setdefault(entry.key, set()).add(rel)
    return View(entries, frozenset(frozenset(g) for g in keys.values() if len(g) > 1))
