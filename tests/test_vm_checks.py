"""The VM test's guest workload and its checker agree, and the checker fails what it should.

tests/vm_workload.c is run here on the host, on a plain file (no VM, no
mount: a second), so that its schedule and record layout are checked
against tests/vmguest.py's, and so that the point-in-time checks the VM test
relies on are seen to fail on a torn, stale, missing or future record.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.vmguest import compile_workload
from tests.vmrecords import RECORD, Schedule

SMALL = Schedule(slots=64, passes=2, batch=16, spacing=8192, writers=3)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workload compiled once for the module (a static link takes most of a second)."""
    return compile_workload(tmp_path_factory.mktemp("workload"))


def _run_workload(binary: Path, schedule: Schedule, name: str, host_says: str = "") -> tuple[bytes, list[str]]:
    disk = binary.parent / name
    with open(disk, "wb") as f:
        f.truncate(schedule.disk_bytes)
    env = {**os.environ, "bfs_dev": str(disk), "bfs_slots": str(schedule.slots),
           "bfs_passes": str(schedule.passes), "bfs_batch": str(schedule.batch), "bfs_spacing": str(schedule.spacing),
           "bfs_writers": str(schedule.writers)}
    proc = subprocess.run([str(binary)], env=env, input=host_says, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return disk.read_bytes(), proc.stdout.splitlines()


@pytest.fixture(scope="module")
def final(workload: Path) -> bytes:
    data, lines = _run_workload(workload, SMALL, "disk")
    assert lines[0] == f"BFS start {SMALL.slots} {SMALL.passes} {SMALL.batch} {SMALL.spacing} {SMALL.writers}"
    assert [ln for ln in lines if ln.startswith("BFS synced")] == [f"BFS synced {b}" for b in range(SMALL.batches)]
    assert f"BFS verify ok {SMALL.slots} slots" in lines
    return data


def test_the_workload_writes_what_the_schedule_says(final: bytes) -> None:
    assert SMALL.check(final, SMALL.batches - 1, SMALL.batches) == []
    assert SMALL.check(bytes(SMALL.disk_bytes), -1, 0) == []  # before the first write


def test_a_torn_record_is_found(final: bytes) -> None:
    torn = bytearray(final)
    torn[5 * SMALL.spacing + RECORD // 2] ^= 0xFF
    problems = SMALL.check(bytes(torn), SMALL.batches - 1, SMALL.batches)
    assert len(problems) == 1 and problems[0].startswith("slot 5: torn record"), problems


def test_a_record_from_after_the_trigger_is_found(final: bytes) -> None:
    problems = SMALL.check(final, -1, 2)
    assert problems and all("after the backup's point in time" in p for p in problems), problems


def test_a_missing_or_stale_record_is_found(workload: Path, final: bytes) -> None:
    missing = bytearray(final)
    missing[7 * SMALL.spacing : 7 * SMALL.spacing + RECORD] = bytes(RECORD)
    problems = SMALL.check(bytes(missing), SMALL.batches - 1, SMALL.batches)
    assert len(problems) == 1 and problems[0].startswith("slot 7: zeros, but record"), problems
    first_pass, _ = _run_workload(workload, Schedule(SMALL.slots, 1, SMALL.batch, SMALL.spacing, 1), "pass1")
    problems = SMALL.check(first_pass, SMALL.batches - 1, SMALL.batches)
    assert problems and all("older than record" in p for p in problems), problems


def test_bytes_between_records_must_stay_zero(final: bytes) -> None:
    dirty = bytearray(final)
    dirty[3 * SMALL.spacing + RECORD + 10] = 1
    assert SMALL.check(bytes(dirty), SMALL.batches - 1, SMALL.batches) == [
        "slot 3: bytes after its record are not zeros"]


def test_the_host_marks_and_stops_the_workload(workload: Path) -> None:
    """Lines from the host, read after the first batch: a mark is answered
    with the next batch, a stop ends the workload there; what it wrote is
    then what the schedule says up to that batch, and its read-back agrees."""
    data, lines = _run_workload(workload, SMALL, "stopped", host_says="T 0\nS\n")
    assert [ln for ln in lines if ln.startswith(("BFS synced", "BFS mark"))] == ["BFS synced 0", "BFS mark 0 next 1"]
    assert f"BFS done records {SMALL.batch} bytes {SMALL.batch * RECORD}" in lines[-1]
    assert lines[-2] == f"BFS verify ok {SMALL.batch} slots"
    assert SMALL.check(data, 0, 1) == []
    assert SMALL.check(data, 1, 2) != []  # batch 1 was never written
