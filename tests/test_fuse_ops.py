"""verify, restore, prune and import on a mounted repository."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.qcow2.layers import DATA, open_layer

from tests.commands import cli, sh
from tests.mounts import Mounted
from tests.oracle import qemu_check, qemu_img, qemu_io

pytestmark = pytest.mark.mount

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mounted]:
    src = tmp_path / "vm1.img"
    rng = random.Random(7)
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
        for _ in range(10):
            f.seek(rng.randrange(0, 30 * MiB) // 4096 * 4096)
            f.write(rng.randbytes(rng.randrange(4096, 1 * MiB)))
    cli("init", tmp_path / "repo")
    cli("device", "add", tmp_path / "repo", "vm1", src)
    (tmp_path / "mnt").mkdir()
    m = Mounted(tmp_path / "repo", tmp_path / "mnt")
    m.start()
    try:
        yield m
    finally:
        m.cleanup()


def _backups(m: Mounted) -> list[str]:
    return sorted(p for p in os.listdir(m.path("vm1", "backups")) if p != "latest")


def _take(m: Mounted, n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    with open(m.path("vm1", "device"), "r+b", buffering=0) as dev:
        for i in range(n):
            for _ in range(4):
                dev.seek(rng.randrange(0, 32 * MiB - 100 * KiB))
                dev.write(rng.randbytes(rng.randrange(1, 100 * KiB)))
            line = "full" if i == 0 else f"incremental cluster_size={rng.choice(['4K', '64K', '128K'])}"
            fd = os.open(m.path("vm1", "snapshot"), os.O_WRONLY)
            try:
                os.write(fd, line.encode() + b"\n")
            finally:
                os.close(fd)
    return _backups(m)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _status(m: Mounted) -> str:
    return m.path("vm1", "snapshot").read_text()


def test_damaged_cluster_reads_as_eio_and_verify_reports_it(mounted: Mounted) -> None:
    m = mounted
    ids = _take(m, 3)
    victim = ids[1]
    image = m.repo / "devices" / "vm1" / f"{victim}.qcow2"
    with open_layer(str(image), "qcow2") as layer:
        guest, host = next((e.start, e.host) for e in layer.allocation() if e.kind == DATA)
    good_before = _digest(m.path("vm1", "backups", ids[0]))
    with open(image, "r+b") as f:
        f.seek(host + 77)
        f.write(b"\xde\xad")
    # The damaged range fails with EIO; the same file elsewhere, and other backups, read fine.
    fd = os.open(m.path("vm1", "backups", victim), os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, 1 * MiB, guest - guest % MiB)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    proc = sh(f"cmp {m.path('vm1', 'backups', victim)} {m.path('vm1', 'backups', ids[0])}", check=False)
    assert "Input/output error" in proc.stderr
    assert _digest(m.path("vm1", "backups", ids[0])) == good_before
    # verify through the trigger: EIO, and the report names the backup and offset.
    proc = sh(f"echo verify > {m.path('vm1', 'snapshot')}", check=False)
    assert proc.returncode != 0
    status = _status(m)
    assert "state: failed" in status and "error: EIO: verification found" in status
    assert f"report: BAD {victim}: stored data fails its checksum at offset {guest - guest % (64 * KiB)}" in status
    assert f"report: ok  {ids[0]}" in status
    # And `backupfs verify` while mounted goes through the daemon.
    proc = cli("verify", m.repo, "vm1", check=False)
    assert proc.returncode == 1 and f"BAD {victim}" in proc.stdout.decode()
    assert "Traceback" not in m.log()


def test_prune_through_the_mount_updates_the_tree(mounted: Mounted, tmp_path: Path) -> None:
    m = mounted
    ids = _take(m, 5)
    before = {i: _digest(m.path("vm1", "backups", i)) for i in ids}
    for i in ids:
        os.stat(m.path("vm1", "backups", i))  # cached by the kernel now
    out = cli("prune", m.repo, "vm1", "--keep-last", "2").stdout.decode()
    assert out.count("removed: ") == 3
    assert _backups(m) == ids[3:]
    for gone in ids[:3]:
        assert not m.path("vm1", "backups", gone).exists()
    for kept in ids[3:]:
        # `du` of a rewritten backup: what its image stores now, not the cached figure.
        path = m.path("vm1", "backups", kept)
        stored = int(os.getxattr(path, "user.backupfs.stored_bytes"))
        assert os.stat(path).st_blocks == (stored + 511) // 512, kept
        assert _digest(path) == before[kept]
        qemu_check(m.repo / "devices" / "vm1" / f"{kept}.qcow2")
    chain = m.path("vm1", "chain").read_text().splitlines()[1:]
    assert [line.split()[0] for line in chain] == ids[3:] and chain[0].split()[1] == "full"
    # Removing by id with the trigger, dry run first.
    sh(f"echo 'prune remove={ids[3]} dry_run=1' > {m.path('vm1', 'snapshot')}")
    assert f"would remove: {ids[3]}" in _status(m) and _backups(m) == ids[3:]
    assert "Traceback" not in m.log()


def test_du_of_a_backup_rewritten_by_prune_is_fresh(mounted: Mounted) -> None:
    """Removing a full rewrites its child to hold the data: `du` must say so at once,
    though the kernel keeps a backup's attributes for an hour."""
    m = mounted
    sh(f"echo full > {m.path('vm1', 'snapshot')}")
    sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs=1M count=2 conv=notrunc status=none")
    sh(f"echo incremental > {m.path('vm1', 'snapshot')}")
    full, child = _backups(m)
    path = m.path("vm1", "backups", child)
    small = os.stat(path).st_blocks  # cached by the kernel now
    sh(f"echo prune remove={full} > {m.path('vm1', 'snapshot')}")
    stored = int(os.getxattr(path, "user.backupfs.stored_bytes"))
    assert os.stat(path).st_blocks == (stored + 511) // 512 > small
    assert sh(f"du -k {path}").stdout.split()[0] == str((stored + 1023) // 1024)


def test_prune_refused_while_a_backup_runs(mounted: Mounted) -> None:
    import subprocess

    m = mounted
    _take(m, 2)
    job = subprocess.Popen(["bash", "-c", f"echo 'full rate=4M' > {m.path('vm1', 'snapshot')}"])
    try:
        while "bytes:" not in _status(m):
            assert job.poll() is None
        proc = cli("prune", m.repo, "vm1", "--keep-last", "1", check=False)
        assert proc.returncode == 1 and b"already running" in proc.stderr
    finally:
        job.wait(timeout=120)


def test_restore_through_the_mount(mounted: Mounted, tmp_path: Path) -> None:
    m = mounted
    ids = _take(m, 2)
    out = tmp_path / "restored.raw"
    cli("restore", m.repo, "vm1", ids[0], out)
    sh(f"cmp {out} {m.path('vm1', 'backups', ids[0])}")
    assert out.stat().st_blocks * 512 < 32 * MiB
    proc = cli("restore", m.repo, "vm1", "latest", tmp_path / "vm1.img", "--force", check=False)
    assert proc.returncode == 1 and b"which is mounted" in proc.stderr
    proc = cli("restore", m.repo, "vm1", "latest", out, check=False)
    assert proc.returncode == 1 and b"exists (use --force" in proc.stderr
    proc = cli("restore", m.repo, "vm1", "latest", tmp_path / "latest.raw")
    assert proc.stdout.decode().startswith(f"restored {ids[-1]} of vm1 to ")  # which one 'latest' was
    proc = cli("restore", m.repo, "vm1", "latest", m.path("vm1", "backups", "new.raw"), check=False)
    assert proc.returncode == 1 and b"lies on the backupfs mount" in proc.stderr


def test_restore_into_the_mounted_device_writes_only_what_differs(mounted: Mounted, tmp_path: Path) -> None:
    """Rolling a disk back through the mount: its bitmap records the
    restore, and since only the blocks that differ are written, the next
    incremental holds what the rollback changed, not the whole disk."""
    m = mounted
    ids = _take(m, 2)
    device = m.path("vm1", "device")
    with open(device, "r+b", buffering=0) as dev:
        dev.seek(5 * MiB)
        dev.write(b"\x5a" * 64 * KiB)
    proc = cli("restore", m.repo, "vm1", ids[0], device, check=False)
    assert proc.returncode == 1, proc
    assert b"is the device file of vm1 on the backupfs mount" in proc.stderr and b"--force" in proc.stderr
    proc = cli("restore", m.repo, "vm1", ids[0], device, "--force")
    line = proc.stdout.decode()
    assert line.startswith(f"restored {ids[0]} of vm1 to {device} through the mount (in place): "), line
    sh(f"cmp {device} {m.path('vm1', 'backups', ids[0])}")
    # The second backup's writes plus the one above: at most 13 blocks of 64 KiB.
    written = line.split(": ")[1].split(" written")[0]
    assert written.endswith("KiB") and float(written.split()[0]) <= 13 * 64, line
    sh(f"echo incremental > {m.path('vm1', 'snapshot')}")
    newest = _backups(m)[-1]
    sh(f"cmp {m.path('vm1', 'backups', newest)} {m.path('vm1', 'backups', ids[0])}")
    # What the incremental holds (data or zero clusters: the rollback may
    # write zeros back): the changed blocks, not the disk.
    image = m.repo / "devices" / "vm1" / f"{newest}.qcow2"
    held = sum(e["length"] for e in json.loads(qemu_img("map", "--output=json", str(image)))
               if e["depth"] == 0)
    assert 64 * KiB <= held <= 13 * 64 * KiB, held


def test_imported_chain_is_browsable(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "16M")
    qemu_io(base, "write -P 0x61 0 8M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), "16M")
    qemu_io(top, "write -P 0x62 1M 64k")
    cli("init", tmp_path / "repo")
    cli("import", tmp_path / "repo", "old", top)
    (tmp_path / "mnt").mkdir()
    m = Mounted(tmp_path / "repo", tmp_path / "mnt")
    m.start()
    try:
        assert sorted(os.listdir(m.path("old"))) == ["backups", "chain", "changes", "files", "snapshot", "versions"]
        ids = sorted(p for p in os.listdir(m.path("old", "backups")) if p != "latest")
        assert len(ids) == 2
        expected = tmp_path / "expected.raw"
        qemu_img("convert", "-O", "raw", str(top), str(expected))
        sh(f"cmp {m.path('old', 'backups', 'latest')} {expected}")
        proc = sh(f"echo incremental > {m.path('old', 'snapshot')}", check=False)
        assert proc.returncode != 0 and "no live source" in m.path("old", "snapshot").read_text()
        m.stop()
    finally:
        m.cleanup()
