"""A VM-like workload against a mounted device, with incrementals every few seconds.

Shared by tests/test_soak.py (half a minute in CI) and bench/soak.py (ten
minutes or more, by hand). A writer thread writes random 4-64 KiB blocks
into MOUNT/vm/device at a fixed rate; every few seconds `echo incremental`
takes a backup and a copy of the device taken at the trigger is hashed.
At the end every backup is verified against its recorded checksums
(`echo verify`), each backup's content is compared with the hash of the
device at its trigger, and the daemon's resident memory is compared with
what it was after the first backups.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.commands import backupfs_cmd

KiB = 1024
MiB = 1024 * KiB


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SoakResult:
    seconds: float
    backups: int
    writes: int
    bytes_written: int
    mismatches: int
    verify_ok: bool
    rss_start_kib: int
    rss_end_kib: int
    rss_peak_kib: int
    backup_seconds: list[float] = field(default_factory=list)

    def render(self) -> str:
        bs = sorted(self.backup_seconds)
        med = bs[len(bs) // 2] if bs else 0.0
        return (
            f"{self.seconds:.0f} s, {self.backups} incrementals (median {med:.3f} s, max {max(bs, default=0):.3f} s), "
            f"{self.writes} guest writes ({self.bytes_written / MiB:.1f} MiB)\n"
            f"mismatches against trigger-time copies: {self.mismatches}; verify: {'ok' if self.verify_ok else 'FAILED'}\n"
            f"daemon RSS: {self.rss_start_kib / 1024:.1f} MiB after the first backups, "
            f"{self.rss_end_kib / 1024:.1f} MiB at the end, peak {self.rss_peak_kib / 1024:.1f} MiB"
        )


def _trigger(snap: Path) -> None:
    fd = os.open(snap, os.O_WRONLY)
    try:
        os.write(fd, b"incremental auto_full=1 empty=1\n")  # one backup a trigger: each is checked
    finally:
        os.close(fd)


def soak(root: Path, seconds: float, interval: float = 3.0, size: int = 64 * MiB,
         write_rate: int = 2 * MiB, seed: int = 1) -> SoakResult:
    root.mkdir(parents=True, exist_ok=True)
    src, repo, mnt = root / "vm.img", root / "repo", root / "mnt"
    mnt.mkdir(exist_ok=True)
    with open(src, "wb") as f:
        f.truncate(size)
    run = lambda *a: subprocess.run(backupfs_cmd() + list(a), capture_output=True, text=True, timeout=600)  # noqa: E731
    assert run("init", str(repo)).returncode == 0
    assert run("device", "add", str(repo), "vm", str(src)).returncode == 0
    assert run("mount", str(repo), str(mnt)).returncode == 0
    pid = json.loads((repo / "mount.json").read_text())["pid"]
    dev = mnt / "vm" / "device"
    snap = mnt / "vm" / "snapshot"
    stop = threading.Event()
    paused = threading.Lock()  # held while a trigger-time copy is taken
    counts = {"writes": 0, "bytes": 0}

    def writer() -> None:
        rng = random.Random(seed)
        fd = os.open(dev, os.O_WRONLY)
        try:
            t0 = time.monotonic()
            while not stop.is_set():
                n = rng.choice([4 * KiB, 16 * KiB, 64 * KiB])
                off = rng.randrange(0, size - n) // 512 * 512
                with paused:
                    os.pwrite(fd, rng.randbytes(n), off)
                counts["writes"] += 1
                counts["bytes"] += n
                ahead = counts["bytes"] / write_rate - (time.monotonic() - t0)
                if ahead > 0:
                    stop.wait(ahead)  # the workload's fixed rate
        finally:
            os.close(fd)

    expected: dict[str, str] = {}
    durations: list[float] = []
    rss_start = rss_peak = 0
    thread = threading.Thread(target=writer)
    started = time.monotonic()
    try:
        thread.start()
        while time.monotonic() - started < seconds:
            # The device at the trigger instant: writes pause while we hash it
            # and until the job has frozen its bitmap (its progress shows),
            # then resume and race with the running backup.
            paused.acquire()
            try:
                digest = sha256_of(dev)
                t = time.monotonic()
                trigger = threading.Thread(target=_trigger, args=(snap,))
                trigger.start()
                while trigger.is_alive() and "bytes: " not in snap.read_text():
                    pass
            finally:
                paused.release()
            trigger.join()
            durations.append(time.monotonic() - t)
            status = dict(line.split(": ", 1) for line in snap.read_text().splitlines() if ": " in line)
            expected[status["backup"]] = digest
            rss = rss_kib(pid)
            rss_peak = max(rss_peak, rss)
            if len(expected) == 3:
                rss_start = rss
            stop.wait(interval)
        stop.set()
        thread.join()
        fd = os.open(snap, os.O_WRONLY)
        try:
            os.write(fd, b"verify\n")
            verify_ok = True
        except OSError:
            verify_ok = False
        finally:
            os.close(fd)
        mismatches = sum(1 for bid, d in expected.items() if sha256_of(mnt / "vm" / "backups" / bid) != d)
        rss_end = rss_kib(pid)
    finally:
        stop.set()
        thread.join()
        run("umount", str(mnt))
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    return SoakResult(time.monotonic() - started, len(expected), counts["writes"], counts["bytes"], mismatches,
                      verify_ok, rss_start or rss_end, rss_end, max(rss_peak, rss_end), durations)
