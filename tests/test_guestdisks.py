"""The guest disk helpers make what they claim.

The file-level restore tests trust tests.guestdisks for the volumes on a
disk and tests.guesttree for what a reader of each filesystem should show:
here both are checked against the tools' own view (sgdisk, sfdisk, lvs,
blkid) and against the host kernel's (or FUSE driver's, or mtools') view of
each filesystem. Tests that attach a loop device are marked `mount`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from tests.guestdisks import (
    EXTENT,
    LVM2_PV,
    VG_NAME,
    Disk,
    Volume,
    gpt_disk,
    lvm_disk,
    lvm_environment,
    mbr_disk,
    volume_image,
    volume_kernel_view,
    whole_disk,
)
from tests.guestfs import NEEDS_MOUNT, add_btrfs_subvolume, base_fstype, kernel_view, loop_device, make_fs, mounted, run
from tests.guesttree import (
    CAPABILITIES,
    TreeSpec,
    default_tree,
    differences,
    expected_view,
    plain,
    populate,
    walk_view,
)

SECTOR = 512


def assert_same(expected: object, actual: object) -> None:
    """Views equal, or the test fails naming every difference."""
    lines = differences(expected, actual)  # type: ignore[arg-type]
    assert not lines, "\n".join(lines)


def assert_no_loop_device(image: Path) -> None:
    """Nothing left attached to ``image`` (every helper detaches in its finally).

    Read from /sys rather than `losetup`, so that a test that mounts nothing
    can check it too."""
    attached = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            attached.append(backing.read_text().strip())
        except OSError:  # detached meanwhile, by another test's finally
            continue
    assert str(image.resolve()) not in attached


def blkid_probe(image: Path, offset: int = 0, size: int | None = None) -> dict[str, str]:
    """What blkid finds at ``offset`` (probing the file itself: no loop device): TYPE, LABEL, ..."""
    args = ["blkid", "--probe", "--output", "export", f"--offset={offset}"]
    args += [f"--size={size}"] if size is not None else []
    proc = subprocess.run(args + [str(image)], capture_output=True, text=True, timeout=60)
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def blkid_type(image: Path, offset: int = 0, size: int | None = None) -> str | None:
    """The filesystem, or else the partition table, blkid finds at ``offset``; None for neither."""
    found = blkid_probe(image, offset, size)
    return found.get("TYPE") or found.get("PTTYPE")


# ------------------------------------------------------------ the tree


def test_a_populated_directory_is_the_spec(tmp_path: Path) -> None:
    """populate writes every kind of entry with its attributes, a hole where the spec has one."""
    spec = default_tree()
    populate(spec, tmp_path)
    view = walk_view(tmp_path, "host")
    assert_same(expected_view(spec, "host"), view)
    assert {s.kind for s in view.entries.values()} == {"file", "dir", "symlink", "fifo", "chr"}
    assert view.hardlinks == {frozenset({"home/alice/notes.txt", "home/alice/notes-link.txt"})}
    sparse = tmp_path / "usr/bin/sparse.img"
    assert sparse.stat().st_blocks * 512 < sparse.stat().st_size // 2, "the sparse file has no hole"
    assert stat.S_IMODE((tmp_path / "usr/bin/suid-tool").stat().st_mode) == 0o4755
    assert "home/alice/new\nline" in view.entries


def test_expected_views_keep_only_what_each_filesystem_holds() -> None:
    spec = default_tree()
    fat = expected_view(spec, "vfat")
    assert {s.kind for s in fat.entries.values()} == {"file", "dir"}
    assert not fat.hardlinks and not any("\n" in p for p in fat.entries)
    assert all(s.mode is None and s.uid is None and s.xattrs is None for s in fat.entries.values())
    assert all(s.mtime_ns % 2_000_000_000 == 0 for s in fat.entries.values() if s.kind == "file")
    assert all(s.mtime_ns is None for s in fat.entries.values() if s.kind == "dir")
    ntfs = expected_view(spec, "ntfs")
    assert {s.kind for s in ntfs.entries.values()} == {"file", "dir", "symlink"}
    assert ntfs.hardlinks and ntfs.entries["home/alice/notes.txt"].xattrs
    assert all(s.mtime_ns % 100 == 0 and s.uid is None for s in ntfs.entries.values())
    ext4 = expected_view(spec, "ext4")
    assert ext4.entries["dev/null"].rdev == (1, 3)
    assert ext4.entries["etc/hostname"].mtime_ns % 1000 != 0, "nanoseconds are kept"
    assert set(CAPABILITIES) >= {"ext4", "ext2", "xfs", "btrfs", "vfat", "exfat", "ntfs"}


def test_differences_name_each_change() -> None:
    """The comparison the engine's tests rely on does see a wrong attribute, a missing name, a broken link."""
    want = expected_view(default_tree(), "ext4")
    entries = dict(want.entries)
    entries["etc/shadow"] = replace(entries["etc/shadow"], mode=0o644)
    del entries["etc/hostname"]
    got = replace(want, entries=entries, hardlinks=frozenset())
    lines = differences(want, got)
    assert any("'etc/shadow' mode" in line for line in lines)
    assert any(line.startswith("missing: 'etc/hostname'") for line in lines)
    assert any(line.startswith("hard links") for line in lines)
    assert differences(want, want) == []


# --------------------------------------------------- single filesystems


def fs_param(fstype: str) -> object:
    """A filesystem type as a test parameter, marked `mount` when building or reading it mounts."""
    reads_by_mount = base_fstype(fstype) != "vfat"
    marks = [pytest.mark.mount] if fstype in NEEDS_MOUNT or reads_by_mount else []
    return pytest.param(fstype, marks=marks, id=fstype)


@pytest.mark.parametrize("fstype", [fs_param(f) for f in
                                    ("ext4", "ext2", "xfs", "btrfs", "vfat12", "vfat16", "vfat32", "exfat", "ntfs")])
def test_each_filesystem_shows_what_was_put_in(tmp_path: Path, fstype: str) -> None:
    """Filled by its builder, read back by the host: exactly expected_view, nothing left attached."""
    spec = default_tree()
    image = make_fs(fstype, tmp_path, spec)
    fs = base_fstype(fstype)
    assert blkid_type(image) == fs
    assert_same(expected_view(spec, fs), kernel_view(image, 0, fs))
    assert_no_loop_device(image)


@pytest.mark.parametrize("bits", [12, 16, 32])
def test_fat_builders_make_the_fat_they_name(tmp_path: Path, bits: int) -> None:
    image = make_fs(f"vfat{bits}", tmp_path, TreeSpec((plain("a.txt", b"a"),)))
    boot = image.read_bytes()[:512]
    name_at = 82 if bits == 32 else 54
    assert boot[name_at:name_at + 8] == f"FAT{bits}".ljust(8).encode()
    run("fsck.vfat", "-n", image)


def test_ext_image_is_clean_and_keeps_nanoseconds_without_a_mount(tmp_path: Path) -> None:
    """mke2fs -d plus debugfs: e2fsck finds nothing to fix, and the inode holds the nanoseconds."""
    spec = default_tree()
    image = make_fs("ext4", tmp_path, spec)
    run("e2fsck", "-fn", image)
    stat_text = run("debugfs", "-R", 'stat "/etc/hostname"', image)
    want = [e for e in spec.entries if e.path == "etc/hostname"][0].mtime_ns % 1_000_000_000
    assert re.search(rf"mtime: 0x[0-9a-f]+:{want << 2:08x}", stat_text), stat_text


@pytest.mark.mount
def test_btrfs_second_subvolume(tmp_path: Path) -> None:
    spec = default_tree()
    image = make_fs("btrfs", tmp_path, spec)
    add_btrfs_subvolume(image, "home-snap", TreeSpec((plain("inside.txt", b"in the subvolume\n", uid=1000),)))
    with mounted(image, "btrfs", read_only=True) as where:
        assert "home-snap" in run("btrfs", "subvolume", "list", where)
        assert_same(expected_view(TreeSpec((plain("inside.txt", b"in the subvolume\n", uid=1000),)), "btrfs"),
                    walk_view(where / "home-snap", "btrfs"))
    assert_no_loop_device(image)


@pytest.mark.mount
def test_a_failed_mount_leaves_nothing_attached(tmp_path: Path) -> None:
    image = make_fs("ext4", tmp_path, TreeSpec(()))
    with pytest.raises(RuntimeError, match="mount"):
        kernel_view(image, 0, "xfs")
    assert_no_loop_device(image)


# ------------------------------------------------------------ layouts


def sfdisk_partitions(image: Path) -> dict[str, dict[str, object]]:
    """sfdisk's own reading of the table, by partition number (from its node name)."""
    table = json.loads(run("sfdisk", "--json", image))["partitiontable"]
    return {re.sub(r".*?(\d+)$", r"\1", p["node"]): p for p in table["partitions"]}


def assert_volumes_are_on_disk(disk: Disk) -> None:
    """Each volume's filesystem and label are found at its offset (blkid, no loop device); empty ones hold none."""
    for volume in disk.volumes:
        with tempfile.TemporaryDirectory(prefix="guestdisks-check-") as scratch:
            if len(volume.segments) > 1:  # a split logical volume: its pieces joined first
                found = blkid_probe(volume_image(disk, volume, Path(scratch)))
            else:
                found = blkid_probe(disk.image, volume.offset, volume.size)
        assert (found.get("TYPE"), found.get("LABEL")) == (volume.fstype, volume.label), volume.name


def test_mbr_disk_numbers_logical_partitions_from_five(tmp_path: Path) -> None:
    disk = mbr_disk(tmp_path)
    assert [v.name for v in disk.volumes] == ["p1", "p5", "p6"]
    table = sfdisk_partitions(disk.image)
    assert sorted(table, key=int) == ["1", "2", "5", "6"]
    assert table["2"]["type"] == "5", "p2 is the extended partition"
    for volume in disk.volumes:
        row = table[volume.name[1:]]
        assert (row["start"] * SECTOR, row["size"] * SECTOR) == (volume.offset, volume.size), volume.name
    listing = run("fdisk", "-l", disk.image)
    assert re.search(rf"{re.escape(str(disk.image))}5 .*FAT16", listing), listing
    assert_volumes_are_on_disk(disk)
    fat = disk.volumes[1]
    assert_same(expected_view(fat.tree, "vfat"), volume_kernel_view(disk, fat))


@pytest.mark.mount
def test_mbr_disk_filesystems_as_the_kernel_reads_them(tmp_path: Path) -> None:
    disk = mbr_disk(tmp_path)
    for volume in disk.volumes:
        assert_same(expected_view(volume.tree, volume.fstype), volume_kernel_view(disk, volume))
    assert_no_loop_device(disk.image)


def sgdisk_partitions(image: Path) -> dict[int, tuple[int, int]]:
    """sgdisk -p's table: number -> (first sector, last sector)."""
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s", run("sgdisk", "-p", image), re.M)
    return {int(n): (int(first), int(last)) for n, first, last in rows}


@pytest.mark.mount
def test_gpt_disk_partitions_and_filesystems(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path)
    assert [(v.name, v.fstype) for v in disk.volumes] == [("p1", "ext4"), ("p2", "xfs"), ("p3", "vfat"), ("p4", None)]
    run("sgdisk", "-v", disk.image)
    table = sgdisk_partitions(disk.image)
    assert sorted(table) == [1, 2, 3, 4]
    for volume in disk.volumes:
        first, last = table[int(volume.name[1:])]
        assert (first * SECTOR, (last + 1 - first) * SECTOR) == (volume.offset, volume.size), volume.name
    assert blkid_type(disk.image) == "gpt"
    assert_volumes_are_on_disk(disk)
    for volume in disk.volumes[:3]:
        assert_same(expected_view(volume.tree, volume.fstype), volume_kernel_view(disk, volume))
    assert_no_loop_device(disk.image)


def test_whole_disk_filesystem_has_no_table(tmp_path: Path) -> None:
    disk = whole_disk(tmp_path, "vfat")
    assert disk.volumes == [Volume("disk", 0, os.path.getsize(disk.image), "vfat", "WHOLEDISK", disk.volumes[0].tree)]
    # A FAT boot sector ends in 55 AA like an MBR: sfdisk calls it "dos", with no partitions in it.
    assert "partitions" not in json.loads(run("sfdisk", "--json", disk.image))["partitiontable"]
    assert_volumes_are_on_disk(disk)
    assert_same(expected_view(default_tree(), "vfat"), volume_kernel_view(disk, disk.volumes[0]))


def lvm_layout(disk: Disk, pv: Volume, config_dir: Path) -> tuple[int, dict[str, list[tuple[int, int]]]]:
    """LVM's own reading of the volume group: pe_start in bytes, and per LV its segments
    as (first PE, extent count) in LV order."""
    config_dir.mkdir()
    env = lvm_environment(config_dir)
    with loop_device(disk.image, pv.offset, pv.size, read_only=True) as device:
        pe_start = int(run("pvs", "--devices", device, "-o", "pe_start", "--units", "b", "--nosuffix",
                           "--noheadings", device, env=env))
        rows = run("lvs", "--devices", device, "--segments", "--noheadings", "--separator", ";",
                   "-o", "lv_name,seg_start_pe,seg_pe_ranges", "--sort", "lv_name,seg_start_pe", VG_NAME,
                   env=env)
    found: dict[str, list[tuple[int, int]]] = {}
    for row in rows.split("\n"):
        if row.strip():
            name, _, ranges = row.strip().split(";")
            first, last = re.fullmatch(r"\S+:(\d+)-(\d+)", ranges.strip()).groups()  # type: ignore[union-attr]
            found.setdefault(name, []).append((int(first), int(last) - int(first) + 1))
    return pe_start, found


@pytest.mark.mount
@pytest.mark.parametrize("on_partition", [True, False], ids=["on-gpt-partition", "whole-disk"])
def test_lvm_volumes_where_lvm_puts_them(tmp_path: Path, on_partition: bool) -> None:
    """lvs reads back the logical volumes the metadata edit defined, and each holds its filesystem."""
    disk = lvm_disk(tmp_path, on_partition)
    pv = [v for v in disk.volumes if v.fstype == LVM2_PV][0]
    assert pv.name == ("p2" if on_partition else "disk")
    assert_volumes_are_on_disk(disk)
    logical = [v for v in disk.volumes if v.name.startswith("lvm-")]
    assert [v.name for v in logical] == [f"lvm-{VG_NAME}-data", f"lvm-{VG_NAME}-logs"]
    pe_start, segments = lvm_layout(disk, pv, tmp_path / "lvm-check")
    for volume in logical:
        lv = volume.name.rsplit("-", 1)[1]
        assert [(pv.offset + pe_start + first * EXTENT, count * EXTENT) for first, count in segments[lv]] == \
            list(volume.segments), lv
        assert_same(expected_view(volume.tree, volume.fstype), volume_kernel_view(disk, volume))
    assert len(segments["data"]) == 2 and segments["data"][0][0] > segments["data"][1][0], "not split out of order"
    assert_no_loop_device(disk.image)
