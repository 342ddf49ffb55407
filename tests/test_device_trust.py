"""engine/device: the named operations through which a backup or a prune
changes a device's bitmaps and their trust (nothing else writes them)."""

from __future__ import annotations

from pathlib import Path

from engine.device import Device
from engine.repo import Repository

KiB = 1024
MiB = 1024 * KiB


def _device_with_a_full(repo: Repository, tmp_path: Path, name: str = "d") -> Device:
    src = tmp_path / f"{name}.img"
    src.write_bytes(bytes(4 * MiB))
    repo.add_device(name, str(src))
    repo.backup(name, "full")
    return repo.device(name)


def test_a_distrust_while_a_job_runs_outlives_its_commit(repo: Repository, tmp_path: Path) -> None:
    """A change the bitmap cannot have seen, noticed while a job ran, must
    not be forgotten when the job's backup is committed."""
    dev = _device_with_a_full(repo, tmp_path)
    assert dev.trusted
    with dev.gate.exclusive():
        at_start = dev.distrust_count
        dev.since_last.freeze()
    dev.distrust("written by another program (test)")
    with dev.gate.exclusive():
        assert dev.job_committed(at_start, full=False) is False
    assert not dev.since_last.trusted and dev.since_last.frozen is None
    assert dev.untrusted_reason == "written by another program (test)"


def test_a_commit_with_nothing_in_between_trusts_again(repo: Repository, tmp_path: Path) -> None:
    dev = _device_with_a_full(repo, tmp_path)
    dev.distrust("before the job (test)")
    with dev.gate.exclusive():
        at_start = dev.distrust_count
        dev.since_last.freeze()
        dev.since_full.freeze()
        assert dev.job_committed(at_start, full=True) is True
    assert dev.trusted and dev.since_last.frozen is None and dev.since_full.frozen is None


def test_a_failed_job_gives_its_bits_back(repo: Repository, tmp_path: Path) -> None:
    dev = _device_with_a_full(repo, tmp_path)
    dev.write(64 * KiB, b"\x01" * 4096)
    with dev.gate.exclusive():
        dev.since_last.freeze()
    assert dev.since_last.active.count() == 0
    with dev.gate.exclusive():
        dev.job_failed(full=False)
    assert dev.since_last.frozen is None and dev.since_last.active.is_dirty(64 * KiB, 1)


def test_forgetting_the_latest_backup_keeps_its_changes_or_distrusts(repo: Repository, tmp_path: Path) -> None:
    """What the removed backup held must still be copied by the next
    incremental: as dirty bits when they are known, else by a scan."""
    dev = _device_with_a_full(repo, tmp_path)
    held = dev.since_last.active.bits.copy()
    held[3] = 1
    dev.forget_backup(latest=True, last_full=False, defined=held)
    assert dev.since_last.active.bits[3] and dev.trusted
    dev.forget_backup(latest=True, last_full=True, defined=None)
    assert not dev.since_last.trusted and not dev.since_full.trusted
    assert dev.untrusted_reason == "the last full backup was removed"
