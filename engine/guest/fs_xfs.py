"""XFS through dissect.xfs; extended attributes through engine/guest/xfs_attrs.py (the parser does not read them)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from dissect.xfs import XFS
from dissect.xfs.c_xfs import c_xfs

from engine.guest.guestfs import FileData, GuestEntry, GuestFS, block_runs, check_link, check_link_size, user_xattrs
from engine.guest.reader import DiskReader
from engine.guest.xfs_attrs import user_attrs


class XfsVolume(GuestFS):
    kind = "xfs"

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.fs = XFS(reader)
        self.label = bytes(self.fs.sb.sb_fname).split(b"\0")[0].decode("utf-8", "replace")

    def _entry(self, node) -> GuestEntry:  # type: ignore[no-untyped-def]
        i = node.inode
        rdev = 0
        if i.di_format == c_xfs.xfs_dinode_fmt.XFS_DINODE_FMT_DEV:
            raw = int.from_bytes(bytes(node.datafork().read(4)), "big")
            rdev = os.makedev(raw >> 18, raw & 0x3FFFF)
        nlink = i.di_nlink if i.di_version > 1 else i.di_onlink
        return GuestEntry(
            key=node.inum, mode=i.di_mode, size=node.size, nlink=nlink, uid=i.di_uid, gid=i.di_gid,
            atime_ns=node.atime_ns, mtime_ns=node.mtime_ns, ctime_ns=node.ctime_ns, rdev=rdev,
            blocks=i.di_nblocks * (self.fs.block_size // 512), ref=node,
        )

    def root(self) -> GuestEntry:
        return self._entry(self.fs.root)

    def children(self, entry: GuestEntry) -> Iterable[tuple[str, GuestEntry]]:
        for node in entry.ref.iterdir():
            if node.filename in (".", ".."):
                continue
            yield node.filename, self._entry(node)

    def readlink(self, entry: GuestEntry) -> bytes:
        check_link_size(entry.size, "xfs symlink")
        return check_link(os.fsencode(entry.ref.link), "xfs symlink")

    def xattrs(self, entry: GuestEntry) -> dict[bytes, bytes]:
        return user_xattrs(user_attrs(entry.ref))

    def data(self, entry: GuestEntry) -> FileData:
        node = entry.ref
        if node.inode.di_format == c_xfs.xfs_dinode_fmt.XFS_DINODE_FMT_LOCAL:
            return FileData(entry.size, stream=node.open())
        runs = block_runs(node.dataruns, self.fs.block_size, entry.size)
        return FileData(entry.size, runs=runs, reader=self.reader)
