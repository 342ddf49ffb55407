"""Files inside backups through the mount: MOUNT/<device>/files/<id>/<volume>/.

The guest's files are compared with what was put in (tests/guesttree.py)
and with the host kernel's own view of the same backup file (a read-only
loop mount at the volume's offset), walked by ordinary tools: os.walk,
lstat, readlink, getxattr.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.commands import cli
from tests.guestdisks import Disk, mbr_disk
from tests.guestfs import kernel_view
from tests.guesttree import differences, expected_view, walk_view
from tests.mounts import Mounted
from tests.users import OtherUser

pytestmark = pytest.mark.mount


def assert_same(expected: object, actual: object) -> None:
    lines = differences(expected, actual)  # type: ignore[arg-type]
    assert not lines, "\n".join(lines)


def _repo_with(tmp_path: Path, disk: Disk) -> Path:
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", disk.image)
    cli("backup", repo, "vm", "full")
    (tmp_path / "mnt").mkdir()
    return repo


def _refused(err: int, fn: object, *args: object) -> None:
    with pytest.raises(OSError) as caught:
        fn(*args)  # type: ignore[operator]
    assert caught.value.errno == err, caught.value


def test_a_backups_files_as_the_guest_had_them(tmp_path: Path) -> None:
    disk = mbr_disk(tmp_path)
    repo = _repo_with(tmp_path, disk)
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        files = m.mnt / "vm" / "files"
        [ident] = [n for n in os.listdir(files) if n != "latest"]
        assert sorted(os.listdir(files)) == sorted([ident, "latest"])
        assert os.readlink(files / "latest") == ident
        here = files / ident
        assert sorted(os.listdir(here)) == ["p1", "p5", "p6", "volumes"]
        lines = (here / "volumes").read_text().splitlines()
        assert lines[0].split("\t") == ["NAME", "OFFSET", "SIZE", "FILESYSTEM", "LABEL", "STATE"]
        rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
        for v in disk.volumes:
            assert rows[v.name][1:3] == [str(v.offset), str(v.size)]
        assert rows["p2"][5].startswith("container")
        backup_file = m.mnt / "vm" / "backups" / ident
        for v in disk.volumes:
            assert v.tree is not None and v.fstype is not None
            ours = walk_view(here / v.name, v.fstype, skip=frozenset({"lost+found"}))
            assert_same(expected_view(v.tree, v.fstype), ours)
            if v.fstype.startswith("ext"):  # the kernel can mount these here: it agrees
                assert_same(kernel_view(backup_file, v.offset, v.fstype, v.size), ours)
        # Read-only, whatever is tried.
        p1 = here / "p1"
        _refused(errno.EROFS, os.open, p1 / "etc" / "hostname", os.O_WRONLY)
        _refused(errno.EROFS, os.mkdir, p1 / "new")
        _refused(errno.EROFS, os.unlink, p1 / "etc" / "hostname")
        _refused(errno.EROFS, os.setxattr, p1 / "etc" / "hostname", "user.x", b"1")
        _refused(errno.EROFS, os.chmod, p1 / "etc" / "hostname", 0o777)
        _refused(errno.EROFS, os.truncate, p1 / "etc" / "hostname", 0)
        # A guest's device node is listed, never opened (the mount is nodev).
        _refused(errno.EACCES, os.open, p1 / "dev" / "null", os.O_RDONLY)
        # The rest of the tree is as it was.
        assert (m.mnt / "vm" / "backups" / ident).stat().st_size == disk.image.stat().st_size
        m.stop()
    finally:
        m.cleanup()


def test_a_damaged_volume_costs_only_itself(tmp_path: Path) -> None:
    """p1's group descriptors are garbage: p1 has no directory, `volumes` says why,
    the daemon logs it, and p5, p6 and the backup itself still read."""
    disk = mbr_disk(tmp_path)
    p1 = next(v for v in disk.volumes if v.name == "p1")
    with open(disk.image, "r+b") as f:
        f.seek(p1.offset + 2048)
        f.write(b"\xff" * 6144)
    repo = _repo_with(tmp_path, disk)
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        here = m.mnt / "vm" / "files" / "latest"
        assert sorted(os.listdir(here)) == ["p5", "p6", "volumes"]
        p1_line = next(line for line in (here / "volumes").read_text().splitlines() if line.startswith("p1\t"))
        assert "damaged" in p1_line
        _refused(errno.ENOENT, os.stat, here / "p1")
        p6 = next(v for v in disk.volumes if v.name == "p6")
        assert p6.tree is not None
        assert_same(expected_view(p6.tree, "ext2"), walk_view(here / "p6", "ext2", skip=frozenset({"lost+found"})))
        assert "p1" in (repo / "backupfs.log").read_text()
        m.stop()
    finally:
        m.cleanup()


def test_guest_modes_apply_to_other_users_and_files_owner_only_keeps_them_out(
        tmp_path: Path, other_user: OtherUser, open_tmp: Path) -> None:
    """With allow_other the kernel checks the guest's modes against host users
    (default_permissions): a world-readable guest file reads, alice's 0600 notes
    do not. With files_owner_only nobody but the mount's owner gets in."""
    disk = mbr_disk(tmp_path)
    repo = _repo_with(tmp_path, disk)
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    for options, readable in (("allow_other", True), ("allow_other,files_owner_only", False)):
        m = Mounted(repo, mnt, options=options)
        m.start()
        try:
            p1 = mnt / "vm" / "files" / "latest" / "p1"
            hostname = other_user.run("cat", p1 / "etc" / "hostname")
            assert (hostname.returncode == 0) == readable, hostname.stderr
            if readable:
                assert hostname.stdout == "guest\n"
            notes = other_user.run("cat", p1 / "home" / "alice" / "notes.txt")
            assert notes.returncode != 0 and "Permission denied" in notes.stderr
            assert (p1 / "etc" / "hostname").read_text() == "guest\n"  # the owner (root) always
            m.stop()
        finally:
            m.cleanup()


def test_a_pruned_backups_files_are_gone(tmp_path: Path) -> None:
    disk = mbr_disk(tmp_path)
    repo = _repo_with(tmp_path, disk)
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        files = m.mnt / "vm" / "files"
        first = os.readlink(files / "latest")
        assert (files / first / "p1" / "etc" / "hostname").read_text() == "guest\n"
        subprocess.run(["sh", "-c", f"echo full > {m.mnt / 'vm' / 'snapshot'}"], check=True)
        subprocess.run(["sh", "-c", f"echo 'prune remove={first}' > {m.mnt / 'vm' / 'snapshot'}"], check=True)
        _refused(errno.ENOENT, os.stat, files / first)
        second = os.readlink(files / "latest")
        assert second != first
        assert (files / second / "p1" / "etc" / "hostname").read_text() == "guest\n"
        m.stop()
    finally:
        m.cleanup()
