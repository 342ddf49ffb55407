"""The volumes in a backup's bytes: partitions, LVM2 logical volumes, or a filesystem on the whole disk.

``find_volumes`` reads only the partition table, the LVM labels and
metadata, and each volume's first blocks (its signature): a filesystem
is parsed only when its directory is entered (``open_volume``). The
names are the spec's: ``p1`` ... as sgdisk and fdisk number partitions,
``disk`` for a filesystem on the whole device, ``lvm-<vg>-<lv>``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from dissect.volume.lvm import LVM2

from engine.errors import BackupfsError
from engine.guest import probe as kinds
from engine.guest.guestfs import GuestFS
from engine.guest.partitions import Partition, read_table
from engine.guest.reader import Budget, ByteSource, DiskReader, GuestDamaged
from engine.guest.volume import Volume
from engine.text import escape

log = logging.getLogger("backupfs.guest")

OK, UNSUPPORTED, ENCRYPTED, DAMAGED, EMPTY, CONTAINER = (
    "ok", "unsupported", "encrypted", "damaged", "empty", "container")
MAX_LVM_VOLUMES = 1024
MAX_LVM_NAME = 127  # LVM's own limit; a longer name (crafted metadata) is cut: the ~N suffix keeps it apart
SAFE_NAME = re.compile(r"[^A-Za-z0-9+_.-]")


@dataclass
class VolumeInfo:
    """One line of ``volumes``: a volume and whether it has a directory (state ok)."""

    name: str
    offset: int  # on the disk; for a logical volume, its first extent's
    size: int
    fstype: str = ""  # as shown: ext4, fat32, ...
    label: str = ""
    kind: str = ""  # the signature found (engine/guest/probe.py): which parser reads it
    state: str = OK
    reason: str = ""
    reader: DiskReader | None = field(default=None, repr=False)

    @property
    def readable(self) -> bool:
        return self.state == OK


def load_parsers() -> None:
    """Import every filesystem parser now (~0.3 s of compiling Dissect's structure
    definitions): the mount does it in the background at start, so the first
    look into a backup's files or changes does not pay it."""
    _adapters()


def _adapters() -> dict[str, Callable[[DiskReader], GuestFS]]:
    from engine.guest.fs_btrfs import BtrfsVolume
    from engine.guest.fs_ext import ExtVolume
    from engine.guest.fs_fat import ExfatVolume, FatVolume
    from engine.guest.fs_ntfs import NtfsVolume
    from engine.guest.fs_xfs import XfsVolume

    return {kinds.EXT: ExtVolume, kinds.XFS: XfsVolume, kinds.BTRFS: BtrfsVolume, kinds.FAT: FatVolume,
            kinds.EXFAT: ExfatVolume, kinds.NTFS: NtfsVolume}


class StreamSource:
    """A parser's stream (a logical volume's mapping) as a byte source, one reader at a time."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self.size = size
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._stream.seek(offset)
            return self._stream.read(length)


def _classify(info: VolumeInfo, kind: str | None) -> None:
    """Fill in what a volume holds from its signature."""
    if kind is None:
        info.state, info.reason = UNSUPPORTED, "no filesystem we know (unformatted, or an unknown type)"
    elif kind in kinds.ENCRYPTED:
        info.fstype, info.state, info.reason = kind, ENCRYPTED, f"encrypted ({kind}): open it in the guest"
    elif kind == kinds.SWAP:
        info.fstype, info.state, info.reason = kind, UNSUPPORTED, "swap space holds no files"
    elif kind == kinds.LVM2:
        info.fstype, info.state, info.reason = kind, CONTAINER, "an LVM2 physical volume (its logical volumes follow)"
    else:
        info.fstype = info.kind = kind


def find_volumes(source: ByteSource, budget: Budget) -> list[VolumeInfo]:
    """Every volume of the disk, readable or not, in the order ``volumes`` lists them."""
    disk = DiskReader(source, budget)
    with budget.spend("reading the partition table"):
        table = read_table(disk.pread, disk.size)
        if table is None:
            info = VolumeInfo("disk", 0, disk.size, reader=disk)
            _classify(info, kinds.probe(disk.pread))
            out = [info]
        else:
            out = [_partition(p, source, budget) for p in table.partitions]
        pvs = [v for v in out if v.fstype == kinds.LVM2 and v.reader is not None]
    if pvs:
        with budget.spend("reading LVM2 metadata"):
            out.extend(_logical_volumes(pvs, budget))
    return out


def _partition(p: Partition, source: ByteSource, budget: Budget) -> VolumeInfo:
    info = VolumeInfo(f"p{p.number}", p.offset, p.size)
    if p.extended:
        info.state, info.reason = CONTAINER, "an extended partition (its logical partitions follow)"
    elif p.problem:
        info.state, info.reason = (EMPTY if p.size <= 0 else DAMAGED), p.problem
    else:
        info.reader = DiskReader(source, budget, p.offset, p.size)
        _classify(info, kinds.probe(info.reader.pread))
    return info


def _logical_volumes(pvs: list[VolumeInfo], budget: Budget) -> list[VolumeInfo]:
    """The logical volumes of the volume groups on these physical volumes."""
    out: list[VolumeInfo] = []
    groups: dict[str, list[VolumeInfo]] = {}
    for pv in pvs:
        try:
            assert pv.reader is not None
            lvm = LVM2([pv.reader])
            groups.setdefault(lvm.vg.name, []).append(pv)
        except Exception as e:
            pv.state, pv.reason = DAMAGED, f"LVM2 label or metadata unreadable: {escape(str(e))[:120]}"
    for vg_name, members in groups.items():
        try:
            lvm = LVM2([m.reader for m in members])
            lvs = lvm.vg.lv[:MAX_LVM_VOLUMES]
        except Exception as e:
            for m in members:
                m.state, m.reason = DAMAGED, f"volume group {escape(vg_name)}: {escape(str(e))[:120]}"
            continue
        for lv in lvs:
            if not lv.is_visible:
                continue
            info = _logical_volume(vg_name, lv, budget)
            taken = {v.name for v in out}
            base, n = info.name, 2
            while info.name in taken:  # names LVM would not allow, made alike by `_`
                info.name = f"{base}~{n}"
                n += 1
            out.append(info)
    return out


def _lvm_part(name: str) -> str:
    """A VG or LV name in a volume's name, as device-mapper writes it: a `-`
    doubled (so vg `a-b` lv `c` and vg `a` lv `b-c` stay apart: lvm-a--b-c,
    lvm-a-b--c), and anything LVM itself would not allow as `_`."""
    return SAFE_NAME.sub("_", name[:MAX_LVM_NAME]).replace("-", "--")


def _logical_volume(vg_name: str, lv, budget: Budget) -> VolumeInfo:  # type: ignore[no-untyped-def]
    name = f"lvm-{_lvm_part(vg_name)}-{_lvm_part(lv.name)}"
    extent = lv.vg.extent_size * 512
    size = sum(s.extent_count for s in lv.segments) * extent
    info = VolumeInfo(name, 0, size)
    kinds_of = {s.type for s in lv.segments}
    if not kinds_of <= {"linear", "striped"}:
        info.state, info.reason = UNSUPPORTED, f"logical volume of type {escape(','.join(sorted(kinds_of)))}"
        return info
    try:
        stream = lv.open()
        first = lv.segments[0].stripes[0] if lv.segments else None
        if first is not None:
            pv = lv.vg.physical_volumes.get(first[0])
            dev = getattr(pv, "_dev", None) or getattr(pv, "dev", None)
            base = getattr(getattr(dev, "fh", None), "base", 0)
            info.offset = base + (pv.pe_start * 512 if pv is not None else 0) + first[1] * extent
    except Exception as e:
        info.state, info.reason = DAMAGED, f"logical volume unreadable: {escape(str(e))[:120]}"
        return info
    info.reader = DiskReader(StreamSource(stream, size), budget)
    _classify(info, kinds.probe(info.reader.pread))
    return info


def open_volume(info: VolumeInfo, budget: Budget) -> Volume:
    """Parse a volume's filesystem; GuestDamaged if it cannot be read."""
    if not info.readable or info.reader is None:
        raise GuestDamaged(f"{info.name}: {info.reason or 'not readable'}")
    adapter = _adapters().get(info.kind)
    if adapter is None:
        raise GuestDamaged(f"{info.name}: unsupported filesystem {info.kind}")
    with budget.spend(f"{info.name}: opening the {info.fstype} filesystem"):
        try:
            fs = adapter(info.reader)
        except BackupfsError:
            raise
        except RecursionError:
            raise GuestDamaged(f"{info.name}: damaged {info.fstype} filesystem (structures nest without end)") from None
        except Exception as e:
            raise GuestDamaged(f"{info.name}: damaged {info.fstype} filesystem "
                               f"({escape(type(e).__name__)}: {escape(str(e))[:200]})") from None
    return Volume(info.name, fs, budget)


def label_of(info: VolumeInfo, budget: Budget) -> None:
    """Fill in a readable volume's fstype detail and label by opening it; a
    volume that fails is marked damaged with its reason."""
    try:
        volume = open_volume(info, budget)
    except GuestDamaged as e:
        info.state, info.reason = DAMAGED, str(e).split(": ", 1)[-1]
        return
    info.fstype = volume.kind
    info.label = volume.fs.label
