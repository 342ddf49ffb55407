"""A real VM's write rate on the device file, with and without backups running.

What is measured
    QEMU (qemu-system-x86_64, KVM where the CPU allows it, TCG otherwise)
    boots Debian's kernel and a busybox initramfs (tests/vmguest.py) whose
    workload (tests/vm_workload.c) writes numbered 4 KiB records to its
    virtio disk with O_DIRECT from --writers threads (that many requests in
    flight), an fsync after each batch, in several passes over the slots;
    it times itself (writes and fsyncs only, the guest's monotonic clock)
    and prints records/s. The disk is ``-drive
    format=raw,if=virtio,cache=none,aio=io_uring`` (native or threads if
    QEMU or the host refuse io_uring; printed). Five contestants, each
    booted per run, in rotating order:

    * ``raw``: the VM's disk is a sparse raw file on --workdir's disk, no
      FUSE: the baseline, as a VM host runs it (cache=none: O_DIRECT on the
      file, each write goes to the disk);
    * ``raw-wb``: the same with ``cache=writeback``: writes land in the
      host's page cache, the guest's fsync becomes the host's fdatasync.
      This is the fairer baseline for the device, whose daemon writes the
      source through the page cache and fsyncs it on the guest's flush;
    * ``qemu-fuse``: the raw file exported writable through
      qemu-storage-daemon's FUSE export (file and raw nodes, QEMU's
      defaults: the host's page cache, fdatasync on a flush), the VM's disk
      is the export: QEMU's own way to show a disk as a file, the
      alternative the issue measures the device against;
    * ``device``: a fresh repository with a device ``vm`` on a sparse raw
      file, mounted, a full taken, the VM's disk is ``MNT/vm/device``;
    * ``backups``: the same, and the host writes ``incremental`` into
      ``MNT/vm/snapshot`` every --every seconds while the guest writes
      (at the guest's next synced batch after that time: the host is driven
      by the console, not by a timer), each trigger timed from write() to
      its return (complete and durable). ``empty=1``, so that every trigger
      makes a backup to check, even one with nothing new to copy.

    Every backup of the ``backups`` runs is checked as the VM test checks it
    (tests/test_vm.py): a consistent point in time, the last equal to the
    device (here the guest is told when a trigger returned, not when its job
    was seen copying: the bench does not slow its backups down to watch
    them). And for each contestant, the rate over the last quarter of a
    run's batches over the first (by the host's clock at each synced
    line): below 1, something the writes pay for grows as they go.

Why
    A device file is meant to be a VM's disk, backed up while the guest
    runs. The ratios say what the mount costs a guest (device/raw) and what
    taking backups costs it on top (backups/device).

Run by hand:  .venv/bin/python -m bench.vm_guest [--runs 3] [--every 2] [--slots 8192]
              [--passes 3] [--batch 256] [--writers 4] [--workdir DIR]
              .venv/bin/python -m bench.vm_guest --same-mount --runs 8   (one mount, no backups:
              does the write rate fall from boot to boot?)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import OurMount, QemuExport, mount_new_repo
from engine.units import format_size
from tests.vmguest import GuestFiles, GuestUnavailable, RunResult, kvm_unusable_reason, prepare_guest, run_guest
from tests.vmrecords import Schedule

CONTESTANTS = ("raw", "raw-wb", "qemu-fuse", "device", "backups")


@dataclass
class Outcome:
    runs: list[RunResult] = field(default_factory=list)
    backup_seconds: list[float] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def trigger(mnt: OurMount, kind: str) -> None:
    """``echo KIND > MNT/vm/snapshot``; the status in the error when it fails."""
    try:
        with open(mnt.path("vm", "snapshot"), "w") as f:
            f.write(kind + "\n")
    except OSError as e:
        with open(mnt.path("vm", "snapshot")) as f:
            raise RuntimeError(f"{kind} failed ({e.strerror}): {f.read()}") from None


def check_backups(mnt: OurMount, schedule: Schedule, result: RunResult) -> int:
    """Every backup a point in time (tests/test_vm.py's checks); the last equals the device."""
    names = sorted(n for n in os.listdir(mnt.path("vm", "backups")) if n != "latest")
    if len(names) != len(result.backups) + 2:
        raise AssertionError(f"{len(names)} backups, expected {len(result.backups) + 2}")
    points = [(names[0], -1, 0)] + [(n, b.synced, b.next_batch) for n, b in zip(names[1:], result.backups)]
    points.append((names[-1], schedule.batches - 1, schedule.batches))
    for name, synced, next_batch in points:
        with open(mnt.path("vm", "backups", name), "rb") as f:
            problems = schedule.check(f.read(), synced, next_batch if next_batch is not None else schedule.batches)
        if problems:
            raise AssertionError(f"backup {name}: " + "; ".join(problems[:3]))
    proc = subprocess.run(["cmp", mnt.path("vm", "backups", names[-1]), mnt.path("vm", "device")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"the last backup differs from the device: {proc.stdout}{proc.stderr}")
    return len(names)


def run_contestant(name: str, files: GuestFiles, schedule: Schedule, run_dir: Path, every: float,
                   log: Callable[[str], None]) -> tuple[RunResult, list[float]]:
    run_dir.mkdir()
    if name in ("raw", "raw-wb"):
        disk = run_dir / "disk.raw"
        sparse_file(disk, schedule.disk_bytes)
        cache = "none" if name == "raw" else "writeback"
        return run_guest(files, disk, schedule, run_dir, cache=cache, log=log), []
    if name == "qemu-fuse":
        disk = run_dir / "disk.raw"
        sparse_file(disk, schedule.disk_bytes)
        export = QemuExport(str(disk), "raw", str(run_dir / "export.raw"), True, str(run_dir / "qsd.log"))
        export.start()
        try:
            return run_guest(files, run_dir / "export.raw", schedule, run_dir, log=log), []
        finally:
            export.stop()
    source = run_dir / "vm.raw"
    sparse_file(source, schedule.disk_bytes)
    mnt = mount_new_repo(str(run_dir / "repo"), str(run_dir / "mnt"), {"vm": str(source)})
    try:
        trigger(mnt, "full")
        if name == "device":
            return run_guest(files, Path(mnt.path("vm", "device")), schedule, run_dir, log=log), []
        result = run_guest(files, Path(mnt.path("vm", "device")), schedule, run_dir,
                           trigger=lambda mark: trigger(mnt, "incremental empty=1"), every_seconds=every,
                           log=log)
        trigger(mnt, "incremental empty=1")
        check_backups(mnt, schedule, result)
        return result, [b.seconds for b in result.backups]
    finally:
        mnt.stop()


def same_mount_series(files: GuestFiles, schedule: Schedule, workdir: Path, boots: int,
                      log: Callable[[str], None]) -> None:
    """The VM booted ``boots`` times on one mount, no backup taken: does the
    device's write rate fall from boot to boot (something that grows with
    every write, as the issue saw with fio on one mount)?"""
    source = workdir / "vm.raw"
    sparse_file(source, schedule.disk_bytes)
    mnt = mount_new_repo(str(workdir / "repo"), str(workdir / "mnt"), {"vm": str(source)})
    rates = []
    try:
        trigger(mnt, "full")
        for b in range(boots):
            boot_dir = workdir / f"boot{b + 1}"
            boot_dir.mkdir()
            result = run_guest(files, Path(mnt.path("vm", "device")), schedule, boot_dir, log=log)
            rates.append(result.records_per_s)
            print(f"  boot {b + 1}/{boots}: {result.records_per_s:.0f} records/s, last quarter / first quarter "
                  f"{late_over_early(result, schedule):.2f}", flush=True)
            shutil.rmtree(boot_dir, ignore_errors=True)
    finally:
        mnt.stop()
    print(f"Same mount, {boots} boots, {boots * schedule.records} records: last boot / first boot "
          f"{rates[-1] / rates[0]:.2f}; per boot {' '.join(f'{r:.0f}' for r in rates)} records/s")


def late_over_early(result: RunResult, schedule: Schedule) -> float:
    """The write rate over the last quarter of the batches over that of the
    first: below 1, something the writes pay for grows as they go."""
    q = max(1, schedule.batches // 4)
    last = schedule.batches - 1
    return result.rate_between(last - q, last, schedule.batch) / result.rate_between(0, q, schedule.batch)


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    s = sorted(values)
    return f"{s[0]:.2f}/{statistics.median(s):.2f}/{s[-1]:.2f}"


def report(outcomes: dict[str, Outcome], schedule: Schedule, runs: int) -> None:
    print()
    print(f"Medians of {runs} runs (guest's own clock; records of 4 KiB, O_DIRECT, {schedule.writers} in flight, "
          f"fsync every {schedule.batch}):")
    print(f"{'':<10} {'records/s':>10} {'MB/s':>7} {'seconds':>8}   per run (records/s)")
    for name in CONTESTANTS:
        o = outcomes[name]
        per = " ".join(f"{r.records_per_s:.0f}" for r in o.runs)
        print(f"{name:<10} {o.median('records_per_s'):>10.0f} {o.median('mb_per_s'):>7.2f} "
              f"{o.median('guest_seconds'):>8.2f}   {per}")
    raw, wb, qsd, dev, bak = (outcomes[n].median("records_per_s") for n in CONTESTANTS)
    print()
    print("Ratios of the guest's write rate (1.0: no cost):")
    for label, ratio, what in (
        ("device / raw", dev / raw, "the mount against a raw file with cache=none"),
        ("device / raw-wb", dev / wb, "the mount against a raw file through the page cache"),
        ("device / qemu-fuse", dev / qsd, "the mount against QEMU's FUSE export of a raw file"),
        ("backups / device", bak / dev, "what taking incrementals while it writes costs it"),
        ("backups / raw", bak / raw, ""),
    ):
        print(f"  {label:<18} = {ratio:.2f}" + (f"   ({what})" if what else ""))
    print()
    print("Does a run slow down as it goes? Records/s over the last quarter of the batches / over the")
    print("first quarter (host clock at each synced line; 1.0: steady; per run):")
    for name in CONTESTANTS:
        ratios = [late_over_early(r, schedule) for r in outcomes[name].runs]
        print(f"  {name:<10} {statistics.median(ratios):.2f}   ({' '.join(f'{x:.2f}' for x in ratios)})")
    times = outcomes["backups"].backup_seconds
    counts = [len(r.backups) for r in outcomes["backups"].runs]
    print()
    print(f"Incrementals while the guest wrote: {sum(counts)} ({', '.join(map(str, counts))} per run), "
          f"seconds min/median/max {spread(times)} (trigger write() to its return: complete and durable)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vm_guest", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="boots per contestant (default 3)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between incrementals (default 2)")
    p.add_argument("--slots", type=int, default=8192, help="record slots, a power of two (default 8192)")
    p.add_argument("--passes", type=int, default=3, help="passes over the slots (default 3)")
    p.add_argument("--batch", type=int, default=256, help="records per fsync (default 256)")
    p.add_argument("--spacing", type=int, default=8192, help="bytes between slots (default 8192)")
    p.add_argument("--writers", type=int, default=4,
                   help="guest threads writing each batch, so many requests are in flight (default 4)")
    p.add_argument("--same-mount", action="store_true",
                   help="instead: boot the VM --runs times on one mount, no backups, and say whether the "
                        "device's write rate falls from boot to boot")
    p.add_argument("--workdir", help="where disks and repositories go (default: a new dir in /var/tmp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    schedule = Schedule(args.slots, args.passes, args.batch, args.spacing, args.writers)
    workdir = Path(tempfile.mkdtemp(prefix="backupfs-vm_guest-", dir=args.workdir or "/var/tmp"))
    said: set[str] = set()

    def log(message: str) -> None:  # start_vm's notes (TCG, aio fallback) once, not per boot
        if message not in said:
            said.add(message)
            print(message)

    try:
        try:
            files = prepare_guest(workdir)
        except GuestUnavailable as e:
            raise SystemExit(f"vm_guest: {e}") from None
        why = kvm_unusable_reason()
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
        print(f"backupfs vm_guest: {schedule.records} records over {schedule.slots} slots "
              f"({format_size(schedule.disk_bytes)} disk, {format_size(schedule.records * 4096)} written), "
              f"{args.runs} runs, an incremental every {args.every:g} s in the backups runs")
        print(f"{qemu.splitlines()[0] if qemu else 'qemu-system-x86_64'}, guest kernel {files.kernel.release}, "
              f"{'KVM' if why is None else 'TCG (' + why + ')'}, {os.cpu_count()} CPUs, "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if why is not None:
            print("  note: under TCG the guest's CPU is emulated; it, not the disk, bounds the rates")
        if args.same_mount:
            same_mount_series(files, schedule, workdir, args.runs, log)
            return 0
        outcomes = {n: Outcome() for n in CONTESTANTS}
        for r in range(args.runs):
            k = r % len(CONTESTANTS)
            order = CONTESTANTS[k:] + CONTESTANTS[:k]
            line = []
            for name in order:
                t0 = time.monotonic()
                result, times = run_contestant(name, files, schedule, workdir / f"run{r + 1}-{name}", args.every,
                                               log)
                outcomes[name].runs.append(result)
                outcomes[name].backup_seconds += times
                extra = f", {len(times)} incrementals" if name == "backups" else ""
                line.append(f"{name} {result.records_per_s:.0f} rec/s ({time.monotonic() - t0:.0f} s boot to "
                            f"power-off{extra})")
                shutil.rmtree(workdir / f"run{r + 1}-{name}", ignore_errors=True)
            aio = outcomes["raw"].runs[-1].aio
            print(f"  run {r + 1}/{args.runs} (aio={aio}): " + "; ".join(line), flush=True)
        report(outcomes, schedule, args.runs)
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
