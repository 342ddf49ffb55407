"""A real VM runs on the device file while incrementals are taken.

QEMU boots Debian's kernel with a busybox initramfs (tests/vmguest.py) on
``MOUNT/vm/device`` (raw, virtio, cache=none, aio=io_uring where QEMU and the
host allow it). The guest writes numbered 4 KiB records with O_DIRECT from
several threads, fsyncs them in batches and says so on its serial console;
the host writes ``incremental`` into ``MOUNT/vm/snapshot`` every few synced
batches while the guest keeps writing, and tells the guest as soon as the
job is seen copying (the guest answers with the first batch it starts after
that). After the guest powers off and a last incremental is taken, every
backup must be a consistent point in time: no torn record, every record
synced before its trigger there (at least as new), nothing from a batch the
guest started after the job was seen copying (copy-before-write); the last
backup equals the device, every image passes ``qemu-img check``, the
daemon's log has no traceback (conftest).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.commands import sh
from tests.mounts import Mounted, mounted_device
from tests.vmguest import GuestUnavailable, RunResult, kvm_unusable_reason, prepare_guest, run_guest, start_vm
from tests.vmrecords import Schedule

pytestmark = [pytest.mark.mount, pytest.mark.long, pytest.mark.timeout(600)]

# 2048 slots 16 KiB apart (a 32 MiB disk), 128 records a batch written by
# 4 threads (4 requests in flight); a backup 4 batches after the last one
# returned; after the 5th the guest is told to stop at its next batch (up
# to 40 passes, 640 batches: however fast the guest, the host takes its 5).
# Under TCG (no usable KVM) the guest writes about 2,000 records a second:
# the test takes about 20 s.
SCHEDULE = Schedule(slots=2048, passes=40, batch=128, spacing=16384, writers=4)
EVERY_BATCHES = 4
BACKUPS = 5
# Each incremental copies up to 32 MiB: at this rate it takes a second or
# two, in which the guest writes on.
RATE = "16M"


def _backups(m: Mounted) -> list[str]:
    return sorted(p for p in os.listdir(m.path("vm", "backups")) if p != "latest")


def _trigger(m: Mounted, kind: str) -> None:
    proc = sh(f"echo {kind} > {m.path('vm', 'snapshot')}", check=False)
    assert proc.returncode == 0, f"echo {kind} failed: {proc.stderr}\n{m.path('vm', 'snapshot').read_text()}"


def _status(m: Mounted) -> dict[str, str]:
    return dict(line.partition(": ")[::2] for line in m.path("vm", "snapshot").read_text().splitlines())


def _trigger_marking(m: Mounted, mark: Callable[[], None]) -> None:
    """``echo 'incremental rate=...' > snapshot``, and ``mark()`` as soon as
    the job is seen copying: its bitmap is frozen, its point in time has
    passed, so nothing the guest starts from then on may be in the backup.
    The rate keeps the copy going while the guest writes on, so its writes
    meet regions not copied yet (copy-before-write). ``empty=1``: one
    backup per trigger, even one whose writes all came before the last
    one's point in time."""
    snap = m.path("vm", "snapshot")
    job = subprocess.Popen(["bash", "-c", f"echo 'incremental rate={RATE} empty=1' > {snap}"],
                           stderr=subprocess.PIPE, text=True)
    try:
        while job.poll() is None:
            st = _status(m)
            if st.get("state") == "running" and "bytes" in st:
                mark()
                break
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, f"the incremental failed: {err}\n{snap.read_text()}"


def _read_whole(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) == size, f"{path.name}: read {len(data)} bytes of {size}"
    return data


def _report(result: RunResult, backups: list[str]) -> None:
    """What the run did, for the test's output (-s or a failure)."""
    times = sorted(b.seconds for b in result.backups)
    print(f"vm: accel={result.accel} aio={result.aio}: {result.records} records, "
          f"{result.records_per_s:.0f} records/s, {result.mb_per_s:.2f} MB/s with "
          f"{len(result.backups)} incrementals taken while it wrote "
          f"({times[0]:.2f}/{times[len(times) // 2]:.2f}/{times[-1]:.2f} s min/median/max)")
    for b, name in zip(result.backups, backups[1:]):
        when = "the job was seen copying" if b.marked_while_copying else "the trigger returned"
        print(f"  {name}: after batch {b.synced}; batch {b.next_batch} on started after {when}; "
              f"{result.batches_during(b)} such batches synced before it returned; {b.seconds:.2f} s")


def test_vm_writes_while_incrementals_are_taken(tmp_path: Path) -> None:
    try:
        files = prepare_guest(tmp_path)
    except GuestUnavailable as e:
        pytest.fail(f"the VM cannot be built: {e} (./scripts/install sets it up)")
    why_not_kvm = kvm_unusable_reason()
    print(f"vm: {'KVM' if why_not_kvm is None else 'TCG: ' + why_not_kvm}")

    def sparse(src: Path) -> None:
        with open(src, "wb") as f:
            f.truncate(SCHEDULE.disk_bytes)

    with mounted_device(tmp_path, sparse, name="vm") as m:
        _trigger(m, "full")
        result = run_guest(files, m.path("vm", "device"), SCHEDULE, tmp_path,
                           trigger=lambda mark: _trigger_marking(m, mark), every_batches=EVERY_BATCHES,
                           stop_after=BACKUPS, timeout=480)
        (tmp_path / "console.log").write_text("\n".join(result.console))
        assert result.verify.startswith("ok"), f"the guest read back its disk: {result.verify}"
        assert result.records == (result.last_synced + 1) * SCHEDULE.batch
        assert len(result.backups) == BACKUPS, f"{len(result.backups)} incrementals while the guest wrote"
        t0 = time.monotonic()
        _trigger(m, "'incremental empty=1'")  # after power-off: the device as the guest left it
        last_seconds = time.monotonic() - t0

        names = _backups(m)
        assert len(names) == 1 + len(result.backups) + 1, (
            f"a full and {len(result.backups) + 1} incrementals triggered, {len(names)} backups listed: {names}")
        _report(result, names)
        print(f"  {names[-1]}: after power-off, {last_seconds:.2f} s")
        points = [(names[0], -1, 0)]
        points += [(n, b.synced, b.next_batch) for n, b in zip(names[1:], result.backups)]
        points += [(names[-1], result.last_synced, result.last_synced + 1)]
        problems = []
        for name, synced, next_batch in points:
            assert next_batch is not None
            data = _read_whole(m.path("vm", "backups", name), SCHEDULE.disk_bytes)
            problems += [f"{name} (after batch {synced}, before batch {next_batch}): {p}"
                         for p in SCHEDULE.check(data, synced, next_batch)]
        assert not problems, "\n".join(problems)
        # The guest went on writing during the jobs, past their points in time
        # (else copy-before-write was never put to the test).
        assert sum(result.batches_during(b) for b in result.backups) > 0

        sh(f"cmp {m.path('vm', 'backups', names[-1])} {m.path('vm', 'device')}")
        for name in names:
            image = os.getxattr(m.path("vm", "backups", name), "user.backupfs.image").decode()
            path = image if os.path.isabs(image) else str(m.repo / image)
            check = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True, text=True)
            assert check.returncode == 0, f"qemu-img check {name}: {check.stdout}{check.stderr}"
        m.stop()


def test_an_aio_mode_qemu_refuses_is_named_and_the_next_one_tried(tmp_path: Path) -> None:
    """io_uring can be missing from QEMU's build or disabled on a host: the
    VM must still boot, on the next mode, with QEMU's reason said. A mode
    no QEMU knows stands in for a refused io_uring."""
    files = prepare_guest(tmp_path)
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(SCHEDULE.disk_bytes)
    said: list[str] = []
    vm = start_vm(files, disk, SCHEDULE, tmp_path, aio_modes=("no_such_mode", "io_uring", "native"), log=said.append)
    try:
        assert vm.aio == "io_uring"
        fallback = [s for s in said if "aio=no_such_mode refused" in s]
        assert fallback and "using aio=io_uring" in fallback[0], said
        assert "no_such_mode" in fallback[0].split("refused: ", 1)[1], said  # QEMU's own words
        print(fallback[0])
    finally:
        vm.kill()
    with pytest.raises(AssertionError, match="QEMU refused every aio mode: aio=no_such_mode refused"):
        start_vm(files, disk, SCHEDULE, tmp_path, aio_modes=("no_such_mode",), log=said.append)
