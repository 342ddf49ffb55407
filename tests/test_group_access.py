"""A backup-operator group given read access to a mount (`-o allow_group=G`,
`-o gid=G,umask=027`), tried by real users against a real mount.

The users act through `setpriv` in a subprocess, as an operator's shell
would: a member of the group (by a supplementary group, as `useradd -G`
makes one), an outsider, and for the guest files a member whose uid
happens to be a guest user's.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.commands import cli
from tests.guestdisks import mbr_disk
from tests.mounts import Mounted

pytestmark = pytest.mark.mount

MiB = 1024 * 1024


@dataclass(frozen=True)
class Operators:
    """A group, a member of it (a supplementary group: its primary group is
    its own) and a user outside it, all made for one test."""

    group: str
    gid: int
    member: str
    outsider: str


@pytest.fixture
def operators() -> Iterator[Operators]:
    import grp

    tag = os.getpid() % 100000
    group, member, outsider = f"bfsops{tag}", f"bfsmem{tag}", f"bfsout{tag}"
    made: list[tuple[str, str]] = []
    try:
        subprocess.run(["groupadd", group], check=True, capture_output=True)
        made.append(("groupdel", group))
        for name, extra in ((member, ["-G", group]), (outsider, [])):
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *extra, name],
                           check=True, capture_output=True)
            made.append(("userdel", name))
        yield Operators(group, grp.getgrnam(group).gr_gid, member, outsider)
    finally:
        for tool, name in reversed(made):
            subprocess.run([tool, name], capture_output=True)


def as_user(user: str, *cmd: str | os.PathLike[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` as ``user`` with the groups the group database gives them."""
    return as_ids(["--reuid", user, "--regid", user, "--init-groups"], *cmd, stdin=stdin)


def as_ids(ids: list[str], *cmd: str | os.PathLike[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the credentials ``setpriv`` options ``ids`` give."""
    return subprocess.run(["setpriv", *ids, *map(str, cmd)], input=stdin, capture_output=True, timeout=60)


def denied(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode != 0 and b"Permission denied" in proc.stderr


def _mounted_with_a_backup(tmp_path: Path, open_tmp: Path, options: str) -> tuple[Mounted, bytes]:
    """A repository with one 4 MiB device and one full backup, mounted with
    ``options`` where other users can reach the mount point; the source's bytes."""
    data = os.urandom(4 * MiB)
    src = tmp_path / "vm1.img"
    src.write_bytes(data)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    cli("backup", repo, "vm1", "full")
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    m = Mounted(repo, mnt, options=options)
    m.start()
    return m, data


def _backup_count(m: Mounted) -> int:
    return len([n for n in os.listdir(m.path("vm1", "backups")) if n != "latest"])


def test_allow_group_members_read_and_nobody_else_gets_in(
        tmp_path: Path, open_tmp: Path, operators: Operators) -> None:
    m, data = _mounted_with_a_backup(tmp_path, open_tmp, f"allow_group={operators.group}")
    try:
        vm1 = m.path("vm1")
        for _ in os.walk(m.mnt):  # the owner walks first: the kernel caches the names
            pass
        backup = vm1 / "backups" / "latest"
        # A member reads the backups, the chain, the job status and the xattrs.
        read = as_user(operators.member, "cat", backup)
        assert read.returncode == 0, read.stderr
        assert hashlib.sha256(read.stdout).digest() == hashlib.sha256(data).digest()
        chain = as_user(operators.member, "cat", vm1 / "chain")
        assert chain.returncode == 0 and b" full " in chain.stdout, chain
        status = as_user(operators.member, "cat", vm1 / "snapshot")
        assert status.returncode == 0 and b"state:" in status.stdout, status
        kind = as_user(operators.member, "getfattr", "--only-values", "-n", "user.backupfs.kind", backup)
        assert kind.returncode == 0 and kind.stdout == b"full", kind
        # ...but neither starts a backup nor touches the live device.
        assert denied(as_user(operators.member, "sh", "-c", f"echo full > {vm1 / 'snapshot'}"))
        assert denied(as_user(operators.member, "dd", "if=/dev/zero", f"of={vm1 / 'device'}", "bs=4096",
                              "count=1", "conv=notrunc"))
        assert denied(as_user(operators.member, "cat", vm1 / "device"))
        assert _backup_count(m) == 1
        assert (tmp_path / "vm1.img").read_bytes() == data
        # An outsider gets nothing, on the paths the owner's walk left cached too.
        for cmd in (["ls", m.mnt], ["ls", vm1 / "backups"], ["stat", vm1 / "chain"], ["cat", vm1 / "chain"],
                    ["cat", backup], ["getfattr", "-d", backup], ["cat", vm1 / "snapshot"]):
            assert denied(as_user(operators.outsider, *cmd)), cmd
        # The options are recorded: `mount` with no arguments and `status` show them.
        listed = cli("mount").stdout.decode()
        assert f"on {m.mnt} (daemon pid {m.pid}; nosuid,nodev,allow_group={operators.group})" in listed, listed
        status_text = cli("status", m.repo).stdout.decode()
        assert f"-o allow_group={operators.group})" in status_text, status_text
        m.stop()
    finally:
        m.cleanup()


def test_allow_group_is_checked_by_the_daemon_whatever_the_modes(
        tmp_path: Path, open_tmp: Path, operators: Operators) -> None:
    """umask=000 shows every file readable by all: the kernel would let an
    outsider in, the daemon does not. A process whose primary group is the
    group (sg, newgrp) is a member too."""
    m, data = _mounted_with_a_backup(tmp_path, open_tmp, f"allow_group={operators.group},umask=000")
    try:
        backup = m.path("vm1", "backups", "latest")
        assert os.stat(m.path("vm1", "chain")).st_mode & 0o777 == 0o444
        assert os.stat(m.path("vm1")).st_gid == operators.gid
        for cmd in (["ls", m.mnt], ["cat", m.path("vm1", "chain")], ["cat", backup]):
            assert denied(as_user(operators.outsider, *cmd)), cmd
        primary = as_ids(["--reuid", operators.outsider, "--regid", str(operators.gid), "--clear-groups"],
                         "cat", backup)
        assert primary.returncode == 0 and primary.stdout == data, primary.stderr
        m.stop()
    finally:
        m.cleanup()


def test_gid_and_umask_let_the_kernel_keep_others_out(
        tmp_path: Path, open_tmp: Path, operators: Operators) -> None:
    m, data = _mounted_with_a_backup(tmp_path, open_tmp, f"gid={operators.group},umask=027")
    try:
        vm1 = m.path("vm1")
        modes = {name: (os.lstat(vm1 / name).st_mode & 0o7777, os.lstat(vm1 / name).st_gid)
                 for name in ("backups", "chain", "device", "snapshot")}
        assert modes == {"backups": (0o750, operators.gid), "chain": (0o440, operators.gid),
                         "device": (0o600, operators.gid), "snapshot": (0o640, operators.gid)}, modes
        assert os.lstat(vm1 / "backups" / "latest").st_mode & 0o777 == 0o777  # a symlink's mode is not masked
        read = as_user(operators.member, "cat", vm1 / "backups" / "latest")
        assert read.returncode == 0 and read.stdout == data, read.stderr
        for cmd in (["ls", m.mnt], ["cat", vm1 / "chain"], ["stat", vm1 / "backups"]):
            assert denied(as_user(operators.outsider, *cmd)), cmd
        assert denied(as_user(operators.member, "sh", "-c", f"echo full > {vm1 / 'snapshot'}"))
        assert _backup_count(m) == 1
        m.stop()
    finally:
        m.cleanup()


def test_members_read_a_guests_files_by_what_the_guest_lets_everyone_read(
        tmp_path: Path, open_tmp: Path, operators: Operators) -> None:
    """A member whose uid is 1000, as the guest's alice is, does not get
    alice's 0600 notes or her 0700 home: a guest's uids name people on
    another system. What the guest lets everyone read, members read; with
    files_owner_only they get into no backup's files at all."""
    disk = mbr_disk(tmp_path)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", disk.image)
    cli("backup", repo, "vm", "full")
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    as_alice = ["--reuid", "1000", "--regid", "1000", "--groups", str(operators.gid)]
    for options, files_open in ((f"allow_group={operators.group}", True),
                                (f"allow_group={operators.group},files_owner_only", False)):
        m = Mounted(repo, mnt, options=options)
        m.start()
        try:
            p1 = mnt / "vm" / "files" / "latest" / "p1"
            alice = p1 / "home" / "alice"
            assert (alice / "notes.txt").read_bytes().startswith(b"remember")  # the owner (root) reads it
            hostname = as_ids(as_alice, "cat", p1 / "etc" / "hostname")
            assert (hostname.returncode == 0) == files_open, hostname.stderr
            if files_open:
                assert hostname.stdout == b"guest\n"
            # 0644, but in alice's 0700 home: out of reach, on the path the owner left cached too.
            assert (alice / "with space.txt").read_bytes() == b"a name with spaces\n"
            for cmd in (["cat", alice / "notes.txt"], ["ls", alice], ["getfattr", "-d", alice],
                        ["cat", alice / "with space.txt"]):
                assert denied(as_ids(as_alice, *cmd)), (options, cmd)
            # The backup itself stays the group's: every byte of the disk.
            assert as_ids(as_alice, "cmp", mnt / "vm" / "backups" / "latest", "-",
                          stdin=disk.image.read_bytes()).returncode == 0
            m.stop()
        finally:
            m.cleanup()
