"""Recovery removes only what backupfs recorded it was making.

Opening a repository used to delete every *.qcow2, *.sums and *.tmp under
devices/ that the catalog did not name, following symlinks: a user's QEMU
overlay kept beside the backups vanished at `list`, and a device directory
replaced by a symlink made `list` delete files elsewhere. Now work records
its files (intents) before it makes them, recovery removes exactly those,
never through a symlink, and commands that only read delete nothing.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine.catalog import Catalog
from engine.repo import Repository

from tests.commands import cli, repo_with_a_full
from tests.mounts import Mounted
from tests.oracle import qemu_img

MiB = 1024 * 1024


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """A repository with device vm (8 MiB source) and one full backup."""
    src = tmp_path / "vm.img"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        f.write(os.urandom(MiB))
    return repo_with_a_full(tmp_path / "repo", "vm", src)


def _user_files(d: Path) -> dict[str, bytes]:
    """Files a user might keep beside backups: a QEMU overlay, notes, a temp file."""
    qemu_img("create", "-q", "-f", "qcow2", str(d / "user.qcow2"), "1M")
    (d / "notes.sums").write_bytes(b"my notes\n")
    (d / "scratch.tmp").write_bytes(b"mine\n")
    (d / ".tmp-mine.qcow2").write_bytes(b"mine too\n")
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name in
            ("user.qcow2", "notes.sums", "scratch.tmp", ".tmp-mine.qcow2")}


def _still_there(d: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (d / name).read_bytes() == data, name


@pytest.mark.mount
def test_user_files_beside_backups_survive(repo_dir: Path, tmp_path: Path) -> None:
    ddir = repo_dir / "devices" / "vm"
    files = _user_files(ddir)
    cli("list", repo_dir)
    _still_there(ddir, files)
    cli("status", repo_dir)
    cli("device", "list", repo_dir)
    _still_there(ddir, files)
    cli("backup", repo_dir, "vm", "incremental")
    _still_there(ddir, files)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo_dir, tmp_path / "mnt")
    try:
        m.start()
        assert (tmp_path / "mnt" / "vm").is_dir()
        m.stop()
    finally:
        m.cleanup()
    _still_there(ddir, files)
    cli("verify", repo_dir)
    _still_there(ddir, files)


def test_removing_a_device_keeps_a_users_file(repo_dir: Path) -> None:
    ddir = repo_dir / "devices" / "vm"
    files = _user_files(ddir)
    cli("device", "remove", repo_dir, "vm", "--force")
    _still_there(ddir, files)
    assert not [f for f in os.listdir(ddir) if f.startswith("2") or f.endswith(".bitmap")]


def test_a_symlinked_device_dir_is_never_entered(repo_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ddir = repo_dir / "devices" / "vm"
    for f in os.listdir(ddir):  # what was there, moved out: the link leads to copies
        (elsewhere / f).write_bytes((ddir / f).read_bytes())
    files = _user_files(elsewhere)
    before = sorted(os.listdir(elsewhere))
    os.rename(ddir, tmp_path / "moved")
    os.symlink(elsewhere, ddir)
    # Refused outright, by commands that read and by those that may write
    # (and so recover): backupfs neither deletes nor writes through the link.
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    for args in (["list", repo_dir], ["status", repo_dir], ["device", "add", repo_dir, "other", other],
                 ["backup", repo_dir, "vm", "full"]):
        proc = cli(*args, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and len(err.splitlines()) == 1, (args, err)
        assert f"{ddir} is a symlink" in err, (args, err)
        assert sorted(os.listdir(elsewhere)) == before
    _still_there(elsewhere, files)


def test_an_import_into_a_planted_device_dir_link_is_refused(repo_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, repo_dir / "devices" / "newvm")
    tip = tmp_path / "tip.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", tip, str(MiB))
    proc = cli("import", repo_dir, "newvm", tip, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "is a symlink" in err, err
    assert os.listdir(elsewhere) == []
    assert "newvm" not in cli("device", "list", repo_dir).stdout.decode()


_KILLED_BACKUP = """
import os, signal, sys
from engine.repo import Repository
repo = Repository.open(sys.argv[1])
def on_progress(p):
    if p.done > 0:
        os.kill(os.getpid(), signal.SIGKILL)
repo.backup("vm", "full", on_progress=on_progress, chunk_bytes=1024 * 1024)
"""


def test_a_killed_backups_files_go_at_the_next_open_that_may_write(repo_dir: Path) -> None:
    ddir = repo_dir / "devices" / "vm"
    files = _user_files(ddir)
    proc = subprocess.run([sys.executable, "-c", _KILLED_BACKUP, str(repo_dir)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [f for f in os.listdir(ddir) if f.startswith(".tmp-2")]
    assert len(left) == 1, os.listdir(ddir)
    # Reading deletes nothing, not even our own leftover.
    cli("list", repo_dir)
    cli("status", repo_dir)
    assert (ddir / left[0]).exists()
    # The next command that may write removes it, and only it.
    out = cli("backup", repo_dir, "vm", "incremental").stdout.decode()
    assert not (ddir / left[0]).exists()
    # Its bitmap was in use when it was killed: the incremental scanned, and
    # found the device as the full left it.
    assert "nothing changed since" in out and "scanned (bitmap untrusted" in out, out
    assert not [f for f in os.listdir(ddir) if f.startswith(".tmp-2")]
    _still_there(ddir, files)
    with Repository.open(str(repo_dir)) as r:
        assert r.catalog.intents() == []
        assert [b.kind for b in r.backups("vm")] == ["full"]


def test_a_catalog_from_before_intents(repo_dir: Path) -> None:
    """Read-only (beside a mount, or a full disk) it has no intents; opened
    for writing it gains the table, and works."""
    db = str(repo_dir / "catalog.db")
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE intents")
    conn.commit()
    conn.close()
    catalog = Catalog.open(db, readonly=True)
    try:
        assert catalog.intents() == []
    finally:
        catalog.close()
    cli("backup", repo_dir, "vm", "incremental", "--allow-empty")
    with Repository.open(str(repo_dir)) as r:
        assert r.catalog.intents() == []
        assert len(r.backups("vm")) == 2
