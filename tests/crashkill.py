"""SIGKILL at random moments, then prove nothing was lost or half-written.

Shared by tests/test_crash_kill.py (a few kills in CI) and
bench/crash_kill.py (hundreds, by hand). Each round:

1. the device changes (through the mount when the daemon is the victim,
   behind backupfs's back when the CLI is);
2. the victim starts a full, an incremental or a prune, and is killed with
   SIGKILL after a random delay (the delay is the experiment's variable,
   not a synchronisation);
3. the repository must then open (recovery), show the old backups or the
   old ones plus/minus exactly the one the operation was making/removing,
   pass `qemu-img check` and `verify`, read every surviving backup exactly
   as before, and take a next incremental equal to the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from backupfs.mountinfo import wait_for_exit
from engine.repo import Repository
from tests.commands import backupfs_cmd

KiB = 1024
MiB = 1024 * KiB


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[arg-type]


@dataclass
class Tally:
    kills: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # "old" | "new"
    finished_before_kill: int = 0

    def add(self, kind: str, outcome: str) -> None:
        self.kills += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class Lab:
    """A repository, a 32 MiB device and a mount point, in ``root``."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.src = root / "vm.img"
        self.repo = root / "repo"
        self.mnt = root / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.src, "wb") as f:
            f.truncate(32 * MiB)
            for _ in range(16):
                f.seek(self.rng.randrange(0, 31 * MiB))
                f.write(self.rng.randbytes(self.rng.randrange(4 * KiB, 1 * MiB)))
        _run(backupfs_cmd() + ["init", str(self.repo)]).check_returncode()
        _run(backupfs_cmd() + ["device", "add", str(self.repo), "vm", str(self.src)]).check_returncode()
        _run(backupfs_cmd() + ["backup", str(self.repo), "vm", "full"]).check_returncode()

    # -- the state before and after ----------------------------------------------

    def digests(self) -> dict[str, str]:
        with Repository.open(str(self.repo)) as repo:
            out = {}
            for b in repo.backups("vm"):
                with repo.open_backup(b.id) as view:
                    out[b.id] = hashlib.sha256(view.read(0, view.size)).hexdigest()
            return out

    def check(self, before: dict[str, str], kind: str) -> str:
        """All invariants after a kill; returns 'old' or 'new'."""
        with Repository.open(str(self.repo)) as repo:
            ids = [b.id for b in repo.backups("vm")]
            for b in repo.backups("vm"):
                proc = _run(["qemu-img", "check", repo.image_path(b)])
                assert proc.returncode == 0 and "No errors" in proc.stdout, proc.stdout + proc.stderr
            report = repo.verify("vm")
            assert report.ok, report.render()
            ddir = self.repo / "devices" / "vm"
            assert not [f for f in os.listdir(ddir) if f.startswith(".tmp")]
        after = self.digests()
        old = sorted(before)
        if ids == old:
            outcome = "old"
        elif kind == "prune":
            assert len(ids) == len(old) - 1 and set(ids) < set(old), (ids, old)
            outcome = "new"
        else:
            assert ids[:-1] == old and ids[-1] not in before, (ids, old)
            outcome = "new"
        for bid, digest in after.items():
            if bid in before:
                assert before[bid] == digest, f"backup {bid} reads differently after the kill"
        # No dirty bit lost: the next incremental is the device.
        proc = _run(backupfs_cmd() + ["backup", str(self.repo), "vm", "incremental"])
        assert proc.returncode == 0, proc.stderr
        with Repository.open(str(self.repo)) as repo:
            latest = repo.backups("vm")[-1]
            cmp = _run(["qemu-img", "compare", "-F", "raw", repo.image_path(latest), str(self.src)])
            assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        return outcome

    # -- victims -------------------------------------------------------------------------

    def change_source_directly(self) -> None:
        with open(self.src, "r+b") as f:
            for _ in range(4):
                f.seek(self.rng.randrange(0, 32 * MiB - 200 * KiB))
                f.write(self.rng.randbytes(self.rng.randrange(1, 200 * KiB)))

    def kill_cli(self, kind: str, tally: Tally) -> None:
        before = self.digests()
        if kind == "prune":
            ids = sorted(before)
            if len(ids) < 3:
                _run(backupfs_cmd() + ["backup", str(self.repo), "vm", "incremental", "--allow-empty"]
                     ).check_returncode()  # one more to prune, changed or not
                before = self.digests()
                ids = sorted(before)
            args = ["prune", str(self.repo), "vm", "--remove", ids[self.rng.randrange(0, len(ids) - 1)]]
            delay = self.rng.uniform(0, 0.8)
        else:
            self.change_source_directly()
            args = ["backup", str(self.repo), "vm", kind, "--rate", "16M"]
            delay = self.rng.uniform(0, 2.5)
        proc = subprocess.Popen(backupfs_cmd() + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        if proc.poll() is not None:
            tally.finished_before_kill += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tally.add(f"cli-{kind}", self.check(before, kind))

    def kill_daemon(self, kind: str, tally: Tally) -> None:
        before = self.digests()
        if kind == "prune" and len(before) < 3:
            kind = "incremental"
        proc = _run(backupfs_cmd() + ["mount", str(self.repo), str(self.mnt)])
        assert proc.returncode == 0, proc.stderr
        pid = json.loads((self.repo / "mount.json").read_text())["pid"]
        try:
            dev = self.mnt / "vm" / "device"
            with open(dev, "r+b", buffering=0) as f:  # changes tracked by the bitmap
                for _ in range(4):
                    f.seek(self.rng.randrange(0, 32 * MiB - 200 * KiB))
                    f.write(self.rng.randbytes(self.rng.randrange(1, 200 * KiB)))
            if kind == "prune":
                ids = sorted(before)
                line = f"prune remove={ids[self.rng.randrange(0, len(ids) - 1)]}"
                delay = self.rng.uniform(0, 0.8)
            else:
                line = f"{kind} rate=16M"
                delay = self.rng.uniform(0, 2.5)
            trigger = subprocess.Popen(["bash", "-c", f"echo '{line}' > {self.mnt / 'vm' / 'snapshot'}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            trigger.wait(timeout=60)
        finally:
            wait_for_exit(pid, 60)
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        tally.add(f"daemon-{kind}", self.check(before, kind))

    def cleanup(self) -> None:
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def run_rounds(lab: Lab, kills: int, tally: Tally) -> Tally:
    kinds = ["full", "incremental", "prune"]
    for i in range(kills):
        kind = kinds[i % 3]
        if i % 2 == 0:
            lab.kill_cli(kind, tally)
        else:
            lab.kill_daemon(kind, tally)
    return tally
