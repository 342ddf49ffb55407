"""Who can read the repository: its owner only, or the one group it was made for.

A repository holds whole disks; another local user who can read an image
reads the guest's files. Everything here runs under umask 022 (the usual
one, which made the repository world-readable) and checks the modes with
lstat, then asks another user to read an image with qemu-img and cat. The
repositories sit in a directory that user can reach, so only the
repository's own modes keep them out.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commands import cli
from tests.mounts import Mounted
from tests.users import OtherUser
from engine.repo import Repository

MiB = 1024 * 1024
SCRIPTS = Path(__file__).resolve().parent.parent / "mount-scripts"
NOTICE = "was readable by other users; made it private (0700/0600)"


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """The umask most systems give root and users: 0644 files, 0755 directories."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 4 MiB disk with data in it, outside the repository."""
    src = tmp_path / "vm1.img"
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"secret guest data " * 4096)
    return src


@pytest.fixture
def group() -> Iterator[tuple[str, int]]:
    """A fresh group (name, gid), removed after the test."""
    import grp

    name = f"bfsgrp{os.getpid() % 100000}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


def entries(repo: Path) -> dict[str, os.stat_result]:
    """The repository and everything in it, by path relative to it (lstat)."""
    out = {".": os.lstat(repo)}
    for dirpath, dirnames, filenames in os.walk(repo):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(repo))] = os.lstat(p)
    return out


def owner_only(rel: str) -> bool:
    """The files a lock is taken on, which stay 0600 in a group's repository too."""
    return rel == "lock" or rel.startswith("catalog.db")


def wrong_modes(repo: Path, dir_mode: int, file_mode: int, gid: int | None = None) -> dict[str, str]:
    """Entries whose mode (or group) is not the one asked for: {} when all are right."""
    wrong = {}
    for rel, st in entries(repo).items():
        want = dir_mode if stat.S_ISDIR(st.st_mode) else 0o600 if owner_only(rel) else file_mode
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            wrong[rel] = f"{stat.filemode(st.st_mode)} (neither a file nor a directory)"
        elif stat.S_IMODE(st.st_mode) != want or (gid is not None and st.st_gid != gid):
            wrong[rel] = f"{oct(stat.S_IMODE(st.st_mode))} group {st.st_gid}"
    return wrong


def images(repo: Path) -> list[Path]:
    found = sorted(repo.glob("devices/*/*.qcow2"))
    assert found, f"no image in {repo}"
    return found


def assert_denied(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode != 0, f"{what} succeeded: {proc.stdout[:200]}"
    assert "Permission denied" in proc.stderr, f"{what}: {proc.stderr}"


def loosen(repo: Path) -> None:
    """What an older version left under umask 022: 0755 directories, 0644 files."""
    for rel, st in entries(repo).items():
        os.chmod(repo / rel, 0o755 if stat.S_ISDIR(st.st_mode) else 0o644)


def test_cli_repository_is_private_whatever_the_umask(open_tmp: Path, tmp_path: Path, source: Path,
                                                      other_user: OtherUser) -> None:
    repo = open_tmp / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", source)
    cli("backup", repo, "vm1", "full")
    with open(source, "r+b") as f:
        f.write(b"changed")
    cli("backup", repo, "vm1", "incremental")
    cli("prune", repo, "vm1", "--keep-last", "1")  # merges: a new image
    chain = tmp_path / "qemu"
    chain.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", chain / "base.qcow2", "4M"], check=True)
    cli("import", repo, "vm2", chain / "base.qcow2")  # a device directory and images of its own

    assert {"devices/vm1", "devices/vm2"} <= set(entries(repo))
    assert wrong_modes(repo, 0o700, 0o600) == {}
    for image in images(repo):
        assert_denied(other_user.run("qemu-img", "info", image), f"qemu-img info {image} as another user")
        assert_denied(other_user.run("cat", image), f"cat {image} as another user")
    assert_denied(other_user.run("ls", repo), "listing the repository as another user")


@pytest.mark.mount
def test_mounted_repository_is_private_whatever_the_umask(open_tmp: Path, tmp_path: Path, source: Path,
                                                          other_user: OtherUser) -> None:
    """The daemon's files too: mount.json, backupfs.log, the catalog's -wal
    and -shm while it is open, and a backup taken through the trigger."""
    repo = open_tmp / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", source)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        m.path("vm1", "snapshot").write_text("full\n")
        assert "state: succeeded" in m.path("vm1", "snapshot").read_text()
        present = set(entries(repo))
        assert {"mount.json", "backupfs.log", "catalog.db-wal", "catalog.db-shm"} <= present, present
        assert wrong_modes(repo, 0o700, 0o600) == {}
        for image in images(repo):
            assert_denied(other_user.run("qemu-img", "info", image), f"qemu-img info {image} as another user")
    finally:
        m.cleanup()
    assert wrong_modes(repo, 0o700, 0o600) == {}


def test_library_caller_gets_a_private_repository(open_tmp: Path, source: Path) -> None:
    """The engine sets the modes itself: a program using it keeps its own umask."""
    repo = open_tmp / "repo"
    Repository.init(str(repo))
    with Repository.open(str(repo)) as r:
        r.add_device("vm1", str(source))
        r.backup("vm1", "full")
        assert {"catalog.db-wal", "catalog.db-shm"} <= set(entries(repo))
        assert wrong_modes(repo, 0o700, 0o600) == {}
    assert wrong_modes(repo, 0o700, 0o600) == {}


@pytest.mark.mount
def test_old_repository_is_made_private_once(open_tmp: Path, tmp_path: Path, source: Path,
                                             other_user: OtherUser) -> None:
    repo = open_tmp / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", source)
    cli("backup", repo, "vm1", "full")
    outside = tmp_path / "outside"
    outside.write_text("not the repository's")
    outside.chmod(0o644)
    (repo / "devices" / "vm1" / "link").symlink_to(outside)  # never followed
    loosen(repo)
    assert other_user.run("qemu-img", "info", images(repo)[0]).returncode == 0  # what the finding was

    first = cli("list", repo)
    assert first.stderr.decode().splitlines() == [f"backupfs: {repo} {NOTICE}"]
    assert wrong_modes(repo, 0o700, 0o600) == {"devices/vm1/link": "lrwxrwxrwx (neither a file nor a directory)"}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644
    assert_denied(other_user.run("cat", images(repo)[0]), "cat of an image once made private")

    second = cli("list", repo)
    assert second.stderr.decode() == ""

    # A mount that finds it readable says so too, on the mount command's stderr.
    (repo / "devices" / "vm1" / "link").unlink()
    loosen(repo)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    try:
        mounted = cli("mount", repo, tmp_path / "mnt")
        m.pid = json.loads((repo / "mount.json").read_text())["pid"]
        assert mounted.stderr.decode().splitlines() == [f"backupfs: {repo} {NOTICE}"]
        assert wrong_modes(repo, 0o700, 0o600) == {}
        m.stop()
    finally:
        m.cleanup()
    assert cli("list", repo).stderr.decode() == ""


def test_group_repository_is_readable_by_that_group_only(open_tmp: Path, source: Path, other_user: OtherUser,
                                                        group: tuple[str, int]) -> None:
    name, gid = group
    repo = open_tmp / "repo"
    cli("init", repo, "--group", name)
    cli("device", "add", repo, "vm1", source)
    cli("backup", repo, "vm1", "full")
    with open(source, "r+b") as f:
        f.write(b"changed")
    made = cli("backup", repo, "vm1", "incremental")
    assert made.stderr.decode() == ""  # kept as asked: nothing to tighten
    assert wrong_modes(repo, 0o2750, 0o640, gid) == {}

    def as_member(*cmd: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], user=other_user.uid, group=other_user.gid,
                              extra_groups=[gid], capture_output=True, text=True, timeout=60)

    for image in images(repo):
        info = as_member("qemu-img", "info", "--output=json", image)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == 4 * MiB
        assert_denied(other_user.run("qemu-img", "info", image), f"qemu-img info {image} outside the group")
        assert_denied(as_member("sh", "-c", f"echo x >> {image}"), f"writing {image} as a group member")

    # Opened again after someone loosened it: back to the group's modes, once.
    loosen(repo)
    fixed = cli("list", repo)
    assert fixed.stderr.decode().splitlines() == [
        f"backupfs: {repo} was readable by other users; made it readable by group {name} only (2750/0640)"]
    assert wrong_modes(repo, 0o2750, 0o640, gid) == {}
    assert cli("list", repo).stderr.decode() == ""


@pytest.mark.mount
def test_a_group_member_cannot_hold_the_repository_or_catalog_locks(
        open_tmp: Path, tmp_path: Path, source: Path, other_user: OtherUser, group: tuple[str, int]) -> None:
    """A lock needs only a descriptor open for reading: a member who could read
    `lock` held its flock, and every backup and mount failed ("in use by pid
    N", naming the last writer); one who could read the catalog's -shm held
    a read lock on its write byte, and every catalog write failed ("locking
    protocol"). The group reads the images, not these."""
    name, gid = group
    repo = open_tmp / "repo"
    cli("init", repo, "--group", name)
    cli("device", "add", repo, "vm1", source)
    cli("backup", repo, "vm1", "full")

    def as_member(*cmd: str | Path) -> subprocess.Popen:
        return subprocess.Popen([str(c) for c in cmd], user=other_user.uid, group=other_user.gid,
                                extra_groups=[gid], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    holder = as_member("flock", "-n", repo / "lock", "-c", "echo held; sleep 30")
    try:
        assert holder.stdout is not None and holder.stdout.readline() == ""  # it never got the lock
        cli("backup", repo, "vm1", "incremental")
    finally:
        holder.kill()
        holder.wait()
        _, err = holder.communicate()
    assert "Permission denied" in err, err

    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        shm = repo / "catalog.db-shm"
        assert shm.exists()
        locker = as_member("/usr/bin/python3", "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(shm)!r}, os.O_RDONLY)
fcntl.lockf(fd, fcntl.LOCK_SH, 1, 120)  # SQLite's WAL write lock byte
print("held", flush=True)
time.sleep(30)
""")
        try:
            assert locker.stdout is not None and locker.stdout.readline() == ""
            (m.path("vm1", "snapshot")).write_text("incremental\n")
            assert "state: succeeded" in m.path("vm1", "snapshot").read_text()
        finally:
            locker.kill()
            locker.wait()
            _, err = locker.communicate()
        assert "Permission denied" in err, err
        assert wrong_modes(repo, 0o2750, 0o640, gid) == {}
        m.stop()
    finally:
        m.cleanup()


def test_unknown_group_is_refused(open_tmp: Path) -> None:
    repo = open_tmp / "repo"
    proc = cli("init", repo, "--group", "bfs-no-such-group", check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode().splitlines() == [
        "backupfs: error: unknown group 'bfs-no-such-group': create it first (groupadd), or give an existing one"]
    assert not repo.exists()


@pytest.mark.parametrize("unit", ["backupfs@.service", "backupfs-snapshot@.service"])
def test_units_run_with_a_private_umask(unit: str) -> None:
    section = ""
    settings = []
    for line in (SCRIPTS / unit).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and not line.startswith("#") and "=" in line:
            settings.append(line)
    assert "UMask=0077" in settings
