"""A source is held by its identity (SPEC 7): a path that now leads elsewhere is refused.

The attack: the source lies in a directory another user can write (their
own VM image, say). They replace it with a symlink to a disk they may not
read, or to /dev/null, and wait for root's next backup to copy that disk
into the repository, or for a `restore --force` to overwrite it. Every way
in is checked: a backup run directly, the mount's device file and trigger,
a restore over the source. An `mv new.img src.img` is refused the same way
until `device add --replace` rebinds the device on purpose; the next backup
then scans, and holds what qemu-img says the new file holds.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
from pathlib import Path

import pytest

from tests.commands import cli, sh
from tests.mounts import Mounted
from tests.oracle import qemu_compare
from tests.users import OtherUser
from engine.catalog import Catalog

MiB = 1024 * 1024
SIZE = 4 * MiB


def _random_file(path: Path, seed: int) -> None:
    path.write_bytes(random.Random(seed).randbytes(SIZE))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _backup_ids(repo: Path) -> list[str]:
    out = cli("list", repo).stdout.decode().splitlines()[1:]
    return [line.split("\t")[0] for line in out]


def _latest_image(repo: Path) -> Path:
    return repo / "devices" / "vm1" / f"{_backup_ids(repo)[-1]}.qcow2"



@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A disk only root can reach (tmp_path is root's, 0700)."""
    path = tmp_path / "secret.raw"
    _random_file(path, 99)
    path.chmod(0o600)
    return path


def _one_line(proc: object) -> str:
    err = proc.stderr.decode()  # type: ignore[attr-defined]
    assert proc.returncode == 1 and err.count("\n") == 1, err  # type: ignore[attr-defined]
    return err


@pytest.mark.mount
def test_a_source_replaced_by_another_users_symlink_is_never_read_or_written(
    tmp_path: Path, user_dir: Path, secret: Path, other_user: OtherUser
) -> None:
    src = user_dir / "vm.raw"
    _random_file(src, 1)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    cli("backup", repo, "vm1", "full")
    secret_sha = _sha(secret)

    proc = other_user.run("ln", "-sfn", secret, src)
    assert proc.returncode == 0 and src.is_symlink(), proc.stderr

    err = _one_line(cli("backup", repo, "vm1", "incremental", check=False))
    assert f"device vm1: source {src} now leads to a symlink (to {secret}) made by user {other_user.uid}" in err, err
    assert f"backupfs device add --replace {repo} vm1 {src}" in err, err
    assert len(_backup_ids(repo)) == 1
    # Forced, even: the restore does not write through it.
    err = _one_line(cli("restore", repo, "vm1", "latest", src, "--force", check=False))
    assert "is a symlink" in err, err
    assert _sha(secret) == secret_sha and src.is_symlink()
    # Nor rebinds to it on request.
    err = _one_line(cli("device", "add", "--replace", repo, "vm1", src, check=False))
    assert "is a symlink" in err, err

    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        proc = sh(f"dd if={m.path('vm1', 'device')} of=/dev/null bs=1M count=1 status=none", check=False)
        assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc.stderr
        proc = sh(f"echo incremental > {m.path('vm1', 'snapshot')}", check=False)
        assert proc.returncode != 0
        assert f"source {src} now leads to a symlink" in m.path("vm1", "snapshot").read_text()
        assert len(os.listdir(m.path("vm1", "backups"))) == 2  # the full and `latest`
    finally:
        m.cleanup()
    assert _sha(secret) == secret_sha
    assert len(_backup_ids(repo)) == 1


@pytest.mark.parametrize("leads_to", ["another file", "/dev/null"])
def test_a_source_path_that_leads_elsewhere_is_refused(tmp_path: Path, secret: Path, leads_to: str) -> None:
    """Even through a link root made (one backupfs would follow): what the
    path leads to is not the disk the device was bound to."""
    src = tmp_path / "vm.raw"
    _random_file(src, 2)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    cli("backup", repo, "vm1", "full")
    os.rename(src, tmp_path / "away.raw")
    os.symlink(secret if leads_to == "another file" else "/dev/null", src)
    found = f"the file with inode {secret.stat().st_ino}" if leads_to == "another file" else "a character device"

    for args in (("backup", repo, "vm1", "incremental"), ("status", repo)):
        proc = cli(*args, check=False)
        assert proc.returncode == 1, proc
        assert f"device vm1: source {src} now leads to {found}" in proc.stderr.decode() + proc.stdout.decode()
    assert len(_backup_ids(repo)) == 1
    if leads_to == "/dev/null":
        err = _one_line(cli("device", "add", "--replace", repo, "vm1", src, check=False))
        assert f"source {src} is not a regular file or block device: it is a character device" in err, err


def test_a_moved_in_source_is_refused_until_replace_then_scanned(tmp_path: Path) -> None:
    src = tmp_path / "vm.raw"
    _random_file(src, 3)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    cli("backup", repo, "vm1", "full")
    new = tmp_path / "new.raw"
    _random_file(new, 4)
    os.rename(new, src)  # mv new.raw vm.raw

    err = _one_line(cli("backup", repo, "vm1", "incremental", check=False))
    assert f"now leads to the file with inode {src.stat().st_ino}" in err and "--replace" in err, err
    assert len(_backup_ids(repo)) == 1

    # --replace keeps the size, and a source no other device has.
    (tmp_path / "small.raw").write_bytes(bytes(MiB))
    err = _one_line(cli("device", "add", "--replace", repo, "vm1", tmp_path / "small.raw", check=False))
    assert f"is {MiB} bytes but device vm1 is {SIZE}" in err, err
    err = _one_line(cli("device", "add", "--replace", repo, "nosuch", src, check=False))
    assert "no device named 'nosuch'" in err, err

    out = cli("device", "add", "--replace", repo, "vm1", src).stdout.decode()
    assert out.startswith(f"device vm1: source rebound to {src}"), out
    out = cli("backup", repo, "vm1", "incremental").stdout.decode()
    assert "scanned (bitmap untrusted: its source was rebound" in out, out
    qemu_compare(_latest_image(repo), src)
    out = cli("backup", repo, "vm1", "incremental").stdout.decode()
    assert "scanned" not in out, out  # held again: the bitmap is trusted


def test_a_symlink_root_made_where_another_user_can_change_it_is_not_followed(
    tmp_path: Path, user_dir: Path, secret: Path
) -> None:
    """Root's own link, but in the user's directory: they could point it
    elsewhere between the check and the open, so it is not followed."""
    link = user_dir / "disk.raw"
    link.symlink_to(secret)
    repo = tmp_path / "repo"
    cli("init", repo)
    err = _one_line(cli("device", "add", repo, "vm1", link, check=False))
    assert f"source {link} is a symlink (to {secret}) in {user_dir}, where another user can change it" in err, err
    assert not cli("device", "list", repo).stdout


def test_a_catalog_from_before_identities_records_one_at_the_next_open(tmp_path: Path) -> None:
    """Existing repositories: the column is added when the catalog is opened
    for writing, read as empty where it is only read, and a device without
    an identity is held by what its path leads to at its next open."""
    src = tmp_path / "vm.raw"
    _random_file(src, 5)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    cli("backup", repo, "vm1", "full")
    conn = sqlite3.connect(repo / "catalog.db")
    conn.execute("ALTER TABLE devices DROP COLUMN source_identity")  # as an older backupfs made it
    conn.commit()
    conn.close()

    old = Catalog.open(str(repo / "catalog.db"), readonly=True)
    try:
        [dev] = old.devices()
        assert dev.name == "vm1" and dev.identity is None
    finally:
        old.close()

    cli("backup", repo, "vm1", "incremental")  # opens the device: records what it holds
    conn = sqlite3.connect(repo / "catalog.db")
    [(held,)] = conn.execute("SELECT source_identity FROM devices").fetchall()
    conn.close()
    assert held == f"file {src.stat().st_dev} {src.stat().st_ino}"

    _random_file(tmp_path / "new.raw", 6)
    os.rename(tmp_path / "new.raw", src)
    err = _one_line(cli("backup", repo, "vm1", "incremental", check=False))
    assert "now leads to the file with inode" in err, err
