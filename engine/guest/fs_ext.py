"""ext2/3/4 through dissect.extfs (its runlists bounded: engine/guest/ext_runs.py)."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable, Iterator

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


# The stat fields of an on-disk inode (struct ext4_inode), read with struct:
# decoding the whole inode with Dissect's cstruct took 60% of a listing
# (68 of 115 us an entry, profiled on 10,000 files); these fields alone are
# a twentieth of that. Dissect still reads directories, extents and xattrs.
_BASE = struct.Struct("<HHIIIIIHHII4x60s8xI4xHxxHH")  # mode uid size_lo atime ctime mtime dtime gid links
#                       blocks_lo flags (osd1) block (gen, acl_lo) size_high (faddr) blocks_high (acl_hi) uid_hi gid_hi
_EXTRA = struct.Struct("<H2xIII")  # i_extra_isize, (checksum_hi), ctime_extra, mtime_extra, atime_extra
_EXTRA_FIELD_END = {"ctime": 136, "mtime": 140, "atime": 144}


def _ns(seconds: int, extra: int | None) -> int:
    """An inode time in ns, as the kernel decodes it: signed 32-bit seconds, then the
    extra word's 2 epoch bits and 30 bits of nanoseconds when the inode has it."""
    secs = seconds - (1 << 32) if seconds & 0x80000000 else seconds
    if extra is None:
        return secs * 1_000_000_000
    return (secs + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


INCOMPAT_FILETYPE = 0x2
DIRENT = struct.Struct("<IHBB")  # inode, rec_len, name_len, file_type (ext2_dir_entry_2)
DIR_CHUNK = 1024 * 1024


def dir_records(raw: bytes, filetype: bool) -> Iterator[tuple[int, bytes]]:
    """(inode, name) of each live record in one directory block, as the kernel walks it:
    record by rec_len, a record with inode 0 (free space, an htree node, the checksum
    tail) skipped. A record whose rec_len cannot hold its header is damage: DirectoryEnd
    (a hole in a directory reads as such: zeros)."""
    pos, end = 0, len(raw) - 8
    while pos <= end:
        inode, rec_len, name_len, _ = DIRENT.unpack_from(raw, pos)
        if rec_len < 8:
            raise DirectoryEnd(pos)
        if not filetype:  # ext2_dir_entry: a 16-bit name length
            name_len |= raw[pos + 7] << 8
        if inode and 0 < name_len <= rec_len - 8:
            yield inode, raw[pos + 8 : pos + 8 + name_len]
        pos += rec_len


class DirectoryEnd(Exception):
    """A directory block that ends the listing (as dissect.extfs and the kernel stop there)."""


class _Inum:
    """Just an inode number, where ``_entry`` wants a parser's node."""

    __slots__ = ("inum",)

    def __init__(self, inum: int) -> None:
        self.inum = inum


class ExtVolume(GuestFS):
    kind = "ext4"

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.fs = BoundedExtFS(reader)
        sb = self.fs.sb
        self.label = bytes(sb.s_volume_name).split(b"\0")[0].decode("utf-8", "replace")
        features = sb.s_feature_incompat
        self.kind = "ext4" if features & 0x2C0 else ("ext3" if sb.s_feature_compat & 0x4 else "ext2")

    def _raw_inode(self, inum: int) -> bytes:
        """The on-disk bytes of inode ``inum`` (where Dissect's INode would read them)."""
        fs = self.fs
        if not 0 < inum <= fs.sb.s_inodes_count:
            raise ValueError(f"inode {inum} out of range")
        group, index = divmod(inum - 1, fs.sb.s_inodes_per_group)
        gd = fs._read_group_desc(group)
        table = (getattr(gd, "bg_inode_table_hi", 0) << 32) | gd.bg_inode_table_lo
        fs.fh.seek(table * fs.block_size + index * fs.sb.s_inode_size)
        raw = fs.fh.read(fs.sb.s_inode_size)
        if len(raw) < _BASE.size:
            raise ValueError(f"inode {inum} lies past the end of the volume")
        return raw

    def _entry(self, node) -> GuestEntry:  # type: ignore[no-untyped-def]
        raw = self._raw_inode(node.inum)
        (mode, uid, size_lo, atime, ctime, mtime, _dtime, gid, links, blocks, flags, i_block, size_high,
         blocks_high, uid_high, gid_high) = _BASE.unpack_from(raw)
        extra: dict[str, int | None] = {"ctime": None, "mtime": None, "atime": None}
        if len(raw) >= 128 + _EXTRA.size:
            extra_isize, ctime_x, mtime_x, atime_x = _EXTRA.unpack_from(raw, 128)
            for name, value in (("ctime", ctime_x), ("mtime", mtime_x), ("atime", atime_x)):
                if 128 + extra_isize >= _EXTRA_FIELD_END[name]:  # the kernel's EXT4_FITS_IN_INODE
                    extra[name] = value
        if self.fs.sb.s_feature_ro_compat & 0x8:  # HUGE_FILE: 48 bits, and maybe in filesystem blocks
            blocks |= blocks_high << 32
            if flags & 0x40000:  # EXT4_HUGE_FILE_FL: counted in blocks, not 512-byte sectors
                blocks *= self.fs.block_size // 512
        rdev = _device_number(i_block) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        return GuestEntry(
            key=node.inum, mode=mode, size=size_lo | (size_high << 32), nlink=links,
            uid=uid | (uid_high << 16), gid=gid | (gid_high << 16),
            atime_ns=_ns(atime, extra["atime"]), mtime_ns=_ns(mtime, extra["mtime"]),
            ctime_ns=_ns(ctime, extra["ctime"]), rdev=rdev, blocks=blocks,
        )

    def _node(self, entry: GuestEntry):  # type: ignore[no-untyped-def]
        """The parser's inode for an entry, read again: an entry keeps only its number,
        since the parsed inode and directory entry weigh ~4 KiB and a volume caches
        up to 200,000 entries (engine/guest/volume.py CACHED_ENTRIES)."""
        return self.fs.get_inode(entry.key)

    def root(self) -> GuestEntry:
        return self._entry(self.fs.root)

    def children(self, entry: GuestEntry) -> Iterable[tuple[bytes, GuestEntry]]:
        node = self._node(entry)
        if not stat.S_ISDIR(entry.mode):
            raise NotADirectoryError(f"inode {entry.key} is not a directory")
        stream = node.open()
        block = self.fs.block_size
        filetype = bool(self.fs.sb.s_feature_incompat & INCOMPAT_FILETYPE)
        last = self.fs.sb.s_inodes_count
        try:
            for pos in range(0, entry.size, DIR_CHUNK):  # records never cross a block
                stream.seek(pos)
                chunk = stream.read(min(DIR_CHUNK, entry.size - pos))
                for at in range(0, len(chunk), block):
                    for inum, name in dir_records(chunk[at : at + block], filetype):
                        if name in (b".", b"..") or not 0 < inum <= last:
                            continue
                        yield name, self._entry_of(inum)
        except DirectoryEnd:
            return

    def _entry_of(self, inum: int) -> GuestEntry:
        return self._entry(_Inum(inum))

    def readlink(self, entry: GuestEntry) -> bytes:
        check_link_size(entry.size, "ext symlink")  # before reading it
        return check_link(os.fsencode(self._node(entry).link), "ext symlink")

    def xattrs(self, entry: GuestEntry) -> dict[bytes, bytes]:
        return user_xattrs((x.name, x.value) for x in self._node(entry).xattr)

    def data(self, entry: GuestEntry) -> FileData:
        node = self._node(entry)
        if node.inode.i_flags & c_ext.EXT4_INLINE_DATA_FL:
            return FileData(entry.size, stream=node.open())
        runs = block_runs(node.dataruns(), self.fs.block_size, entry.size)
        return FileData(entry.size, runs=runs, reader=self.reader)
