"""The files view and the history on a remote mount: `files/`, `changes/`, `versions/` over S3.

A repository whose device holds a real ext4 filesystem (a GPT disk, p1
ext4 made with mkfs.ext4 -d) is backed up twice, a file of the guest
changed and one added in between (debugfs, on the disk file), and pushed
to the real radosgw (the ``s3_remote`` fixture). The remote mount's
``files/``, ``changes/`` and ``versions/`` are walked with ordinary tools
and compared with a LOCAL mount of the same repository: every name, mode,
owner, time, size, symlink target, xattr and byte. Then an endpoint that
stops answering (a TCP relay of the test's own, stopped) while a guest
file is read gives EIO in bounded time, and the mount keeps listing; and
another user gets what a local mount gives them (allow_other,
files_owner_only).
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.commands import cli
from tests.guestdisks import Part, gpt_disk
from tests.guesttree import TreeSpec, default_tree, differences, plain, walk_view
from tests.s3remote import S3Remote
# The fixtures, used by name: one bucket for the module (read only), a relay in front of it.
from tests.test_remote_mount import Relay, RemoteMount, local_and_remote, relay, s3_remote  # noqa: F401
from tests.users import OtherUser

pytestmark = [pytest.mark.mount, pytest.mark.long]

MiB = 1 << 20
BLOB = random.Random(7).randbytes(16 * MiB)  # more than the smallest cache reads ahead (a quarter of it)
HOSTNAME = b"renamed-guest\n"


def _debugfs(image: Path, offset: int, commands: list[str], scratch: Path) -> None:
    """Change the ext4 filesystem at ``offset`` of ``image`` in place, as the guest would."""
    script = scratch / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    proc = subprocess.run(["debugfs", "-w", "-f", str(script), f"{image}?offset={offset}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stderr.lower().replace("debugfs 1.", ""), proc.stderr


@pytest.fixture(scope="module")
def guest_pushed(tmp_path_factory: pytest.TempPathFactory, s3_remote: S3Remote) -> tuple[Path, list[str]]:
    """A repository of a disk with an ext4 p1: a full, then an incremental after /etc/hostname
    was rewritten and /etc/new.conf added; pushed. Its backup ids, oldest first. Shared by
    the module's tests, which only read it (their mounts are read-only)."""
    tmp_path = tmp_path_factory.mktemp("guest_pushed")
    spec = TreeSpec(default_tree().entries + (plain("srv.bin", BLOB, mtime_ns=1_700_000_000_000_000_001),))
    disk = gpt_disk(tmp_path, parts=[Part(48 * MiB, "ext4")], spec=spec)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", disk.image)
    cli("backup", repo, "vm", "full")
    (tmp_path / "hostname").write_bytes(HOSTNAME)
    (tmp_path / "new.conf").write_bytes(b"setting = 1\n")
    _debugfs(disk.image, disk.volumes[0].offset,
             ["rm /etc/hostname", f"write {tmp_path / 'hostname'} /etc/hostname",
              "set_inode_field /etc/hostname mtime 20261201120000", f"write {tmp_path / 'new.conf'} /etc/new.conf"],
             tmp_path)
    cli("backup", repo, "vm", "incremental")
    cli("remote", "add", repo, "off", s3_remote.url)
    s3_remote.cli("push", repo, "off")
    ids = [b["id"] for b in json.loads(cli("list", repo, "vm", "--json").stdout)]
    assert len(ids) == 2
    return repo, ids


def _same_tree(local: Path, remote: Path) -> None:
    lines = differences(walk_view(local, "ext4"), walk_view(remote, "ext4"))
    assert not lines, "\n".join(lines)


def _refused(err: int, fn: object, *args: object) -> None:
    with pytest.raises(OSError) as caught:
        fn(*args)  # type: ignore[operator]
    assert caught.value.errno == err, caught.value


def test_remote_files_changes_and_versions_equal_the_local_mounts(guest_pushed: tuple[Path, list[str]],
                                                                   s3_remote: S3Remote, tmp_path: Path) -> None:
    repo, ids = guest_pushed
    with local_and_remote(repo, s3_remote, tmp_path) as (local, remote):
        lv, rv = local.mnt / "vm", remote.mnt / "vm"
        assert sorted(os.listdir(rv)) == ["backups", "chain", "changes", "files", "versions"]
        assert sorted(os.listdir(rv / "files")) == sorted(ids + ["latest"])
        assert os.readlink(rv / "files" / "latest") == ids[-1]
        for ident in ids:
            assert (rv / "files" / ident / "volumes").read_bytes() == (lv / "files" / ident / "volumes").read_bytes()
            assert sorted(os.listdir(rv / "files" / ident)) == ["p1", "volumes"]
            _same_tree(lv / "files" / ident / "p1", rv / "files" / ident / "p1")
        # The guest's own, named: what changed in the incremental, and what did not.
        newest = rv / "files" / "latest" / "p1"
        assert (newest / "etc" / "hostname").read_bytes() == HOSTNAME
        assert (rv / "files" / ids[0] / "p1" / "etc" / "hostname").read_bytes() == b"guest\n"
        for rel in ("etc/hostname", "etc/new.conf", "home/alice/notes.txt", "usr/bin/big.bin"):
            r, l = os.lstat(newest / rel), os.lstat(lv / "files" / "latest" / "p1" / rel)
            assert (r.st_mode, r.st_uid, r.st_gid, r.st_size, r.st_mtime_ns) == \
                   (l.st_mode, l.st_uid, l.st_gid, l.st_size, l.st_mtime_ns), rel
        assert os.readlink(newest / "usr" / "bin" / "absolute-link") == "/etc/hostname"
        assert sorted(os.listdir(newest / "home" / "alice")) == \
               sorted(os.listdir(lv / "files" / "latest" / "p1" / "home" / "alice"))
        assert os.getxattr(newest / "home" / "alice" / "notes.txt", "user.comment") == b"shopping"
        # History: the incremental's changes, and every version of the rewritten file.
        changes = (rv / "changes" / ids[1]).read_bytes()
        assert changes == (lv / "changes" / ids[1]).read_bytes()
        assert b"M\tp1/etc/hostname\n" in changes and b"A\tp1/etc/new.conf\n" in changes
        assert (rv / "changes" / ids[0]).read_bytes() == b""
        versions = rv / "versions" / "p1" / "etc" / "hostname"
        assert sorted(os.listdir(versions)) == sorted(os.listdir(lv / "versions" / "p1" / "etc" / "hostname")) == ids
        assert (versions / ids[0]).read_bytes() == b"guest\n" and (versions / ids[1]).read_bytes() == HOSTNAME
        # Read-only, whatever is tried.
        hostname = newest / "etc" / "hostname"
        _refused(errno.EROFS, os.open, hostname, os.O_WRONLY)
        _refused(errno.EROFS, os.mkdir, newest / "new")
        _refused(errno.EROFS, os.unlink, hostname)
        _refused(errno.EROFS, os.setxattr, hostname, "user.x", b"1")
        _refused(errno.EROFS, os.open, versions / ids[0], os.O_RDWR)
        # `backupfs mount` lists the remote mount: its URL, where, its daemon.
        listing = s3_remote.cli("mount").stdout
        [line] = [ln for ln in listing.splitlines() if ln.startswith(s3_remote.url + " ")]
        assert f" on {remote.mnt} (daemon pid {remote.pid}; nosuid,nodev,ro," in line, line
        remote.stop()
        local.stop()
        assert "Traceback" not in remote.log()


def test_a_guest_file_read_from_a_remote_that_stops_answering_is_eio(guest_pushed: tuple[Path, list[str]],
                                                                       s3_remote: S3Remote, tmp_path: Path,
                                                                       relay: Relay) -> None:
    """The smallest cache (16M) reads at most 4M ahead: the open parses the filesystem
    through the relay, and most of the 16M file is still to be fetched when it stops."""
    _, ids = guest_pushed
    remote = RemoteMount(s3_remote, tmp_path / "remote", tmp_path / "cache", options="cache_size=16M",
                         endpoint=f"http://127.0.0.1:{relay.port}", read_timeout=2)
    try:
        remote.start()
        with open(remote.mnt / "vm" / "files" / ids[0] / "p1" / "srv.bin", "rb") as f:
            relay.stop()
            started = time.monotonic()
            with pytest.raises(OSError) as e:
                f.read()
            assert e.value.errno == errno.EIO
            assert time.monotonic() - started < 60
        # The mount still serves what needs no GET, and what its cache holds.
        assert sorted(os.listdir(remote.mnt / "vm" / "files")) == sorted(ids + ["latest"])
        assert sorted(os.listdir(remote.mnt / "vm" / "files" / ids[0])) == ["p1", "volumes"]
        remote.stop()
        assert "Traceback" not in remote.log()
    finally:
        remote.cleanup()


def test_a_guest_directory_listed_from_a_remote_that_trickles_is_eio_in_bounded_time(
        guest_pushed: tuple[Path, list[str]], s3_remote: S3Remote, tmp_path: Path, relay: Relay) -> None:
    """An endpoint that answers a byte at a time, each within the read timeout, never
    times a GET out by itself: a cold guest listing (the backup's chain and its
    filesystem fetched) must still end in EIO in bounded time, the mount still answering
    what needs no GET meanwhile."""
    _, ids = guest_pushed
    remote = RemoteMount(s3_remote, tmp_path / "remote", tmp_path / "cache", options="cache_size=16M",
                         endpoint=f"http://127.0.0.1:{relay.port}", read_timeout=2)
    p1 = remote.mnt / "vm" / "files" / ids[0] / "p1"
    outcome: list[BaseException | list[str]] = []

    def listing() -> None:
        try:
            outcome.append(os.listdir(p1))
        except OSError as e:
            outcome.append(e)

    lister = threading.Thread(target=listing, daemon=True)
    try:
        remote.start()
        relay.trickling.set()
        started = time.monotonic()
        lister.start()
        assert sorted(os.listdir(remote.mnt / "vm" / "files")) == sorted(ids + ["latest"])
        lister.join(120)
        assert not lister.is_alive(), "a guest listing from a trickling remote still waits after 120 s"
        [result] = outcome
        assert isinstance(result, OSError) and result.errno == errno.EIO, result
        assert time.monotonic() - started < 120
        relay.stop()  # ends the trickled answers: the daemon's GETs return, and it can exit
        remote.stop()
        assert "Traceback" not in remote.log()
    finally:
        relay.stop()
        if lister.ident is not None:
            lister.join(60)
        remote.cleanup()


def test_other_users_get_the_guests_other_bits_and_files_owner_only_keeps_them_out(
        guest_pushed: tuple[Path, list[str]], s3_remote: S3Remote, tmp_path: Path, other_user: OtherUser,
        open_tmp: Path) -> None:
    """As on a local mount (tests/test_files_mount.py): with allow_other a world-readable
    guest file reads and alice's 0600 notes do not, whatever the caller's uid; with
    files_owner_only nobody but the mount's owner gets into files/, changes/, versions/."""
    _, ids = guest_pushed
    for options, readable in (("allow_other", True), ("allow_other,files_owner_only", False)):
        remote = RemoteMount(s3_remote, open_tmp / "mnt", tmp_path / "cache", options=options)
        try:
            remote.start()
            p1 = remote.mnt / "vm" / "files" / ids[0] / "p1"
            hostname = other_user.run("cat", p1 / "etc" / "hostname")
            assert (hostname.returncode == 0) == readable, hostname.stderr
            if readable:
                assert hostname.stdout == "guest\n"
            notes = other_user.run("cat", p1 / "home" / "alice" / "notes.txt")
            assert notes.returncode != 0 and "Permission denied" in notes.stderr
            changes = other_user.run("cat", remote.mnt / "vm" / "changes" / ids[1])
            assert (changes.returncode == 0) == readable, changes.stderr
            assert (p1 / "etc" / "hostname").read_bytes() == b"guest\n"  # the owner (root) always
            remote.stop()
        finally:
            remote.cleanup()
