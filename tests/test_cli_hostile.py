"""Bad input to the command line: a clear line, a non-zero exit, and nothing lost.

Each case here was found by a sweep of every subcommand with hostile
arguments and repositories; each failed before its fix (data destroyed,
a file outside the repository overwritten, a hang, or "internal error").
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from engine.qcow2.layers import DATA, open_layer

from tests.commands import backupfs_cmd, cli, repo_with_a_full
from tests.mounts import Mounted
from tests.oracle import qemu_img, qemu_io
from tests.users import OtherUser

KiB = 1024
MiB = 1024 * KiB


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(*args: str | bytes | os.PathLike[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """`backupfs ARGS` with raw (maybe non-UTF-8) arguments; never a traceback."""
    proc = subprocess.run(backupfs_cmd() + [os.fsencode(a) if not isinstance(a, bytes) else a for a in args],
                          capture_output=True, timeout=timeout)
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err and "internal error" not in err, err
    return proc


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        f.write(os.urandom(2 * MiB))
    return repo_with_a_full(tmp_path / "repo", "vm1", src)


def _images(repo_dir: Path) -> list[Path]:
    return sorted((repo_dir / "devices" / "vm1").glob("*.qcow2"))


def test_restore_into_the_repository_is_refused(repo_dir: Path, tmp_path: Path) -> None:
    image = _images(repo_dir)[0]
    before = _sha(image)
    proc = _run("restore", repo_dir, "vm1", "latest", image, "--force")
    assert proc.returncode != 0 and b"lies inside the repository" in proc.stderr
    assert _sha(image) == before
    cli("verify", repo_dir)


def test_a_failed_restore_leaves_the_old_file_as_it_was(repo_dir: Path, tmp_path: Path) -> None:
    image = _images(repo_dir)[0]
    with open_layer(str(image), "qcow2") as layer:
        host = next(e.host for e in layer.allocation() if e.kind == DATA)
    with open(image, "r+b") as f:  # damage one stored cluster
        f.seek(host + 100)
        f.write(b"\xff" * 16)
    precious = tmp_path / "precious.raw"
    precious.write_bytes(os.urandom(MiB))
    os.chmod(precious, 0o640)
    before = _sha(precious)
    proc = _run("restore", repo_dir, "vm1", "latest", precious, "--force")
    assert proc.returncode != 0 and b"fails its checksum" in proc.stderr
    assert _sha(precious) == before and (precious.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir() if ".restoring" in p.name) == []


def test_a_restore_over_a_file_keeps_its_mode_and_replaces_it_whole(repo_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "old.raw"
    target.write_bytes(b"x" * 3 * MiB)
    os.chmod(target, 0o640)
    os.link(target, tmp_path / "other-name.raw")
    cli("restore", repo_dir, "vm1", "latest", target, "--force")
    assert _sha(target) == _sha(tmp_path / "src.raw")
    assert (target.stat().st_mode & 0o777) == 0o640
    # Replaced whole: a new file took the name, the old one is untouched under its other name.
    assert (tmp_path / "other-name.raw").read_bytes() == b"x" * 3 * MiB


@pytest.mark.mount
def test_symlinks_in_the_repository_are_not_written_through(repo_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("important data\n")
    os.unlink(repo_dir / "lock")
    os.symlink(victim, repo_dir / "lock")
    proc = _run("list", repo_dir)
    assert proc.returncode != 0 and b"symlink" in proc.stderr
    assert victim.read_text() == "important data\n"

    os.unlink(repo_dir / "lock")
    for planted in ("mount.json", "mount.json.tmp"):
        os.symlink(victim, repo_dir / planted)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo_dir, tmp_path / "mnt")
    try:
        # The record is written beside its name and renamed over it: the
        # planted links are replaced, never written through.
        m.start()
        assert not (repo_dir / "mount.json").is_symlink()
        assert "vm1" in cli("list", repo_dir).stdout.decode()
    finally:
        m.cleanup()
    assert victim.read_text() == "important data\n"


def test_a_catalog_from_elsewhere_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    for version, message in (("2", b"newer than this backupfs"), ("2.0", b"not one backupfs knows")):
        repo_dir = tmp_path / f"r{version}"
        repo_dir.mkdir()
        conn = sqlite3.connect(repo_dir / "catalog.db")
        conn.execute("CREATE TABLE meta(key, value)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version,))
        conn.commit()
        conn.close()
        before = _sha(repo_dir / "catalog.db")
        proc = _run("list", repo_dir)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert _sha(repo_dir / "catalog.db") == before  # not switched to WAL behind the refusal


def test_one_source_under_two_names_is_refused(repo_dir: Path, tmp_path: Path) -> None:
    """Two names for one disk: backed up twice, and each name's writes
    look like another program's to the other."""
    os.symlink(tmp_path / "src.raw", tmp_path / "alias.raw")
    os.link(tmp_path / "src.raw", tmp_path / "hardlink.raw")
    for path in ("src.raw", "alias.raw", "hardlink.raw"):
        proc = cli("device", "add", repo_dir, "vm2", tmp_path / path, check=False)
        assert proc.returncode == 1, proc
        assert proc.stderr.decode().strip() == (
            f"backupfs: error: source {tmp_path / path} is already the source of device vm1")
    (tmp_path / "other.raw").write_bytes(bytes(MiB))
    cli("device", "add", repo_dir, "vm2", tmp_path / "other.raw")


def test_device_remove_deletes_backups_only_with_force(repo_dir: Path, tmp_path: Path) -> None:
    proc = cli("device", "remove", repo_dir, "vm1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == (
        "backupfs: error: device vm1 has 1 backup; removing it deletes them all (use --force)")
    assert len(list((repo_dir / "devices" / "vm1").glob("*.qcow2"))) == 1  # nothing was touched
    assert b"vm1" in cli("list", repo_dir).stdout
    assert cli("device", "remove", repo_dir, "vm1", "--force").stdout == b"removed device vm1 and its 1 backup\n"
    assert not (repo_dir / "devices" / "vm1").exists() and b"vm1" not in cli("device", "list", repo_dir).stdout
    (tmp_path / "new.raw").write_bytes(bytes(MiB))
    cli("device", "add", repo_dir, "fresh", tmp_path / "new.raw")
    assert cli("device", "remove", repo_dir, "fresh").stdout == b"removed device fresh\n"  # no backups: no --force
    proc = cli("device", "remove", repo_dir, "fresh", check=False)
    assert proc.returncode == 1 and b"no device named 'fresh'" in proc.stderr


def test_a_fifo_is_refused_as_a_source_without_hanging(repo_dir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = _run("device", "add", repo_dir, "d2", fifo, timeout=30)
    assert proc.returncode != 0 and b"not a regular file or block device" in proc.stderr
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "8M")
    proc = _run("import", repo_dir, "d3", base, "--source", fifo, timeout=30)
    assert proc.returncode != 0 and b"not a regular file or block device" in proc.stderr
    assert not (repo_dir / "devices" / "d2").exists() and not (repo_dir / "devices" / "d3").exists()


def test_names_labels_and_sizes_are_checked_before_anything_is_done(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    proc = _run("device", "add", repo_dir, "nl\n", src)
    assert proc.returncode != 0 and b"invalid device name" in proc.stderr
    for label in (b"line1\nFAKEID\tvm1\tfull", b"bad\xff"):
        proc = _run("backup", repo_dir, "vm1", "incremental", "--label", label)
        assert proc.returncode != 0 and b"label must be printable" in proc.stderr
    proc = _run("backup", repo_dir, "vm1", "incremental", "--rate", "100")
    assert proc.returncode != 0 and b"--rate must be at least 1M" in proc.stderr
    assert len(cli("list", repo_dir, "vm1").stdout.decode().splitlines()) == 2  # header and the full
    proc = _run("device", "add", repo_dir, "x", src, "--granularity", "9" * 400)
    assert proc.returncode != 0 and b"too large" in proc.stderr
    proc = _run("device", "add", repo_dir, "x", src, "--granularity", "99999999999999999999T")
    assert proc.returncode != 0
    for args in (("list", repo_dir, b"\xff"), ("verify", repo_dir, b"\xff"), ("backup", repo_dir, b"\xff", "full"),
                 ("prune", repo_dir, "vm1", "--remove", b"\xff")):
        proc = _run(*args)
        assert proc.returncode != 0, args
    odd = tmp_path / os.fsdecode(b"src\xff.raw")
    odd.write_bytes(bytes(MiB))
    proc = _run("device", "add", repo_dir, "nb", odd)
    assert proc.returncode != 0 and b"not valid UTF-8" in proc.stderr
    assert not (repo_dir / "devices" / "nb").exists()


def test_status_shows_every_device_when_one_source_is_missing(repo_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    with open(other, "wb") as f:
        f.truncate(MiB)
    cli("device", "add", repo_dir, "zz", other)
    os.unlink(tmp_path / "src.raw")
    proc = _run("status", repo_dir)
    out = proc.stdout.decode()
    assert proc.returncode == 1
    assert "vm1:" in out and "does not exist" in out
    assert "zz:" in out and "bitmap: trusted" in out


def test_a_failed_import_leaves_nothing(repo_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 1 0 2M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -c -P 3 8M 64k")
    data = bytearray(top.read_bytes())
    for i in range(len(data) - 4096, len(data)):  # the compressed cluster is last
        data[i] ^= 0x5A
    top.write_bytes(bytes(data))
    proc = _run("import", repo_dir, "part", top)
    assert proc.returncode != 0
    assert "part" not in cli("device", "list", repo_dir).stdout.decode()
    assert not (repo_dir / "devices" / "part").exists()
    inside = repo_dir / "inside.raw"
    with open(inside, "wb") as f:
        f.truncate(16 * MiB)
    proc = _run("import", repo_dir, "y", base, "--source", inside)
    assert proc.returncode != 0 and b"lies inside the repository" in proc.stderr


@pytest.mark.mount
def test_a_mount_point_with_a_non_ascii_name(repo_dir: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt\u00e9"
    mnt.mkdir()
    m = Mounted(repo_dir, mnt)
    try:
        m.start()
        # Commands go through the mount (not "in use by pid N"), and umount finds it.
        assert "vm1" in cli("list", repo_dir).stdout.decode()
        cli("backup", repo_dir, "vm1", "incremental", "--allow-empty")
        cli("umount", mnt)
        m.pid = None
    finally:
        m.cleanup()
    assert len(cli("list", repo_dir, "vm1").stdout.decode().splitlines()) == 3


@pytest.mark.mount
def test_a_full_disk_gives_a_clear_line_and_no_half_made_repository(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        cli("init", small / "early")
        filler = small / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(bytes(64 * KiB))
                    f.flush()
            except OSError:
                pass
        proc = _run("init", small / "repo")
        assert proc.returncode == 1 and b"cannot create a repository" in proc.stderr, proc.stderr
        assert not (small / "repo").exists()
        filler.unlink()
        cli("init", small / "repo")  # once there is room, the same directory is new again
        cli("list", small / "repo")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_closed_standard_streams(tmp_path: Path) -> None:
    image = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", image, "1M")
    cmd = " ".join(backupfs_cmd())
    for sub in ("image info", "image cat"):
        proc = subprocess.run(["bash", "-c", f"{cmd} {sub} {image} >&-"], capture_output=True, text=True)
        assert proc.returncode == 1 and "standard output is closed" in proc.stderr, proc.stderr
        assert "internal error" not in proc.stderr
    proc = subprocess.run(["bash", "-c", f"{cmd} image info {image} 2>&-"], capture_output=True, text=True)
    assert proc.returncode == 0 and f"image: {image}" in proc.stdout


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4 * KiB))
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.mark.long
@pytest.mark.mount
def test_a_full_repository_disk_still_lists_verifies_and_restores(tmp_path: Path) -> None:
    """The disk filled up (that is when backups start failing): the operator
    can still see, check and restore every backup, and whatever must record
    something says the disk is full. Before, SQLite's missing -shm file made
    every command fail, `status` stopped at the first device, `mount` said
    "internal error", and a bitmap temp file was left behind."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        src = tmp_path / "src.raw"  # the source lives elsewhere; the repository fills up
        src.write_bytes(os.urandom(2 * MiB))
        repo_dir = small / "repo"
        cli("init", repo_dir)
        cli("device", "add", repo_dir, "vm1", src)
        cli("backup", repo_dir, "vm1", "full")
        with open(src, "r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(64 * KiB))
        cli("backup", repo_dir, "vm1", "incremental", "--scan")
        state = {p.name: _sha(p) for p in sorted((repo_dir / "devices" / "vm1").iterdir())}
        assert not list(repo_dir.glob("catalog.db-*"))  # closed cleanly: SQLite must make them to read
        _fill(small / "filler")

        listing = _run("list", repo_dir)
        assert listing.returncode == 0 and len(listing.stdout.decode().splitlines()) == 3, listing.stderr
        status = _run("status", repo_dir)
        assert status.returncode == 0 and b"bitmap: trusted" in status.stdout, status.stderr
        assert _run("verify", repo_dir).returncode == 0
        restored = tmp_path / "restored.raw"
        assert _run("restore", repo_dir, "vm1", "latest", restored).returncode == 0
        assert _sha(restored) == _sha(src)
        assert _run("prune", repo_dir, "vm1", "--keep-last", "1", "--dry-run").returncode == 0
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        for args in (("backup", repo_dir, "vm1", "incremental"), ("prune", repo_dir, "vm1", "--keep-last", "1"),
                     ("device", "add", repo_dir, "vm2", src), ("mount", repo_dir, mnt)):
            proc = _run(*args)
            assert proc.returncode == 1 and b"disk is full" in proc.stderr, (args, proc.stderr)
        # Nothing changed or was left behind.
        assert {p.name: _sha(p) for p in sorted((repo_dir / "devices" / "vm1").iterdir())} == state
        assert _run("image", "check", repo_dir / "devices" / "vm1" / sorted(state)[0]).returncode == 0

        (small / "filler").unlink()  # room again: everything works, nothing was lost
        cli("backup", repo_dir, "vm1", "incremental", "--allow-empty")
        assert len(cli("list", repo_dir).stdout.decode().splitlines()) == 4
        cli("verify", repo_dir)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.mount
def test_a_mount_point_that_is_another_users_symlink_is_refused(tmp_path: Path, open_tmp: Path,
                                                                 other_user: OtherUser) -> None:
    """Followed, a link someone else made has root mount the repository over
    the directory of their choosing, hiding it; an administrator's link
    (root's, in a directory only root can change) is still followed."""
    repo = tmp_path / "repo"
    cli("init", repo)
    hidden = tmp_path / "root-only"
    hidden.mkdir(mode=0o700)
    (hidden / "keep").write_text("hidden by a mount on top\n")
    theirs = open_tmp / "user"
    theirs.mkdir()
    os.chown(theirs, other_user.uid, other_user.gid)
    link = theirs / "mnt"
    assert other_user.run("ln", "-s", hidden, link).returncode == 0
    try:
        for given in (link, f"{link}/"):
            proc = cli("mount", repo, given, check=False)
            err = proc.stderr.decode()
            assert proc.returncode != 0 and f"mount point {given} is a symlink (to {hidden}) that another user" in err, err
            assert not os.path.ismount(hidden)
    finally:
        Mounted(repo, hidden).cleanup()
    assert (hidden / "keep").read_text() == "hidden by a mount on top\n"

    mine = tmp_path / "link"  # root's link in root's directory: followed
    mine.symlink_to(hidden)
    m = Mounted(repo, hidden)
    try:
        cli("mount", repo, mine)
        assert os.path.ismount(hidden)
        m.pid = int(__import__("json").loads((repo / "mount.json").read_text())["pid"])
        m.stop()
    finally:
        m.cleanup()
