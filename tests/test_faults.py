"""Faults through the mount: an unreadable source, a full repository disk, a
source that shrinks or vanishes. Each fails cleanly: a clear message in the
status, the right errno, the bitmap kept, no partial backup, and the
filesystem keeps serving."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.commands import backupfs_cmd, cli, sh
from tests.mounts import Mounted
from tests.oracle import qemu_compare

pytestmark = pytest.mark.mount

KiB = 1024
MiB = 1024 * KiB


def _source(path: Path, size: int, seed: int, dense: bool = False) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        if dense:
            f.write(rng.randbytes(size))
            return path
        f.truncate(size)
        for _ in range(8):
            f.seek(rng.randrange(0, size - 600 * KiB))
            f.write(rng.randbytes(rng.randrange(4 * KiB, 512 * KiB)))
    return path


def _status(m: Mounted, dev: str = "vm1") -> str:
    return m.path(dev, "snapshot").read_text()


def _backups(m: Mounted, dev: str = "vm1") -> list[str]:
    return sorted(p for p in os.listdir(m.path(dev, "backups")) if p != "latest")


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    cli("init", tmp_path / "repo")
    cli("device", "add", tmp_path / "repo", "vm1", _source(tmp_path / "vm1.img", 16 * MiB, 1))
    cli("device", "add", tmp_path / "repo", "vm2", _source(tmp_path / "vm2.img", 8 * MiB, 2))
    (tmp_path / "mnt").mkdir()
    return tmp_path / "repo"


@pytest.fixture
def mounts(repo_dir: Path) -> Iterator[list[Mounted]]:
    made: list[Mounted] = []
    try:
        yield made
    finally:
        for m in made:
            m.cleanup()


def _mount(repo_dir: Path, mounts: list[Mounted], env: dict[str, str] | None = None) -> Mounted:
    m = Mounted(repo_dir, repo_dir.parent / "mnt", env=env)
    m.start()
    mounts.append(m)
    return m


def test_unreadable_source_keeps_the_bitmap(repo_dir: Path, mounts: list[Mounted]) -> None:
    m = _mount(repo_dir, mounts)
    sh(f"echo full > {m.path('vm1', 'snapshot')}")
    sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs=4k count=2 seek=1000 conv=notrunc status=none")
    m.stop()
    m = _mount(repo_dir, mounts, env={"BACKUPFS_TEST_FAULTS": "source-eio@1"})
    before = _backups(m)
    proc = sh(f"echo incremental > {m.path('vm1', 'snapshot')}", check=False)
    assert proc.returncode != 0
    status = _status(m)
    assert "error: EIO: reading source" in status and "Input/output error" in status
    assert "bitmap: kept" in status
    assert _backups(m) == before
    assert "since last backup: 65536 bytes dirty in 1 runs" in m.path("vm1", "bitmap").read_text()
    assert sorted(os.listdir(m.path("vm2"))) == ["backups", "bitmap", "chain", "changes", "device", "files",
                                                 "snapshot", "versions"]
    assert not [f for f in os.listdir(repo_dir / "devices" / "vm1") if f.startswith(".tmp")]
    m.stop()
    m = _mount(repo_dir, mounts)
    sh(f"echo incremental > {m.path('vm1', 'snapshot')}")
    assert "bytes stored: 65536" in _status(m)
    qemu_compare(repo_dir / "devices" / "vm1" / f"{_backups(m)[-1]}.qcow2", repo_dir.parent / "vm1.img")
    m.stop()
    assert "Traceback" not in m.log()


@contextmanager
def _small_disk(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` to fill, unmounted whatever happens."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)], check=True)
    try:
        yield small
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_repository_disk_full_through_the_mount(tmp_path: Path) -> None:
    m = None
    with _small_disk(tmp_path, "12m") as small:
        try:
            repo_dir = small / "repo"
            cli("init", repo_dir)
            cli("device", "add", repo_dir, "big", _source(tmp_path / "big.img", 32 * MiB, 3, dense=True))
            (tmp_path / "mnt").mkdir()
            m = Mounted(repo_dir, tmp_path / "mnt")
            m.start()
            # Refused before anything is made: how much it needs, how much is free.
            proc = sh(f"echo full > {m.path('big', 'snapshot')}", check=False)
            assert proc.returncode != 0 and "No space left on device" in proc.stderr
            status = _status(m, "big")
            assert "error: ENOSPC: device big: a full backup does not fit on the repository's disk: " \
                   "it needs up to 32.4 MiB (340" in status and "force=1" in status and "bitmap: kept" in status, status
            proc = cli("backup", repo_dir, "big", "full", check=False)  # the CLI through the mount says it too
            err = proc.stderr.decode()
            assert proc.returncode == 1 and "it needs up to 32.4 MiB (340" in err and "bytes) were free" in err
            assert not [f for f in os.listdir(repo_dir / "devices" / "big") if f.startswith(".tmp")]
            # Tried anyway: disk full, saying the numbers; the bitmap kept, no partial backup.
            proc = cli("backup", repo_dir, "big", "full", "--force", check=False)
            err = proc.stderr.decode()
            assert proc.returncode == 1 and "repository disk full" in err and "the backup needed up to 32.4 MiB (340" in err
            assert "were free when it started" in err
            status = _status(m, "big")
            assert "command: full cluster_size=65536 force=1" in status
            assert "error: ENOSPC: repository disk full" in status and "bitmap: kept" in status
            assert _backups(m, "big") == []
            assert not [f for f in os.listdir(repo_dir / "devices" / "big") if f.endswith((".qcow2", ".sums"))]
            # Still serving: the device reads, the tree lists.
            with open(m.path("big", "device"), "rb") as f:
                assert len(f.read(MiB)) == MiB
            m.stop()
            assert "Traceback" not in m.log()
        finally:
            if m is not None:
                m.cleanup()


def test_umount_says_when_the_bitmaps_could_not_be_saved(tmp_path: Path) -> None:
    """The disk filled while mounted: the daemon cannot save the bitmaps
    as clean at its end. `umount` said nothing and exited 0; it now says
    which devices will scan, and every device was still tried."""
    m = None
    with _small_disk(tmp_path, "4m") as small:
        try:
            repo_dir = small / "repo"
            cli("init", repo_dir)
            for name in ("a", "b"):
                cli("device", "add", repo_dir, name, _source(tmp_path / f"{name}.img", 4 * MiB, 5))
            (tmp_path / "mnt").mkdir()
            m = Mounted(repo_dir, tmp_path / "mnt", expect_tracebacks=True)
            m.start()
            for name in ("a", "b"):
                sh(f"dd if=/dev/urandom of={m.path(name, 'device')} bs=64k count=1 conv=notrunc status=none")
            sh(f"dd if=/dev/zero of={small / 'filler'} bs=64k", check=False)  # until the disk is full
            proc = subprocess.run(backupfs_cmd() + ["umount", str(m.mnt)], capture_output=True, text=True,
                                  timeout=120)
            m.pid = None
            assert proc.returncode == 1, proc
            assert "the bitmaps of a, b are not saved as clean" in proc.stderr, proc.stderr
            assert "their next backups will scan" in proc.stderr and "Traceback" not in proc.stderr
            os.unlink(small / "filler")
            out = cli("status", repo_dir).stdout.decode()
            assert out.count("untrusted (backupfs did not stop cleanly)") == 2, out
        finally:
            if m is not None:
                m.cleanup()


def test_a_mount_point_that_would_hide_the_repository_or_a_source_is_refused(tmp_path: Path) -> None:
    """Mounted over them, the daemon would wait on its own mount: the
    mount (or the first access) hung until kill -9."""
    top = tmp_path / "top"
    top.mkdir()
    cli("init", top / "repo")
    proc = cli("mount", top / "repo", top, check=False)
    assert proc.returncode == 1 and b"contains the repository" in proc.stderr, proc
    cli("init", tmp_path / "repo")
    store = tmp_path / "store"
    store.mkdir()
    cli("device", "add", tmp_path / "repo", "d1", _source(store / "d1.img", 4 * MiB, 6))
    proc = cli("mount", tmp_path / "repo", store, check=False)
    assert proc.returncode == 1, proc
    assert f"device d1's source {store / 'd1.img'} lies under the mount point".encode() in proc.stderr
    proc = cli("mount", tmp_path / "repo", tmp_path / "nowhere", check=False)
    assert proc.returncode == 1 and b"mount point " in proc.stderr and b"does not exist" in proc.stderr
    for where in (top, store):
        assert not os.path.ismount(where)


def test_source_that_shrinks_or_vanishes(repo_dir: Path, mounts: list[Mounted], tmp_path: Path) -> None:
    m = _mount(repo_dir, mounts)
    sh(f"echo full > {m.path('vm1', 'snapshot')}")
    os.truncate(tmp_path / "vm1.img", 4 * MiB)  # behind backupfs's back, while mounted
    proc = sh(f"echo full > {m.path('vm1', 'snapshot')}", check=False)
    assert proc.returncode != 0
    status = _status(m)
    assert "error: EIO" in status and "is 4194304 bytes, registered as" in status
    assert "changed size behind backupfs's back" in status
    assert len(_backups(m)) == 1
    m.stop()
    m = _mount(repo_dir, mounts)
    proc = sh(f"echo incremental > {m.path('vm1', 'snapshot')}", check=False)
    assert proc.returncode != 0 and "changed size behind backupfs's back" in _status(m)
    sh(f"cmp -n {4 * MiB} {m.path('vm1', 'backups', 'latest')} {tmp_path / 'vm1.img'}")  # old backups serve
    m.stop()
    os.unlink(tmp_path / "vm2.img")
    m = _mount(repo_dir, mounts)
    proc = sh(f"echo incremental > {m.path('vm2', 'snapshot')}", check=False)
    assert proc.returncode != 0 and "does not exist" in _status(m, "vm2")
    sh(f"cat {m.path('vm1', 'chain')}")  # the rest of the tree works
    m.stop()
    assert "Traceback" not in m.log()
