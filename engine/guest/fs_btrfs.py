"""Btrfs through dissect.btrfs: the default subvolume; other subvolumes
appear where the tree holds them, as directories (as a kernel mount shows them)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from dissect.btrfs import Btrfs

from engine.guest.guestfs import FileData, GuestEntry, GuestFS, check_link, check_link_size, user_xattrs
from engine.guest.reader import DiskReader


class BtrfsVolume(GuestFS):
    kind = "btrfs"

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.fs = Btrfs(reader)
        self.label = self.fs.label

    def _entry(self, node) -> GuestEntry:  # type: ignore[no-untyped-def]
        i = node.inode
        return GuestEntry(
            key=(node.subvolume.objectid, node.inum), mode=i.mode, size=i.size, nlink=i.nlink,
            uid=i.uid, gid=i.gid, atime_ns=node.atime_ns, mtime_ns=node.mtime_ns, ctime_ns=node.ctime_ns,
            rdev=os.makedev((i.rdev >> 20) & 0xFFF, i.rdev & 0xFFFFF) if i.rdev else 0,
            blocks=i.nbytes // 512, ref=node,
        )

    def root(self) -> GuestEntry:
        return self._entry(self.fs.root)

    def children(self, entry: GuestEntry) -> Iterable[tuple[str, GuestEntry]]:
        for name, node in entry.ref.iterdir():
            if name in (".", ".."):
                continue
            yield name, self._entry(node)

    def readlink(self, entry: GuestEntry) -> bytes:
        check_link_size(entry.size, "btrfs symlink")
        return check_link(os.fsencode(entry.ref.link), "btrfs symlink")

    def xattrs(self, entry: GuestEntry) -> dict[bytes, bytes]:
        getter = getattr(entry.ref, "xattrs", None)
        if getter is None:
            return {}
        found = getter() if callable(getter) else getter
        return user_xattrs(found.items() if isinstance(found, dict) else found)

    def data(self, entry: GuestEntry) -> FileData:
        # Extents may be compressed or inline: through the parser's stream.
        return FileData(entry.size, stream=entry.ref.open())
