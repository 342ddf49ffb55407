"""Files inside backups, engine side: every volume and filesystem read in user space as it was made.

Disks and filesystems are made by the real tools (tests/guestdisks.py,
tests/guestfs.py); what the engine shows (tests/guestengine.py) must be
exactly what was put in, as each filesystem keeps it
(tests/guesttree.py expected_view), and what the host's own driver shows.
Building XFS, Btrfs, exFAT and NTFS images needs a loop mount: those cases
are marked `mount`.
"""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest

from engine.guest.guestdisk import GuestDisk
from engine.guest.reader import GuestDamaged
from tests.guestdisks import LVM2_PV, Disk, gpt_disk, lvm_disk, mbr_disk, whole_disk
from tests.guestengine import FileSource, engine_view
from tests.guestfs import NEEDS_MOUNT, base_fstype, kernel_view, make_fs
from tests.guesttree import default_tree, differences, expected_view

MiB = 1024 * 1024
SHOWN_FSTYPE = {"vfat": ("fat12", "fat16", "fat32")}


def assert_same(expected: object, actual: object) -> None:
    lines = differences(expected, actual)  # type: ignore[arg-type]
    assert not lines, "\n".join(lines)


def fs_param(fstype: str) -> object:
    marks = [pytest.mark.mount] if fstype in NEEDS_MOUNT else []
    return pytest.param(fstype, marks=marks, id=fstype)


def _disk(image: Path) -> GuestDisk:
    return GuestDisk(FileSource(image))


@pytest.mark.parametrize("fstype", [fs_param(f) for f in
                                    ("ext4", "ext2", "vfat12", "vfat16", "vfat32", "xfs", "btrfs", "exfat",
                                     "ntfs")])
def test_each_filesystem_reads_as_it_was_made(tmp_path: Path, fstype: str) -> None:
    """Names, types, sizes, contents (a sparse file and a 3 MiB one among them),
    modes, owners, times at the filesystem's resolution, symlink targets,
    hard links, device numbers and user.* xattrs, as far as each fs keeps them."""
    spec = default_tree()
    image = make_fs(fstype, tmp_path, spec)
    fs = base_fstype(fstype)
    with _disk(image) as disk:
        [info] = disk.infos()
        assert (info.name, info.offset, info.size, info.state) == ("disk", 0, image.stat().st_size, "ok")
        assert info.fstype in SHOWN_FSTYPE.get(fs, (fs,))
        assert_same(expected_view(spec, fs), engine_view(disk.volume("disk"), fs))


@pytest.mark.mount
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_the_engine_agrees_with_the_kernel(tmp_path: Path, fstype: str) -> None:
    """The same image through the host kernel's own driver (loop mount) and through the engine."""
    image = make_fs(fstype, tmp_path, default_tree())
    with _disk(image) as disk:
        assert_same(kernel_view(image, 0, fstype), engine_view(disk.volume("disk"), fstype))


def _check_layout(disk: Disk) -> None:
    """The volumes found are the layout's (names, offsets, sizes, filesystems, labels), and
    each filesystem reads as it was made."""
    with _disk(disk.image) as guest:
        found = {i.name: i for i in guest.infos()}
        for want in disk.volumes:
            got = found.pop(want.name)
            assert (got.offset, got.size) == (want.offset, want.size), want.name
            if want.fstype is None:
                assert got.state == "unsupported" and "no filesystem" in got.reason
                continue
            if want.fstype == LVM2_PV:
                assert got.fstype == LVM2_PV and got.state == "container"
                continue
            assert got.state == "ok", got.reason
            assert got.fstype in SHOWN_FSTYPE.get(want.fstype, (want.fstype,))
            assert got.label == (want.label or "")
            assert want.tree is not None
            assert_same(expected_view(want.tree, want.fstype), engine_view(guest.volume(want.name), want.fstype))
        # Only an MBR's extended partition may be listed beyond the layout's own volumes.
        assert all(i.state == "container" and "extended" in i.reason for i in found.values()), found
        assert guest.readable() == [v.name for v in disk.volumes if v.fstype not in (None, LVM2_PV)]


def test_an_mbr_disk_with_logical_partitions_numbers_them_as_linux(tmp_path: Path) -> None:
    disk = mbr_disk(tmp_path)
    _check_layout(disk)
    with _disk(disk.image) as guest:
        assert [i.name for i in guest.infos()] == ["p1", "p2", "p5", "p6"]


@pytest.mark.mount
def test_a_gpt_disk_with_several_filesystems_and_an_empty_partition(tmp_path: Path) -> None:
    _check_layout(gpt_disk(tmp_path))


@pytest.mark.mount
@pytest.mark.parametrize("on_partition", [True, False], ids=["pv-on-partition", "pv-on-whole-disk"])
def test_lvm2_logical_volumes_read_without_device_mapper(tmp_path: Path, on_partition: bool) -> None:
    """An LV in two pieces, the second before the first on the PV, reads as one filesystem."""
    _check_layout(lvm_disk(tmp_path, on_partition=on_partition))


def test_a_filesystem_on_the_whole_disk_is_called_disk(tmp_path: Path) -> None:
    _check_layout(whole_disk(tmp_path))


def test_nothing_is_parsed_before_a_volume_is_asked_for(tmp_path: Path) -> None:
    """Finding the volumes reads the table and each volume's head, not its filesystem's tree."""
    image = make_fs("ext4", tmp_path, default_tree())
    reads: list[tuple[int, int]] = []

    class Counting(FileSource):
        def read(self, offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return super().read(offset, length)

    with GuestDisk(Counting(image)) as disk:
        disk.infos()
        before = sum(n for _, n in reads)
        assert before < 2 * MiB, before
        disk.volume("disk").listing((b"usr", b"bin"))
        assert sum(n for _, n in reads) > before


def test_errors_name_the_volume_and_the_path(tmp_path: Path) -> None:
    image = make_fs("ext4", tmp_path, default_tree())
    with _disk(image) as disk:
        volume = disk.volume("disk")
        with pytest.raises(FileNotFoundError) as missing:
            volume.entry((b"etc", b"nope"))
        assert missing.value.errno == errno.ENOENT and "etc/nope" in str(missing.value)
        with pytest.raises(NotADirectoryError):
            volume.listing((b"etc", b"hostname"))
        with pytest.raises(GuestDamaged, match="not a symlink"):
            volume.readlink((b"etc", b"hostname"))
        with pytest.raises(FileNotFoundError):
            disk.volume("p9")
        assert stat.S_ISDIR(volume.entry(()).mode)


def test_a_damaged_filesystem_is_listed_with_its_reason(tmp_path: Path) -> None:
    """An ext4 whose group descriptors are garbage: the volume has no directory and
    `volumes` says why; the volume next to it still reads."""
    disk = mbr_disk(tmp_path)
    image = disk.image
    p1 = next(v for v in disk.volumes if v.name == "p1")
    with open(image, "r+b") as f:
        f.seek(p1.offset + 2048)  # the group descriptors follow the superblock (1 KiB blocks or 4)
        f.write(b"\xff" * 6144)
    with _disk(image) as guest:
        info = {i.name: i for i in guest.infos()}
        assert info["p1"].state == "damaged" and info["p1"].reason
        assert "p1" not in guest.readable()
        with pytest.raises(GuestDamaged, match="p1"):
            guest.volume("p1")
        assert "p1\t" in guest.volumes_text() and "damaged" in guest.volumes_text()
        p6 = next(v for v in disk.volumes if v.name == "p6")
        assert p6.tree is not None
        assert_same(expected_view(p6.tree, "ext2"), engine_view(guest.volume("p6"), "ext2"))


@pytest.mark.mount
def test_a_btrfs_subvolume_shows_where_the_tree_holds_it(tmp_path: Path) -> None:
    """A second subvolume, made with `btrfs subvolume create`, reads under its name
    (as a kernel mount of the default subvolume shows it), its inodes apart from the parent's."""
    from tests.guestfs import add_btrfs_subvolume
    from tests.guesttree import TreeSpec, plain

    spec = default_tree()
    image = make_fs("btrfs", tmp_path, spec)
    inside = TreeSpec((plain("inside.txt", b"in the subvolume\n", uid=1000),))
    add_btrfs_subvolume(image, "home-snap", inside)
    with _disk(image) as disk:
        volume = disk.volume("disk")
        assert volume.entry((b"home-snap",)).is_dir
        sub = volume.listing((b"home-snap",))
        assert list(sub) == [b"inside.txt"]
        data = volume.data((b"home-snap", b"inside.txt"))
        assert volume.read_data(data, 0, 100) == b"in the subvolume\n"
        assert sub[b"inside.txt"].key != volume.entry((b"etc", b"hostname")).key


def test_a_directory_too_big_for_the_cache_is_not_listed_again_for_each_lookup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ls -l` of a directory larger than the listing cache looks up each entry in it:
    each lookup listing it again made 200,000 entries cost hours."""
    import engine.guest.volume as volume_module

    image = make_fs("ext4", tmp_path, default_tree())
    reads: list[int] = []

    class Counting(FileSource):
        def read(self, offset: int, length: int) -> bytes:
            reads.append(length)
            return super().read(offset, length)

    with GuestDisk(Counting(image)) as disk:
        volume = disk.volume("disk")
        names = list(volume.listing((b"usr", b"bin")))
        monkeypatch.setattr(volume_module, "CACHED_ENTRIES", len(names) - 1)
        volume.listing((b"home",))  # another directory, cached as usual
        big = volume_module.Volume("disk", volume.fs, disk.budget)
        big.listing((b"usr", b"bin"))
        before = len(reads)
        for name in names:
            big.entry((b"usr", b"bin", name))
        assert len(reads) == before
