"""ext2/3/4 through dissect.extfs (its runlists bounded: engine/guest/ext_runs.py)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from dissect.extfs.c_ext import c_ext

from engine.guest.ext_runs import BoundedExtFS
from engine.guest.guestfs import FileData, GuestEntry, GuestFS, block_runs, check_link, check_link_size, user_xattrs
from engine.guest.reader import DiskReader


def _device_number(raw: bytes) -> int:
    """A device node's number from i_block, as the kernel stores it (old or new encoding)."""
    old = int.from_bytes(raw[0:4], "little")
    if old:
        return os.makedev((old >> 8) & 0xFF, old & 0xFF)
    new = int.from_bytes(raw[4:8], "little")
    return os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))


class ExtVolume(GuestFS):
    kind = "ext4"

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.fs = BoundedExtFS(reader)
        sb = self.fs.sb
        self.label = bytes(sb.s_volume_name).split(b"\0")[0].decode("utf-8", "replace")
        features = sb.s_feature_incompat
        self.kind = "ext4" if features & 0x2C0 else ("ext3" if sb.s_feature_compat & 0x4 else "ext2")

    def _entry(self, node) -> GuestEntry:  # type: ignore[no-untyped-def]
        i = node.inode
        blocks = i.i_blocks_lo | (i.i_blocks_high << 32)
        if not self.fs.sb.s_feature_ro_compat & 0x8 or not i.i_flags & 0x40000:  # HUGE_FILE
            blocks = blocks  # in 512-byte units already
        mode = i.i_mode
        rdev = _device_number(bytes(i.i_block)) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        return GuestEntry(
            key=node.inum, mode=mode, size=node.size, nlink=i.i_links_count,
            uid=i.i_uid | (i.i_uid_high << 16), gid=i.i_gid | (i.i_gid_high << 16),
            atime_ns=node.atime_ns, mtime_ns=node.mtime_ns, ctime_ns=node.ctime_ns,
            rdev=rdev, blocks=blocks, ref=node,
        )

    def root(self) -> GuestEntry:
        return self._entry(self.fs.root)

    def children(self, entry: GuestEntry) -> Iterable[tuple[str, GuestEntry]]:
        for node in entry.ref.iterdir():
            if node.filename in (".", ".."):
                continue
            yield node.filename, self._entry(node)

    def readlink(self, entry: GuestEntry) -> bytes:
        check_link_size(entry.size, "ext symlink")  # before reading it
        return check_link(os.fsencode(entry.ref.link), "ext symlink")

    def xattrs(self, entry: GuestEntry) -> dict[bytes, bytes]:
        return user_xattrs((x.name, x.value) for x in entry.ref.xattr)

    def data(self, entry: GuestEntry) -> FileData:
        node = entry.ref
        if node.inode.i_flags & c_ext.EXT4_INLINE_DATA_FL:
            return FileData(entry.size, stream=node.open())
        runs = block_runs(node.dataruns(), self.fs.block_size, entry.size)
        return FileData(entry.size, runs=runs, reader=self.reader)
