"""NTFS through dissect.ntfs.

NTFS keeps Windows security descriptors, not owners and modes: files show
0644 and directories 0755, owned by 0:0 (as a kernel mount with its
defaults). The MFT record number is the inode number, so hard links share
it; the DOS (8.3) twin of each name and the metadata files ($MFT, ...)
are left out, as the kernel's drivers do. A symlink shows the target its
reparse point holds, with `\\` turned into `/`.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable

from dissect.ntfs import NTFS
from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

from engine.guest.guestfs import MAX_LINK, FileData, GuestEntry, GuestFS, check_link, user_xattrs
from engine.guest.ntfs_xattrs import stream_xattrs
from engine.guest.reader import DiskReader, GuestDamaged

ROOT_RECORD = 5
FIRST_USER_RECORD = 24  # records below are the filesystem's own ($MFT, $Bitmap, ...)
DIR_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o644
LINK_MODE = stat.S_IFLNK | 0o777


INTERIX_LINK = b"IntxLNK\x01"
SYSTEM_ATTRIBUTE = 0x4


def _times(rec) -> list[int]:  # type: ignore[no-untyped-def]
    """(atime, mtime, ctime) in ns from $STANDARD_INFORMATION, zeros if it has none."""
    found = rec.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION]
    if not found:
        return [0, 0, 0]
    si = found[0].attribute
    return [si.last_access_time_ns, si.last_modification_time_ns, si.last_change_time_ns]


def _interix_link(rec) -> bytes | None:  # type: ignore[no-untyped-def]
    """The target of an Interix symlink (what ntfs-3g makes by default: a
    system file holding "IntxLNK\1" and the target in UTF-16), or None."""
    if rec.is_dir() or rec.is_reparse_point():
        return None
    found = rec.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION]
    if not found or not found[0].attribute.file_attributes & SYSTEM_ATTRIBUTE:
        return None
    size = rec.size()
    if size < len(INTERIX_LINK) or size > len(INTERIX_LINK) + 2 * MAX_LINK:
        return None
    raw = rec.open().read(size)
    if not raw.startswith(INTERIX_LINK):
        return None
    return check_link(raw[len(INTERIX_LINK):].decode("utf-16-le", "replace").encode("utf-8", "surrogateescape"),
                      "NTFS Interix symlink")


class NtfsVolume(GuestFS):
    kind = "ntfs"

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.fs = NTFS(reader)
        self.label = self.fs.volume_name or ""

    def _entry(self, rec) -> GuestEntry:  # type: ignore[no-untyped-def]
        interix = _interix_link(rec)
        if interix is not None:
            times = _times(rec)
            return GuestEntry(key=rec.segment, mode=LINK_MODE, size=len(interix), nlink=max(1, rec.header.ReferenceCount),
                              atime_ns=times[0], mtime_ns=times[1], ctime_ns=times[2], ref=rec)
        if rec.is_symlink():
            mode = LINK_MODE
        elif rec.is_dir():
            mode = DIR_MODE
        else:
            mode = FILE_MODE
        times = _times(rec)
        size = 0
        if stat.S_ISREG(mode):
            size = rec.size()
        elif stat.S_ISLNK(mode):
            size = len(self._target(rec))
        return GuestEntry(
            key=rec.segment, mode=mode, size=size, nlink=max(1, rec.header.ReferenceCount),
            atime_ns=times[0], mtime_ns=times[1], ctime_ns=times[2], blocks=(size + 511) // 512, ref=rec,
        )

    @staticmethod
    def _target(rec) -> bytes:  # type: ignore[no-untyped-def]
        name = rec.reparse_point_substitute_name or rec.reparse_point_name or ""
        if name.startswith("\\??\\"):
            name = name[4:]
        return check_link(name.replace("\\", "/").encode("utf-8", "surrogateescape"), "NTFS reparse point")

    def root(self) -> GuestEntry:
        return self._entry(self.fs.mft.root)

    def children(self, entry: GuestEntry) -> Iterable[tuple[str, GuestEntry]]:
        parent = entry.ref
        for index_entry in parent.iterdir(ignore_dos=True):
            name = index_entry.attribute.file_name
            if name in (".", ".."):
                continue
            rec = index_entry.dereference()
            if rec.segment < FIRST_USER_RECORD and rec.segment != ROOT_RECORD:
                continue
            if rec.segment == ROOT_RECORD:
                continue  # the root's own entry in itself
            yield name, self._entry(rec)

    def readlink(self, entry: GuestEntry) -> bytes:
        interix = _interix_link(entry.ref)
        if interix is not None:
            return interix
        if not entry.ref.is_symlink():
            raise GuestDamaged("not a symlink")
        return self._target(entry.ref)

    def xattrs(self, entry: GuestEntry) -> dict[bytes, bytes]:
        return user_xattrs(stream_xattrs(entry.ref))

    def data(self, entry: GuestEntry) -> FileData:
        return FileData(entry.size, stream=entry.ref.open())
