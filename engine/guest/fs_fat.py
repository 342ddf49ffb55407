"""FAT12/16/32 and exFAT through dissect.fat.

FAT keeps no owners, modes or inode numbers: files show 0644 and
directories 0755, owned by 0:0 (as a kernel mount with its defaults),
and each entry gets a number of its own. Times are FAT's local times,
read as UTC (FAT does not record the zone; exFAT does, and is honoured).
Cluster chains are followed at most as many steps as the filesystem has
clusters: a chain that loops is damage, not a very long file.
"""

from __future__ import annotations

import calendar
import itertools
import stat
from collections.abc import Iterable, Iterator

from dissect.fat import exfat as dissect_exfat
from dissect.fat import fat as dissect_fat

from engine.guest.guestfs import FileData, GuestEntry, GuestFS, block_runs
from engine.guest.reader import DiskReader, GuestDamaged

DIR_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o644


def _dos_ns(stamp: int, centiseconds: int = 0, zone: int = 0) -> int:
    """A DOS date/time (date in the high half) as ns since the epoch; 0 if unset."""
    date, time = stamp >> 16, stamp & 0xFFFF
    if not date:
        return 0
    year, month, day = 1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F
    hour, minute, sec2 = time >> 11, (time >> 5) & 0x3F, time & 0x1F
    try:
        secs = calendar.timegm((year, max(month, 1), max(day, 1), hour, minute, sec2 * 2, 0, 0, 0))
    except (ValueError, OverflowError):
        return 0
    if zone & 0x80:  # exFAT: a UTC offset in 15-minute steps is recorded
        offset = zone & 0x7F
        if offset & 0x40:
            offset -= 0x80
        secs -= offset * 15 * 60
    return secs * 1_000_000_000 + centiseconds * 10_000_000


def _shown_name(d: dissect_fat.DirectoryEntry) -> str:  # type: ignore[name-defined]
    """The name as Linux shows it: the long name, or the 8.3 name with the
    lower-case marks Windows NT (and mtools) set for its base and extension."""
    if d.ldirents or "." in (d.name or "") and d.name != d.short_name:
        return d.name
    base, dot, ext = d.short_name.partition(".")
    flags = d.dirent.DIR_NTRes
    if flags & 0x08:
        base = base.lower()
    if flags & 0x10:
        ext = ext.lower()
    return base + dot + ext


class BoundedFAT(dissect_fat.FAT):
    """dissect.fat's table with chains cut at the table's own size."""

    def chain(self, cluster: int) -> Iterator[int]:
        for steps, found in enumerate(super().chain(cluster)):
            if steps > self.entry_count:
                raise GuestDamaged(f"FAT cluster chain from {cluster} loops")
            yield found


class FatVolume(GuestFS):
    kind = "vfat"

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.fs = dissect_fat.FATFS(reader)
        self.fs.fat.__class__ = BoundedFAT
        self.kind = {12: "fat12", 16: "fat16", 32: "fat32"}.get(self.fs.fat.bits_per_entry, "vfat")
        self.label = self.fs.volume_label if self.fs.volume_label != "NO NAME" else ""
        self._keys = itertools.count(1)
        self._root_key = next(self._keys)
        self._data_base = self.fs.first_data_sector * self.fs.sector_size

    def _entry(self, d: dissect_fat.DirectoryEntry) -> GuestEntry:  # type: ignore[name-defined]
        is_dir = d.is_directory()
        ent = d.dirent
        mtime = _dos_ns((ent.DIR_WrtDate << 16) | ent.DIR_WrtTime)
        return GuestEntry(
            key=next(self._keys), mode=DIR_MODE if is_dir else FILE_MODE,
            size=0 if is_dir else d.size, nlink=2 if is_dir else 1,
            atime_ns=_dos_ns(ent.DIR_LstAccDate << 16), mtime_ns=mtime, ctime_ns=mtime, ref=d,
        )

    def root(self) -> GuestEntry:
        return GuestEntry(key=self._root_key, mode=DIR_MODE, nlink=2, ref=self.fs.root)

    def children(self, entry: GuestEntry) -> Iterable[tuple[str, GuestEntry]]:
        for d in entry.ref.iterdir():
            if d.is_volume_id() or d.name in (".", ".."):
                continue
            yield _shown_name(d), self._entry(d)

    def readlink(self, entry: GuestEntry) -> bytes:
        raise GuestDamaged("FAT has no symlinks")

    def data(self, entry: GuestEntry) -> FileData:
        runs = [(None if start is None else start, count) for start, count in entry.ref.dataruns()]
        byte_runs = block_runs(runs, self.fs.cluster_size, entry.size)
        byte_runs = [(None if at is None else self._data_base + at, n) for at, n in byte_runs]
        return FileData(entry.size, runs=byte_runs, reader=self.reader)


class BoundedExFAT(dissect_exfat.ExFAT):
    """dissect.fat's exFAT with cluster chains cut at the cluster count."""

    def get_cluster_chain(self, starting_cluster: int) -> list[int]:
        chain: list[int] = []
        cluster = starting_cluster
        if cluster < 2:
            return chain
        while cluster != dissect_exfat.EOC:
            if len(chain) > self.cluster_count + 2 or cluster > self.cluster_count + 1:
                raise GuestDamaged(f"exFAT cluster chain from {starting_cluster} loops or leaves the volume")
            chain.append(cluster)
            self.fat.seek(cluster * dissect_exfat.FAT_ENTRY_SIZE)
            cluster = int.from_bytes(self.fat.read(dissect_exfat.FAT_ENTRY_SIZE), "little")
        return chain


class ExfatVolume(GuestFS):
    """exFAT: dissect.fat reads the whole tree when it opens the volume
    (under the opening's work budget)."""

    kind = "exfat"

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.fs = BoundedExFAT(reader)
        self.label = self.fs.volume_label or ""
        self._keys = itertools.count(1)
        files = self.fs.files
        if len(files) == 1 and "/" in files:  # dissect.fat keeps the root as an entry named "/"
            files = files["/"][1]
        self._root = GuestEntry(key=next(self._keys), mode=DIR_MODE, nlink=2, ref=(None, files))

    def _entry(self, file_, subdir) -> GuestEntry:  # type: ignore[no-untyped-def]
        meta = file_.metadata
        is_dir = bool(meta.attributes.directory)
        return GuestEntry(
            key=next(self._keys), mode=DIR_MODE if is_dir else FILE_MODE,
            size=0 if is_dir else file_.stream.data_length, nlink=2 if is_dir else 1,
            atime_ns=_dos_ns(meta.access_time, 0, meta.access_timezone),
            mtime_ns=_dos_ns(meta.modified_time, meta.modified_offset, meta.modified_timezone),
            ctime_ns=_dos_ns(meta.create_time, meta.create_offset, meta.create_timezone),
            ref=(file_, subdir),
        )

    def root(self) -> GuestEntry:
        return self._root

    def children(self, entry: GuestEntry) -> Iterable[tuple[str, GuestEntry]]:
        for name, (file_, subdir) in (entry.ref[1] or {}).items():
            yield name.rstrip("/"), self._entry(file_, subdir)

    def readlink(self, entry: GuestEntry) -> bytes:
        raise GuestDamaged("exFAT has no symlinks")

    def data(self, entry: GuestEntry) -> FileData:
        file_ = entry.ref[0]
        stream = file_.stream
        runs = self.fs.runlist(stream.location, bool(stream.flags.not_fragmented), entry.size or None)
        byte_runs = block_runs(runs, self.fs.sector_size, entry.size)
        return FileData(entry.size, runs=byte_runs, reader=self.reader)
