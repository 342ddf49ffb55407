"""A hostile review of the files view (MOUNT/<device>/files/): each test is a finding.

Each test here failed before its fix: another local user seeing guest
files that ``files_owner_only`` keeps from them, the daemon dropping a
guest node the kernel still held, an open file's disk never closed after
a prune, and two guest nodes given one inode number by racing workers.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backupfs.filescache import FilesCache
from backupfs.tree import InodeTable, Node
from backupfs.views import ViewCache
from engine.guest.guestdisk import GuestDisk
from engine.repo import Repository
from tests.commands import backupfs_cmd, cli, repo_with_a_full
from tests.guestdisks import (
    LVM2_PV, Disk, LogicalVolume, Part, gpt_disk, lvm_environment, whole_disk, with_logical_volumes,
)
from tests.guestfs import loop_device, make_fs, run
from tests.guesttree import File, HardLink, TreeSpec, default_tree
from tests.mounts import Mounted
from tests.users import OtherUser

MiB = 1024 * 1024


def _repo_with(tmp_path: Path, disk: Disk) -> Path:
    return repo_with_a_full(tmp_path / "repo", "vm", disk.image)


@pytest.mark.mount
def test_files_owner_only_keeps_others_out_of_what_the_owner_already_walked(
        tmp_path: Path, other_user: OtherUser, open_tmp: Path) -> None:
    """The kernel keeps guest names and attributes for an hour: once the
    owner has walked a volume, another user's path walk never reaches our
    handlers. The kernel itself must refuse them (the directories' modes)."""
    repo = _repo_with(tmp_path, whole_disk(tmp_path))
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    m = Mounted(repo, mnt, options="allow_other,files_owner_only")
    m.start()
    try:
        here = mnt / "vm" / "files" / "latest" / "disk"
        assert (here / "etc" / "hostname").read_text() == "guest\n"  # the owner (root) walks it
        for _ in os.walk(here):
            pass
        for what in (here / "etc" / "hostname", here / "home" / "alice" / "notes.txt", here / "etc"):
            seen = other_user.run("stat", "-c", "%s %u %a", what)
            assert seen.returncode != 0 and "Permission denied" in seen.stderr, (what, seen.stdout)
        listed = other_user.run("ls", mnt / "vm" / "files" / "latest")
        assert listed.returncode != 0 and "Permission denied" in listed.stderr, listed.stdout
        # What is not a backup's files stays as it was: the owner-only rule is for files/<id>.
        assert other_user.run("ls", mnt / "vm" / "files").returncode == 0
        m.stop()
    finally:
        m.cleanup()


@pytest.mark.mount
def test_a_listing_closed_early_does_not_drop_what_another_listing_hands_out(tmp_path: Path) -> None:
    """Two listings of one guest directory: the first is closed before it is
    read, the second is read. Every name the kernel got from the second must
    still open (the daemon must not have dropped it with the first)."""
    repo = _repo_with(tmp_path, whole_disk(tmp_path))
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        etc = m.mnt / "vm" / "files" / "latest" / "disk" / "etc"
        first = os.open(etc, os.O_RDONLY | os.O_DIRECTORY)
        second = os.open(etc, os.O_RDONLY | os.O_DIRECTORY)
        os.close(first)  # its releasedir: nothing of it was read
        names = sorted(os.listdir(second))  # readdirplus: the kernel now holds these
        os.close(second)
        assert names == ["hostname", "shadow"]
        assert (etc / "hostname").read_text() == "guest\n"
        assert os.listxattr(etc / "shadow") == []  # asks the daemon: the node must be known
        m.stop()
    finally:
        m.cleanup()


def test_workers_making_guest_nodes_at_once_get_distinct_inode_numbers() -> None:
    """Guest nodes are made in worker threads (lookups, listings run off the
    event loop): two of them must never share an inode number, or one file's
    requests are served from another's."""
    table = InodeTable()
    per_thread, threads = 20_000, 4
    made: list[list[Node]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def make(i: int) -> None:
        start.wait()
        for n in range(per_thread):
            made[i].append(table.get_forgettable(("guest", i, n), lambda inode: Node(inode, "guest")))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        workers = [threading.Thread(target=make, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(old)
    inodes = [node.inode for nodes in made for node in nodes]
    assert len(set(inodes)) == per_thread * threads
    assert all(table.find(node.inode) is node for nodes in made for node in nodes)


def test_an_open_files_disk_from_before_a_prune_is_closed_when_the_file_is(
        repo: Repository, tmp_path: Path) -> None:
    """A guest file is open while a prune drops every disk (the open one is
    only marked); the backup is then used again (a new disk) before the file
    is closed. The file's close must close its own disk and let go of the
    backup's view, or every prune leaks a disk and its descriptors."""
    image = make_fs("ext4", tmp_path, default_tree())
    repo.add_device("vm", str(image))
    rec = repo.backup("vm", "full").record
    views = ViewCache(repo)
    disks = FilesCache(views)
    held_by_open_file = disks.acquire(rec)
    disks.drop_all()  # a prune: the disk in use is closed when its last use ends
    with disks.using(rec) as fresh:  # a lookup after the prune
        assert fresh is not held_by_open_file
    disks.release(rec.id, held_by_open_file)  # the file is closed
    disks.drop_all()  # ...and unmount, as close_views does
    assert views.in_use() == []


def test_restore_as_root_makes_no_setuid_program_and_no_device_of_the_guests(tmp_path: Path) -> None:
    """The guest picks its files' modes and owners and its device numbers:
    restored by root as they are, a guest's setuid-root file (or a 0666 node
    of the host's /dev/mem or disk) in DIR is root for every local user who
    can reach DIR. README sends untrusted guests to this very command."""
    assert os.geteuid() == 0, "the hazard is root's: run as root"
    repo = _repo_with(tmp_path, whole_disk(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    said = cli("restore", repo, "vm", "latest", out, "--include", "disk/usr/bin", "--include", "disk/dev")
    tool = (out / "usr" / "bin" / "suid-tool").stat()
    assert stat.S_IMODE(tool.st_mode) == 0o755 and tool.st_uid == 0, oct(tool.st_mode)
    assert not os.path.lexists(out / "dev" / "null")
    assert stat.S_ISFIFO((out / "dev" / "pipe").lstat().st_mode)  # a FIFO is harmless: kept
    notes = said.stderr.decode()
    assert "suid-tool" in notes and "setuid" in notes, notes
    assert "dev/null" in notes, notes
    # Asked for, root keeps them, as tar does: a directory only root can reach.
    kept = tmp_path / "kept"
    kept.mkdir(mode=0o700)
    cli("restore", repo, "vm", "latest", kept, "--include", "disk/usr/bin", "--include", "disk/dev",
        "--keep-special")
    assert stat.S_IMODE((kept / "usr" / "bin" / "suid-tool").stat().st_mode) == 0o4755
    null = (kept / "dev" / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o666


def _expected_files(spec: TreeSpec) -> dict[str, bytes]:
    """Every regular file's bytes by path, hard links included."""
    files = {e.path: e.content() for e in spec.entries if isinstance(e, File)}
    files.update({e.path: files[e.to] for e in spec.entries if isinstance(e, HardLink)})
    return files


def _read_all_files(volume: Path, expected: dict[str, bytes]) -> None:
    """Walk the volume and read every regular file through the daemon (its
    cached pages dropped after), checking the bytes."""
    seen = set()

    def fail(error: OSError) -> None:
        raise error

    for top, _, names in os.walk(volume, onerror=fail):
        for name in names:
            path = Path(top) / name
            rel = str(path.relative_to(volume))
            if rel not in expected:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the next read asks the daemon
            finally:
                os.close(fd)
            assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected[rel]).hexdigest(), rel
            seen.add(rel)
    assert seen == set(expected)


@pytest.mark.mount
@pytest.mark.long
def test_parallel_readers_of_more_backups_than_are_kept_while_one_is_pruned(tmp_path: Path) -> None:
    """Eight readers walk and read every file of seven backups (more than the
    four disks kept open) at once while a prune removes one of them: every
    byte read is right; a reader of the pruned backup may find it gone
    (ENOENT), never EIO, EBADF or another file's bytes."""
    disk = whole_disk(tmp_path)
    spec = disk.volumes[0].tree
    assert spec is not None
    expected = _expected_files(spec)
    repo = _repo_with(tmp_path, disk)
    for _ in range(6):
        cli("backup", repo, "vm", "incremental", "--allow-empty")
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        files = m.mnt / "vm" / "files"
        ids = sorted(n for n in os.listdir(files) if n != "latest")
        assert len(ids) == 7
        pruned = ids[3]  # an incremental in the middle: the later ones are rewritten
        failures: list[str] = []
        started = threading.Barrier(9)

        def reader(worker: int) -> None:
            started.wait()
            for round_ in range(3):
                for ident in ids[worker % 7:] + ids[:worker % 7]:
                    try:
                        _read_all_files(files / ident / "disk", expected)
                    except FileNotFoundError as e:
                        if ident != pruned:
                            failures.append(f"{ident}: {e}")
                    except (OSError, AssertionError) as e:
                        failures.append(f"{ident} round {round_}: {type(e).__name__}: {e}")

        workers = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for w in workers:
            w.start()
        started.wait()
        with open(m.mnt / "vm" / "snapshot", "w") as trigger:
            trigger.write(f"prune remove={pruned}\n")
        for w in workers:
            w.join()
        assert not failures, "\n".join(failures[:20])
        assert pruned not in os.listdir(files)
        for ident in ids:
            if ident != pruned:
                _read_all_files(files / ident / "disk", expected)
        m.stop()
    finally:
        m.cleanup()


class _Bytes:
    """A disk held in memory, as the guest parsers' byte source."""

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])


def _mbr_slot(kind: int, start: int, sectors: int) -> bytes:
    return bytes([0, 0, 0, 0, kind, 0, 0, 0]) + struct.pack("<II", start, sectors)


def _put_boot_record(disk: bytearray, at: int, slots: list[bytes]) -> None:
    for i, slot in enumerate(slots):
        disk[at + 446 + 16 * i : at + 446 + 16 * (i + 1)] = slot
    disk[at + 510 : at + 512] = b"\x55\xaa"


def test_two_extended_partitions_give_distinct_volume_names() -> None:
    """An MBR with two extended partitions (the kernel reads them; fdisk makes
    one): Linux numbers the logicals on from 5 across both chains. Here both
    chains start at 5, so files/<id>/ lists `p5` twice and one of them cannot
    be reached. Fix: pass _logicals the next free number (5 + the logicals
    already found) instead of starting at 5."""
    disk = bytearray(48 * MiB)
    linux, extended = 0x83, 0x05
    _put_boot_record(disk, 0, [_mbr_slot(linux, 40960, 2048), _mbr_slot(extended, 2048, 16384),
                               _mbr_slot(extended, 20480, 16384)])
    _put_boot_record(disk, 2048 * 512, [_mbr_slot(linux, 63, 1000)])
    _put_boot_record(disk, 20480 * 512, [_mbr_slot(linux, 63, 1000)])
    names = [info.name for info in GuestDisk(_Bytes(disk)).infos()]
    assert sorted(names) == ["p1", "p2", "p3", "p5", "p6"], names


def test_restore_skips_a_symlink_whose_target_holds_nul_and_carries_on(tmp_path: Path) -> None:
    """A crafted ext4 fast symlink whose size reaches past its text: its target
    holds NUL bytes, which no host symlink can. One such link stopped the whole
    restore with an internal error, its directory left half made (0700)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    os.chmod(src / "d", 0o755)
    os.symlink("abcd", src / "d" / "lnk")
    (src / "d" / "zz-after").write_bytes(b"restored all the same\n")
    image = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", src, image, "8M"], check=True, capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", "sif /d/lnk size 8", image], check=True, capture_output=True)
    repo = _repo_with(tmp_path, Disk(image, []))
    out = tmp_path / "out"
    out.mkdir()
    proc = cli("restore", repo, "vm", "latest", out, "--include", "disk/d", check=False)
    notes = proc.stderr.decode()
    assert proc.returncode == 1 and "internal error" not in notes, notes
    assert "lnk" in notes and "not restored" in notes, notes
    assert not os.path.lexists(out / "d" / "lnk")
    assert (out / "d" / "zz-after").read_bytes() == b"restored all the same\n"
    assert stat.S_IMODE((out / "d").stat().st_mode) == 0o755  # the directory was finished


def test_restore_skips_a_name_longer_than_dir_takes_and_carries_on(tmp_path: Path) -> None:
    """FAT and NTFS count 255 UTF-16 units: 120 CJK characters are a fine
    Windows name and 360 bytes of UTF-8, more than ext4 or XFS hold. Such a
    name stopped the whole restore with a raw bytes repr of the name; it is
    one note now, and the rest of the directory is restored."""
    long_name = "日" * 120
    image = tmp_path / "fat.img"
    payload = tmp_path / "payload"
    payload.write_bytes(b"fine\n")
    subprocess.run(["mkfs.vfat", "-C", image, "8192"], check=True, capture_output=True)
    subprocess.run(["mmd", "-i", image, "::/d"], check=True, capture_output=True)
    for name in ("a-first", long_name, "zz-last"):
        subprocess.run(["mcopy", "-i", image, payload, f"::/d/{name}"], check=True, capture_output=True)
    repo = _repo_with(tmp_path, Disk(image, []))
    listed = cli("ls", repo, "vm", "latest", "disk/d").stdout.decode().split("\n")
    [shown_long] = [n for n in listed if len(n.encode()) > 255]  # the guest has it, longer than ext4 takes
    out = tmp_path / "out"
    out.mkdir()
    proc = cli("restore", repo, "vm", "latest", out, "--include", "disk/d", check=False)
    notes = proc.stderr.decode()
    assert proc.returncode == 1 and "too long" in notes and "\\xe6" not in notes, notes
    assert len(notes.splitlines()) == 2, notes  # the entry's note, then the summary's error
    assert sorted(os.listdir(out / "d")) == ["a-first", "zz-last"]
    assert shown_long


def _volume_group(image: Path, offset: int, size: int, vg: str, lv: str, config: Path) -> None:
    """A volume group ``vg`` on the PV at ``offset``, with one linear LV ``lv`` of one extent."""
    env = lvm_environment(config)
    with loop_device(image, offset, size) as device:
        only = ["--devices", device]
        run("pvcreate", *only, "--norestorefile", device, env=env)
        run("vgcreate", *only, "-s", "4M", vg, device, env=env)
        backup = config / "vg.txt"
        run("vgcfgbackup", *only, "-f", backup, vg, env=env)
        backup.write_text(with_logical_volumes(backup.read_text(), (LogicalVolume(lv, "", ((1, 1),)),)))
        run("vgcfgrestore", *only, "-f", backup, vg, env=env)


@pytest.mark.mount  # losetup, for the LVM tools
def test_logical_volumes_of_two_groups_never_share_a_name(tmp_path: Path) -> None:
    """VG `a-b` with LV `c` and VG `a` with LV `b-c` (valid LVM names, made by
    the LVM tools) are both `lvm-a-b-c`: files/<id>/ lists that name twice and
    one of the two cannot be reached. device-mapper has the same problem and
    doubles the `-` inside names (`a--b-c` and `a-b--c`); doing the same in
    _logical_volume, or numbering a repeated name, fixes it."""
    parts = [Part(16 * MiB, LVM2_PV), Part(16 * MiB, LVM2_PV)]
    disk = gpt_disk(tmp_path, parts)
    for volume, (vg, lv) in zip(disk.volumes, (("a-b", "c"), ("a", "b-c"))):
        config = tmp_path / f"lvm-{volume.name}"
        config.mkdir()
        _volume_group(disk.image, volume.offset, volume.size, vg, lv, config)
    with open(disk.image, "rb") as f:
        names = [info.name for info in GuestDisk(_Bytes(bytearray(f.read()))).infos()]
    assert len(names) == 4 and len(set(names)) == 4, names


def test_a_huge_sparse_file_restores_at_the_cost_of_its_data(tmp_path: Path) -> None:
    """A 1 TiB file holding two 4 KiB blocks: restore reads the blocks, not a terabyte
    of holes (a piece at a time, that took hours)."""
    size = 1 << 40
    spec = TreeSpec((File(path="sparse.img", size=size, extents=((0, b"head" * 1024), (size - 4096, b"T" * 4096))),))
    image = make_fs("ext4", tmp_path, spec)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", image)
    cli("backup", repo, "vm", "full")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([*backupfs_cmd(), "restore", repo, "vm", "latest", out, "--include", "disk/sparse.img"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = out / "sparse.img"
    assert got.stat().st_size == size and got.stat().st_blocks * 512 < 1 << 20
    with open(got, "rb") as f:
        assert f.read(4096) == b"head" * 1024
        f.seek(size - 4096)
        assert f.read() == b"T" * 4096
