"""Whole guest disks made by the real tools, and the volumes a reader should find on them.

Each layout function writes one sparse disk image into a directory and
returns it with the volumes it holds, named as SPEC §8 names them (``p1``,
``p5``, ``disk``, ``lvm-<vg>-<lv>``), with byte offsets computed here from the
layout (not read back from the tools, so the tests can check the tools'
tables against them). Filesystems are made as separate images
(tests.guestfs) and copied in, holes kept as holes.

LVM2 without device-mapper (this kernel has none, so lvcreate fails): a loop
device over the PV's bytes gets pvcreate and vgcreate; the logical volumes
are written into the metadata with vgcfgrestore from an edited vgcfgbackup
file; their filesystems are copied to pe_start + extent * extent_size.
LVM runs with its own configuration in a temporary directory and only ever
sees the one loop device, so the host's LVM state is untouched.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tests.guestfs import base_fstype, kernel_view, loop_device, make_fs, run, sparse_image, written_label
from tests.guesttree import MiB, TreeSpec, View, default_tree

SECTOR = 512

# The type LVM2 physical volumes are given here (blkid's name for them): a
# volume that holds a volume group, not a filesystem with a directory.
LVM2_PV = "LVM2_member"


@dataclass(frozen=True)
class Volume:
    """One volume a reader of the disk should list.

    ``offset`` and ``size`` in bytes from the disk's start. ``fstype``: the
    filesystem on it (ext4, xfs, vfat, ...), LVM2_PV for a physical volume,
    None for nothing at all. ``tree``: what was put into the filesystem
    (compare with tests.guesttree.expected_view(tree, fstype)). A logical
    volume's ``segments`` are its (disk offset, length) pieces in the order
    the LV reads them; ``offset`` is the first one's.
    """

    name: str
    offset: int
    size: int
    fstype: str | None
    label: str | None = None
    tree: TreeSpec | None = None
    segments: tuple[tuple[int, int], ...] = ()


class Disk(NamedTuple):
    """A disk image a layout function made, and the volumes a reader should find on it, in table order."""

    image: Path
    volumes: list[Volume]


@dataclass(frozen=True)
class Part:
    """A partition to make: its size, and the filesystem builder to fill it with (None: left empty)."""

    size: int
    fstype: str | None = None
    label: str | None = None


def place(source: Path, disk: Path, offset: int, source_offset: int = 0, length: int | None = None) -> None:
    """Copy ``length`` bytes of ``source`` from ``source_offset`` into ``disk`` at ``offset``.

    Zero blocks are skipped, so holes stay holes (the disk starts as one).
    """
    length = os.path.getsize(source) - source_offset if length is None else length
    with open(source, "rb") as src, open(disk, "r+b") as dst:
        src.seek(source_offset)
        done = 0
        while done < length:
            chunk = src.read(min(MiB, length - done))
            if not chunk:
                raise ValueError(f"{source} ends before {source_offset + length}")
            if chunk.count(0) != len(chunk):
                dst.seek(offset + done)
                dst.write(chunk)
            done += len(chunk)


def _filled(part: Part, directory: Path, spec: TreeSpec, offset: int, name: str, disk: Path) -> Volume:
    """Make ``part``'s filesystem in a file of its own and copy it into ``disk`` at ``offset``."""
    if part.fstype is None or part.fstype == LVM2_PV:
        return Volume(name, offset, part.size, part.fstype)
    label = part.label or name
    image = make_fs(part.fstype, _fresh(directory, name), spec, size=part.size, label=label)
    place(image, disk, offset)
    image.unlink()
    return Volume(name, offset, part.size, base_fstype(part.fstype), written_label(part.fstype, label), spec)


def _fresh(directory: Path, name: str) -> Path:
    """A new empty subdirectory for one volume's scratch files."""
    where = directory / f"scratch-{name}"
    where.mkdir()
    return where


# -------------------------------------------------------------------- GPT

GPT_DISK_GUID = "21212121-0000-4000-8000-000000000000"
GPT_TYPES = {None: "8300", "vfat": "0700", "exfat": "0700", "ntfs": "0700", LVM2_PV: "8e00"}


def gpt_disk(directory: Path, parts: list[Part] | None = None, spec: TreeSpec | None = None,
             name: str = "gpt.img") -> Disk:
    """A GPT disk (sgdisk) with ``parts`` from 1 MiB, each 1 MiB-aligned, filled with ``spec``.

    The default: ext4, XFS, FAT16 and an unformatted partition; the XFS
    one mounts to fill (root, the `mount` marker).
    """
    parts = parts if parts is not None else [Part(32 * MiB, "ext4"), Part(64 * MiB, "xfs"),
                                             Part(40 * MiB, "vfat16"), Part(8 * MiB)]
    spec = spec or default_tree()
    starts = _aligned_starts(MiB, parts)
    disk = sparse_image(directory / name, starts[-1] + parts[-1].size + MiB)
    args = ["sgdisk", "-o", "-U", GPT_DISK_GUID]
    for number, (start, part) in enumerate(zip(starts, parts), 1):
        first, last = start // SECTOR, (start + part.size) // SECTOR - 1
        kind = GPT_TYPES.get(part.fstype and base_fstype(part.fstype), "8300")
        args += ["-n", f"{number}:{first}:{last}", "-t", f"{number}:{kind}",
                 "-u", f"{number}:21212121-0000-4000-8000-{number:012d}", "-c", f"{number}:part{number}"]
    run(*args, disk)
    volumes = [_filled(part, directory, spec, start, f"p{number}", disk)
               for number, (start, part) in enumerate(zip(starts, parts), 1)]
    return Disk(disk, volumes)


def _aligned_starts(first: int, parts: list[Part], gap: int = 0) -> list[int]:
    """Each partition's start: one after another from ``first``, ``gap`` bytes between, 1 MiB-aligned."""
    starts, at = [], first
    for part in parts:
        starts.append(at)
        at = -(-(at + part.size + gap) // MiB) * MiB
    return starts


# -------------------------------------------------------------------- MBR


def mbr_disk(directory: Path, spec: TreeSpec | None = None, name: str = "mbr.img") -> Disk:
    """An MBR disk (sfdisk): primary p1 ext4, then an extended p2 holding logical p5 FAT16 and p6 ext2.

    Linux numbers logical partitions from 5 whatever the primaries. The
    extended partition itself is a table entry, not a volume: it is not
    in the list. Needs no root.
    """
    spec = spec or default_tree()
    primary = Part(32 * MiB, "ext4")
    logicals = [Part(20 * MiB, "vfat16"), Part(16 * MiB, "ext2")]
    p1 = MiB
    extended = p1 + primary.size
    # Each logical partition is preceded by its EBR: 1 MiB left before each.
    logical_starts = _aligned_starts(extended + MiB, logicals, gap=MiB)
    extended_size = logical_starts[-1] + logicals[-1].size - extended
    disk = sparse_image(directory / name, extended + extended_size + MiB)
    types = {"ext4": "83", "ext2": "83", "vfat16": "6"}
    script = ["label: dos", "label-id: 0x21212121", "unit: sectors",
              f"start={p1 // SECTOR}, size={primary.size // SECTOR}, type=83",
              f"start={extended // SECTOR}, size={extended_size // SECTOR}, type=5"]
    script += [f"start={s // SECTOR}, size={p.size // SECTOR}, type={types[p.fstype or 'ext2']}"
               for s, p in zip(logical_starts, logicals)]
    run("sfdisk", "--no-reread", "--no-tell-kernel", disk, input="\n".join(script).encode() + b"\n")
    volumes = [_filled(primary, directory, spec, p1, "p1", disk)]
    for number, (start, part) in enumerate(zip(logical_starts, logicals), 5):
        volumes.append(_filled(part, directory, spec, start, f"p{number}", disk))
    return Disk(disk, volumes)


# ------------------------------------------------------------- whole disk


def whole_disk(directory: Path, fstype: str = "ext4", spec: TreeSpec | None = None, size: int | None = None,
               name: str = "whole.img") -> Disk:
    """A filesystem straight on the disk, no partition table: the volume ``disk``."""
    spec = spec or default_tree()
    image = make_fs(fstype, _fresh(directory, name), spec, size=size, label="wholedisk")
    disk = directory / name
    image.rename(disk)
    label = written_label(fstype, "wholedisk")
    return Disk(disk, [Volume("disk", 0, os.path.getsize(disk), base_fstype(fstype), label, spec)])


# ------------------------------------------------------------------- LVM2


@dataclass(frozen=True)
class LogicalVolume:
    """An LV to define: its name, filesystem, and segments as (first PE, extent count) in LV order."""

    name: str
    fstype: str
    segments: tuple[tuple[int, int], ...]


VG_NAME = "vgguest"
EXTENT = 4 * MiB
# "data" in two pieces, the second before the first on the PV; "logs" in one.
DEFAULT_LVS = (LogicalVolume("data", "ext4", ((8, 3), (1, 3))), LogicalVolume("logs", "vfat", ((12, 2),)))


def lvm_disk(directory: Path, on_partition: bool = True, spec: TreeSpec | None = None,
             lvs: tuple[LogicalVolume, ...] = DEFAULT_LVS, name: str = "lvm.img") -> Disk:
    """A disk holding an LVM2 volume group ``vgguest`` with ``lvs``, on GPT partition 2 or the whole disk.

    With ``on_partition``, p1 is a small ext4 and p2 the PV. Attaches a loop
    device (root, the `mount` marker), detached before returning.
    """
    spec = spec or default_tree()
    pv_size = 64 * MiB
    if on_partition:
        disk = gpt_disk(directory, [Part(16 * MiB, "ext4"), Part(pv_size, LVM2_PV)], spec, name)
        image, pv_offset = disk.image, disk.volumes[1].offset
        volumes = [disk.volumes[0], Volume("p2", pv_offset, pv_size, LVM2_PV)]
    else:
        image, pv_offset = sparse_image(directory / name, pv_size), 0
        volumes = [Volume("disk", 0, pv_size, LVM2_PV)]
    pe_start = _make_volume_group(image, pv_offset, pv_size, lvs, directory)
    for lv in lvs:
        volumes.append(_fill_logical_volume(image, pv_offset + pe_start, lv, spec, directory))
    return Disk(image, volumes)


def _fill_logical_volume(image: Path, first_extent_at: int, lv: LogicalVolume, spec: TreeSpec,
                         directory: Path) -> Volume:
    """Make ``lv``'s filesystem in a file, and copy it piece by piece to where its segments are."""
    name = f"lvm-{VG_NAME}-{lv.name}"
    size = sum(count for _, count in lv.segments) * EXTENT
    fs_image = make_fs(lv.fstype, _fresh(directory, name), spec, size=size, label=lv.name)
    segments, at = [], 0
    for first_pe, count in lv.segments:
        disk_offset = first_extent_at + first_pe * EXTENT
        place(fs_image, image, disk_offset, source_offset=at, length=count * EXTENT)
        segments.append((disk_offset, count * EXTENT))
        at += count * EXTENT
    fs_image.unlink()
    return Volume(name, segments[0][0], size, base_fstype(lv.fstype), written_label(lv.fstype, lv.name), spec,
                  tuple(segments))


def _make_volume_group(image: Path, pv_offset: int, pv_size: int, lvs: tuple[LogicalVolume, ...],
                       directory: Path) -> int:
    """pvcreate, vgcreate, then define ``lvs`` by vgcfgrestore; returns pe_start in bytes.

    Every LVM command sees only the loop device (--devices) and a
    configuration of its own (LVM_SYSTEM_DIR): no host state read or written,
    no backup or archive kept, no udev.
    """
    env = lvm_environment(_fresh(directory, "lvm-config"))
    config_dir = Path(env["LVM_SYSTEM_DIR"])
    with loop_device(image, pv_offset, pv_size) as device:
        only = ["--devices", device]
        run("pvcreate", *only, "--uuid", _lvm_id("pv"), "--norestorefile", device, env=env)
        run("vgcreate", *only, "-s", f"{EXTENT // MiB}M", VG_NAME, device, env=env)
        pe_start = int(run("pvs", *only, "-o", "pe_start", "--units", "b", "--nosuffix", "--noheadings",
                           device, env=env).strip())
        backup = config_dir / "vg.txt"
        run("vgcfgbackup", *only, "-f", backup, VG_NAME, env=env)
        backup.write_text(with_logical_volumes(backup.read_text(), lvs))
        run("vgcfgrestore", *only, "-f", backup, VG_NAME, env=env)
        listed = run("lvs", *only, "--noheadings", "-o", "lv_name", VG_NAME, env=env).split()
        if sorted(listed) != sorted(lv.name for lv in lvs):
            raise RuntimeError(f"vgcfgrestore left logical volumes {listed}, not {[lv.name for lv in lvs]}")
    return pe_start


def lvm_environment(config_dir: Path) -> dict[str, str]:
    """Environment for LVM commands with a configuration of their own in ``config_dir``.

    No device list from udev or a devices file, no hints, no metadata
    backups or archives, no udev or monitoring: with ``--devices DEV`` on
    each command, LVM reads and writes only that device.
    """
    (config_dir / "lvm.conf").write_text(
        'devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 hints = "none" scan = [ "/dev" ] }\n'
        f'global {{ locking_dir = "{config_dir}" }}\n'
        "backup { backup = 0 archive = 0 }\n"
        "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n")
    return {"LVM_SYSTEM_DIR": str(config_dir), "LVM_SUPPRESS_FD_WARNINGS": "1"}


def _lvm_id(seed: str) -> str:
    """A fixed LVM identifier (32 letters and digits in LVM's 6-4-4-4-4-4-6 grouping) made from ``seed``."""
    letters = "".join(c for c in hashlib.sha256(seed.encode()).hexdigest() if c.isalnum())[:32]
    groups, at = [], 0
    for width in (6, 4, 4, 4, 4, 4, 6):
        groups.append(letters[at:at + width])
        at += width
    return "-".join(groups)


def with_logical_volumes(metadata: str, lvs: tuple[LogicalVolume, ...]) -> str:
    """A vgcfgbackup file's text with a logical_volumes section for ``lvs`` (linear, on pv0).

    The section goes before the brace that closes the volume group.
    """
    blocks = []
    for lv in lvs:
        segments, start = [], 0
        for number, (first_pe, count) in enumerate(lv.segments, 1):
            segments.append(
                f"\t\t\tsegment{number} {{\n\t\t\t\tstart_extent = {start}\n\t\t\t\textent_count = {count}\n"
                f'\t\t\t\ttype = "striped"\n\t\t\t\tstripe_count = 1\n\t\t\t\tstripes = [\n'
                f'\t\t\t\t\t"pv0", {first_pe}\n\t\t\t\t]\n\t\t\t}}\n')
            start += count
        blocks.append(
            f'\t\t{lv.name} {{\n\t\t\tid = "{_lvm_id(lv.name)}"\n'
            '\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]\n\t\t\tflags = []\n'
            '\t\t\tcreation_time = 1650000000\n\t\t\tcreation_host = "guest"\n'
            f"\t\t\tsegment_count = {len(lv.segments)}\n\n" + "\n".join(segments) + "\t\t}\n")
    section = "\n\tlogical_volumes {\n\n" + "\n".join(blocks) + "\t}\n"
    closing = metadata.rstrip().rfind("}")
    if closing < 0 or re.search(r"^\s*logical_volumes\s*\{", metadata, re.M):
        raise ValueError("not a vgcfgbackup file of a volume group without logical volumes")
    return metadata[:closing] + section + metadata[closing:]


# ------------------------------------------------------------- the oracle


def volume_image(disk: Disk | Path, volume: Volume, directory: Path) -> Path:
    """``volume``'s bytes in a file of their own (a logical volume's segments joined in order)."""
    source = disk.image if isinstance(disk, Disk) else disk
    out = sparse_image(directory / f"{volume.name}.vol", volume.size)
    at = 0
    for disk_offset, length in volume.segments or ((volume.offset, volume.size),):
        with open(source, "rb") as src, open(out, "r+b") as dst:
            src.seek(disk_offset)
            dst.seek(at)
            dst.write(src.read(length))
        at += length
    return out


def volume_kernel_view(disk: Disk, volume: Volume) -> View:
    """The host's view of ``volume``'s filesystem (a split LV is first joined into a file)."""
    assert volume.fstype is not None and volume.fstype != LVM2_PV, volume
    if len(volume.segments) <= 1:
        return kernel_view(disk.image, volume.offset, volume.fstype, volume.size)
    with tempfile.TemporaryDirectory(prefix="guestdisks-lv-") as where:
        return kernel_view(volume_image(disk, volume, Path(where)), 0, volume.fstype)
