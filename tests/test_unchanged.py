"""No empty layers: an incremental or differential with nothing to copy makes no image.

The bitmap (trusted, no dirty bit) or a checksum scan (nothing differs)
says that nothing changed since the backup the new one would back onto:
no image, no catalog row, no file, the job history says "unchanged".
``allow_empty`` (``empty=1``, ``--allow-empty``) keeps the empty layer as
a point in time.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from engine.repo import Repository
from tests.commands import cli, sh
from tests.oracle import qemu_compare

KiB = 1024
MiB = 1024 * KiB


def _source(tmp_path: Path, size: int = 2 * MiB, seed: int = 7) -> Path:
    src = tmp_path / "vm.img"
    src.write_bytes(random.Random(seed).randbytes(size))
    return src


def _write(src: Path, offset: int, data: bytes) -> None:
    with open(src, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _files(repo: Repository, name: str) -> list[str]:
    return sorted(os.listdir(os.path.join(repo.path, "devices", name)))


def test_an_incremental_with_nothing_dirty_makes_nothing(repo: Repository, tmp_path: Path) -> None:
    repo.add_device("vm", str(_source(tmp_path)), 64 * KiB)
    full = repo.backup("vm", "full").record
    files = _files(repo, "vm")
    dev = repo.device("vm")
    bits = (dev.since_last.active.bits.copy(), dev.since_full.active.bits.copy())
    res = repo.backup("vm", "incremental")
    assert res.unchanged and res.record.id == full.id and not res.scanned
    assert res.summary().startswith(f"nothing changed since {full.id}; no backup was made"), res.summary()
    assert [b.id for b in repo.backups("vm")] == [full.id]
    assert _files(repo, "vm") == files
    assert (dev.since_last.active.bits, dev.since_full.active.bits) == bits
    assert dev.since_last.frozen is None and dev.trusted
    job = repo.jobs("vm", limit=1)[0]
    assert (job.kind, job.state, job.backup) == ("incremental", "unchanged", full.id)
    # A differential onto the full: nothing changed since it either.
    diff = repo.backup("vm", "differential")
    assert diff.unchanged and diff.record.id == full.id
    # Asked for, the empty layer marks the time.
    empty = repo.backup("vm", "incremental", allow_empty=True)
    assert not empty.unchanged and empty.record.parent == full.id and empty.record.stored_bytes == 0
    assert len(repo.backups("vm")) == 2


def test_a_scan_that_finds_nothing_changed_makes_nothing_and_trusts_again(
    repo: Repository, tmp_path: Path
) -> None:
    src = _source(tmp_path)
    repo.add_device("vm", str(src), 64 * KiB)
    full = repo.backup("vm", "full").record
    files = _files(repo, "vm")
    dev = repo.device("vm")
    dev.distrust("a test says so")
    res = repo.backup("vm", "incremental")
    assert res.unchanged and res.scanned and res.record.id == full.id and res.bytes_total == 2 * MiB
    assert "scanned (bitmap untrusted: a test says so)" in res.summary()
    assert [b.id for b in repo.backups("vm")] == [full.id]
    assert _files(repo, "vm") == files  # its temporary image is gone
    assert repo.catalog.intents() == []
    job = repo.jobs("vm", limit=1)[0]
    assert (job.state, job.backup, job.scanned) == ("unchanged", full.id, True)
    assert dev.trusted  # the scan re-synchronised it, as a backup's would
    again = repo.backup("vm", "incremental")
    assert again.unchanged and not again.scanned
    _write(src, 300 * KiB, b"\x42" * 100)  # not through the device: distrusted again, and scanned
    changed = repo.backup("vm", "incremental")
    assert not changed.unchanged and changed.scanned and changed.record.stored_bytes == 64 * KiB
    qemu_compare(repo.image_path(changed.record), src)


def test_a_differential_that_finds_the_full_keeps_what_the_latest_differs_in(
    repo: Repository, tmp_path: Path
) -> None:
    """The device went back to what its full holds after an incremental took
    a change: the differential (a scan) finds nothing changed since the full,
    and the next incremental must still copy the way back."""
    src = _source(tmp_path)
    original = src.read_bytes()[:64 * KiB]
    repo.add_device("vm", str(src), 64 * KiB)
    full = repo.backup("vm", "full").record
    dev = repo.device("vm")
    dev.write(0, b"\x11" * 64 * KiB)
    inc = repo.backup("vm", "incremental").record
    dev.write(0, original)
    dev.distrust("a test says so")
    diff = repo.backup("vm", "differential")
    assert diff.unchanged and diff.scanned and diff.record.id == full.id
    assert [b.id for b in repo.backups("vm")] == [full.id, inc.id]
    dev.fsync()
    after = repo.backup("vm", "incremental")
    assert not after.unchanged and after.record.parent == inc.id
    qemu_compare(repo.image_path(after.record), src)


def test_the_cli_says_nothing_changed_and_allow_empty_makes_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    Repository.init(str(repo))
    with Repository.open(str(repo)) as r:
        r.add_device("vm", str(_source(tmp_path)))
        full = r.backup("vm", "full").record.id
    out = cli("backup", repo, "vm", "incremental").stdout.decode()
    assert out.startswith(f"nothing changed since {full}; no backup was made"), out
    status = cli("status", repo).stdout.decode()
    assert f"unchanged: nothing changed since {full}" in status, status
    out = cli("backup", repo, "vm", "incremental", "--allow-empty").stdout.decode()
    assert "-0002-incremental: incremental" in out, out
    with Repository.open(str(repo), writable=False) as r:
        assert len(r.backups("vm")) == 2


@pytest.mark.mount
def test_the_trigger_says_nothing_changed_and_empty_1_makes_one(tmp_path: Path) -> None:
    from tests.mounts import mounted_device

    data = random.Random(9).randbytes(MiB)
    with mounted_device(tmp_path, data, name="vm") as m:
        snapshot = m.mnt / "vm" / "snapshot"
        backups = m.mnt / "vm" / "backups"
        sh(f"echo full > {snapshot}")
        [full] = [p.name for p in backups.iterdir() if p.name != "latest"]
        sh(f"echo incremental > {snapshot} && echo differential > {snapshot}")  # exit 0, both
        status = snapshot.read_text()
        assert "state: succeeded" in status and f"unchanged: nothing changed since {full}; no backup was made" \
            in status, status
        assert sorted(p.name for p in backups.iterdir()) == sorted([full, "latest"])
        assert not [f for f in os.listdir(m.repo / "devices" / "vm") if f.startswith(".tmp")]
        out = cli("backup", m.repo, "vm", "incremental").stdout.decode()
        assert out.startswith(f"nothing changed since {full}; no backup was made"), out
        assert "through the mount" in out
        sh(f"echo incremental empty=1 > {snapshot}")
        assert len([p for p in backups.iterdir() if p.name != "latest"]) == 2
        out = cli("backup", m.repo, "vm", "incremental", "--allow-empty").stdout.decode()
        assert "-incremental: incremental" in out, out
        # A write through the mount is a change again.
        with open(m.mnt / "vm" / "device", "r+b") as f:
            f.write(b"\x01" * 512)
        sh(f"echo incremental > {snapshot}")
        assert "unchanged" not in snapshot.read_text()
        assert len([p for p in backups.iterdir() if p.name != "latest"]) == 4
        m.stop()
