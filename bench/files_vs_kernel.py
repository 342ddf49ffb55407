"""Files inside a backup: backupfs's ``files/`` against the kernel's ext4 on a loop device.

What is measured
    One guest disk, GPT (sgdisk), two ext4 partitions made by
    ``mkfs.ext4 -d`` from staged directories at their offsets (``-E
    offset=``; no mount needed to make them):

    * p1: a BIG file of random bytes (default 200 MiB) and FILES small files
      (default 10,000, 0-8 KiB of random bytes each) in DIRS directories;
    * p2: MANY small files (default 100,000, 64 bytes each) in about 1,000
      directories, for the memory figure.

    A backupfs repository with that disk as a device, one full backup,
    ``backupfs mount REPO MNT``. Two contestants read the same backup:

    * ``kernel``: the backup's raw file ``MNT/<dev>/backups/<id>`` on a
      read-only loop device at p1's offset (``losetup -r -o OFFSET
      --sizelimit SIZE``: partition scanning does not work here), mounted
      ``-t ext4 -o ro``: the host kernel parses the guest's ext4;
    * ``ours``: ``MNT/<dev>/files/<id>/p1/``: the same bytes parsed in user
      space by the daemon (engine/guest/).

    Two cases, the contestants alternating (kernel first on even rounds),
    ``sync; echo 3 > /proc/sys/vm/drop_caches`` before every run:

    * ``read``: ``dd if=BIG of=/dev/null bs=1M``, MB/s (decimal);
    * ``walk``: ``find p1/small -printf '%s %m %T@\\n' > /dev/null``, seconds.

    Dropping caches empties the page cache of the backup's qcow2 image as
    well as each side's own caches (the loop device's, ext4's dentries and
    inodes, our mount's page cache and dentries), so both sides start from
    the disk every run. What the drop does *not* empty is the daemon's own
    memory: its open volume and its cache of parsed directory listings
    (engine/guest/volume.py, up to 200,000 entries) stay, as the kernel's
    would if it were not told to drop them. So round 1 of ``walk`` (nothing
    parsed yet, on both sides) is also shown alone as ``first walk``.

    Memory: the daemon's resident set (VmRSS of the pid in REPO/mount.json)
    before a ``find`` walk of p2's 100,000 files through ``files/``, right
    after it, and after ``echo 2 > /proc/sys/vm/drop_caches`` (the kernel
    forgets its dentries and inodes, and sends FORGET: our node table drops
    the guest nodes it held, backupfs/tree.py InodeTable.forget), and after
    a second walk of the same files (no growth: memory follows what is
    held and cached, not how much was walked).

Why
    Issue 21's goals, one run: read >= 0.8x the kernel's MB/s, walk >= 0.25x
    (kernel seconds / ours). Correctness is checked after the timing (so
    that round 1 is cold): the BIG file's hash through both sides equals
    the staged file's, and both walks print the same lines (with paths).

Dropping caches is machine-wide: it also empties the page cache that any
other work on the machine relies on. The header and the footer print the
load and the CPU/IO pressure (PSI) to judge the noise.

Run by hand (root: it drops caches and mounts a loop device):
    .venv/bin/python -m bench.files_vs_kernel [--runs 3] [--big 200M]
        [--files 10000] [--many 100000] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.servers import (OurMount, backupfs_command, cpu_seconds, drop_caches, first_line, fs_type, mounted_at,
                                pressure, run)
from engine.units import format_size, parse_size

MiB = 1 << 20
MB = 1e6  # decimal MB/s, as dd prints it
SECTOR = 512
DEVICE = "vm1"
VOLUME = "p1"
SMALL_MAX = 8 * 1024  # p1's small files: 0 to this many bytes
MANY_BYTES = 64  # p2's files
MANY_PER_DIR = 100
WALK_FORMAT = "%s %m %T@\n"  # find -printf's format, a real newline
GOAL_READ = 0.8  # ours MB/s / kernel MB/s
GOAL_WALK = 0.25  # kernel seconds / ours
CASES = ("read", "walk")


# -- the guest disk ------------------------------------------------------------------------------


def stage_p1(root: str, big: int, files: int, dirs: int, rng: random.Random) -> str:
    """p1's tree: ``big.bin`` and ``small/dNNN/fNNNNN``; returns the big file's sha256."""
    digest = hashlib.sha256()
    with open(os.path.join(root, "big.bin"), "wb") as f:
        for off in range(0, big, 4 * MiB):
            chunk = os.urandom(min(4 * MiB, big - off))
            digest.update(chunk)
            f.write(chunk)
    for i in range(files):
        d = os.path.join(root, "small", f"d{i % dirs:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
            f.write(rng.randbytes(rng.randrange(SMALL_MAX + 1)))
    return digest.hexdigest()


def stage_p2(root: str, many: int) -> None:
    """p2's tree: ``many`` files of MANY_BYTES in directories of MANY_PER_DIR."""
    payload = b"x" * MANY_BYTES
    for i in range(many):
        d = os.path.join(root, "many", f"d{i // MANY_PER_DIR:04d}")
        if i % MANY_PER_DIR == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
            f.write(payload)


@dataclass
class Partition:
    number: int
    offset: int
    size: int


def make_disk(path: str, parts: list[tuple[int, str, int]]) -> list[Partition]:
    """A sparse GPT disk with one ext4 partition per (size, staged dir, inodes), from 1 MiB."""
    out, start = [], MiB
    for number, (size, _, _) in enumerate(parts, 1):
        out.append(Partition(number, start, size))
        start += size
    with open(path, "wb") as f:
        f.truncate(start + MiB)  # the backup GPT at the end
    args = ["sgdisk", "-o"]
    for p in out:
        args += ["-n", f"{p.number}:{p.offset // SECTOR}:{(p.offset + p.size) // SECTOR - 1}", "-t", f"{p.number}:8300"]
    run([*args, path])
    for p, (_, staged, inodes) in zip(out, parts):
        run(["mkfs.ext4", "-q", "-F", "-N", str(inodes), "-L", f"p{p.number}", "-E", f"offset={p.offset}",
             "-d", staged, path, f"{p.size // 1024}k"])
    return out


def fs_size(staged_bytes: int) -> int:
    """A partition size with room for the staged bytes and ext4's own, 1 MiB-aligned."""
    return (int(staged_bytes * 1.3) + 64 * MiB) // MiB * MiB


# -- the kernel's side -----------------------------------------------------------------------------


class KernelMount:
    """A read-only loop device over a range of a file, and ext4 mounted from it."""

    def __init__(self, backing: str, part: Partition, mnt: str) -> None:
        self.backing = backing
        self.part = part
        self.mnt = mnt
        self.loop: str | None = None

    def start(self) -> None:
        self.loop = run(["losetup", "-r", "-f", "--show", "-o", str(self.part.offset),
                         "--sizelimit", str(self.part.size), self.backing]).strip()
        run(["mount", "-t", "ext4", "-o", "ro,nodev,nosuid,noexec", self.loop, self.mnt])

    def stop(self) -> None:
        if mounted_at(self.mnt) is not None:
            proc = subprocess.run(["umount", self.mnt], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"warning: umount {self.mnt}: {proc.stderr.strip()}; lazy", file=sys.stderr)
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        if self.loop is not None:
            proc = subprocess.run(["losetup", "-d", self.loop], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"warning: losetup -d {self.loop}: {proc.stderr.strip()}", file=sys.stderr)
            self.loop = None


# -- the measurements -------------------------------------------------------------------------------


def timed(argv: list[str], stdout: int | None = subprocess.DEVNULL) -> float:
    """Wall-clock seconds of one process, which must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, env=dict(os.environ, LC_ALL="C"))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return seconds


def read_seconds(path: str) -> float:
    drop_caches()
    return timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])


def walk_seconds(path: str) -> float:
    drop_caches()
    return timed(["find", path, "-printf", WALK_FORMAT])


def walk_lines(path: str) -> list[str]:
    """What the walk prints, with each path relative to ``path``, sorted."""
    out = run(["find", path, "-printf", "%P " + WALK_FORMAT])
    return sorted(out.splitlines())


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Samples:
    big: int
    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # the daemon's, per run

    def add(self, who: str, case: str, seconds: float, cpu: float) -> None:
        self.seconds.setdefault((who, case), []).append(seconds)
        self.cpu.setdefault((who, case), []).append(cpu)

    def get(self, who: str, case: str) -> list[float]:
        return self.seconds[(who, case)]


def bench_rounds(paths: dict[str, dict[str, str]], runs: int, samples: Samples, daemon: int) -> None:
    """A B A B: per round, each case by both contestants, the first one alternating.

    With each run, the daemon's CPU seconds: it serves both sides (the
    kernel's loop device reads the backup's file from it), and on a shared
    machine its CPU time varies much less than the wall clock."""
    for r in range(runs):
        order = ("kernel", "ours") if r % 2 == 0 else ("ours", "kernel")
        for case in ("walk", "read"):  # walk first: round 1 is the first look into the tree
            for who in order:
                fn = walk_seconds if case == "walk" else read_seconds
                cpu = cpu_seconds(daemon)
                seconds = fn(paths[who][case])
                samples.add(who, case, seconds, cpu_seconds(daemon) - cpu)
        print(f"  round {r + 1}/{runs} done ({pressure()})", flush=True)


def verify(paths: dict[str, dict[str, str]], big_sha: str) -> int:
    """Both sides give the staged big file and the same walk; returns the walk's line count."""
    for who in paths:
        got = file_sha256(paths[who]["read"])
        if got != big_sha:
            raise RuntimeError(f"{who}'s {paths[who]['read']} differs from the staged file ({got} != {big_sha})")
    kernel, ours = walk_lines(paths["kernel"]["walk"]), walk_lines(paths["ours"]["walk"])
    if kernel != ours:
        diff = sorted(set(kernel) ^ set(ours))[:5]
        raise RuntimeError(f"the walks differ ({len(kernel)} lines vs {len(ours)}), e.g. {diff}")
    return len(kernel)


def measure_memory(pid: int, ours: str, kernel: str) -> dict[str, float]:
    """Daemon RSS (KiB) around a walk of p2 through files/, and the walk's seconds on both sides."""
    out: dict[str, float] = {}
    drop_caches()
    out["rss before"] = rss_kib(pid)
    out["walk ours"] = timed(["find", ours, "-printf", WALK_FORMAT])
    out["rss after walk"] = rss_kib(pid)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    # FORGETs reach the daemon as the kernel drops its inodes; their
    # handling is not synchronous with the drop: a lookup of the dropped
    # parent goes to the daemon after them (not a guarantee, the order of
    # one queue).
    os.stat(os.path.dirname(ours))
    out["rss after forget"] = rss_kib(pid)
    # A second walk of the same files: if what was walked were kept (not
    # only what is held), this would grow again.
    drop_caches()
    timed(["find", ours, "-printf", WALK_FORMAT])
    out["rss after 2nd walk"] = rss_kib(pid)
    drop_caches()
    out["walk kernel"] = timed(["find", kernel, "-printf", WALK_FORMAT])
    return out


# -- the report ------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"min {min(values):7.3f}  median {statistics.median(values):7.3f}  max {max(values):7.3f}"


def cpu_spread(samples: Samples, who: str, case: str) -> str:
    """The daemon's CPU seconds per run, as listed (round 1 first)."""
    return " ".join(f"{c:.2f}" for c in samples.cpu[(who, case)])


def report(samples: Samples, lines: int, memory: dict[str, float], many: int) -> None:
    big = samples.big
    mbps = {who: [big / s / MB for s in samples.get(who, "read")] for who in ("kernel", "ours")}
    print()
    print(f"Sequential read of the {format_size(big)} file (dd bs=1M, caches dropped), MB/s, "
          f"{len(mbps['ours'])} runs each:")
    for who in ("kernel", "ours"):
        print(f"  {who:<7} {spread(mbps[who])}   daemon cpu s: {cpu_spread(samples, who, 'read')}")
    print(f"Walk of {lines:,} entries (find -printf '{WALK_FORMAT.strip()}\\n', caches dropped), seconds:")
    for who in ("kernel", "ours"):
        print(f"  {who:<7} {spread(samples.get(who, 'walk'))}   daemon cpu s: {cpu_spread(samples, who, 'walk')}")
    first_k, first_o = samples.get("kernel", "walk")[0], samples.get("ours", "walk")[0]
    print(f"  first walk (round 1, nothing parsed on either side): kernel {first_k:.3f} s, ours {first_o:.3f} s,"
          f" ratio {first_k / first_o:.2f}")
    print()
    print(f"Memory of the daemon, a walk of p2's {many:,} files through files/ "
          f"(ours {memory['walk ours']:.2f} s, kernel {memory['walk kernel']:.2f} s, caches dropped first):")
    for key in ("rss before", "rss after walk", "rss after forget", "rss after 2nd walk"):
        print(f"  {key:<19} {memory[key] / 1024:8.1f} MiB")
    print("  (the volume keeps up to 200,000 parsed entries in its listing cache, engine/guest/volume.py;")
    print("  freed Python objects seldom go back to the system, so RSS shows the high-water mark)")
    print()
    print("Goals (medians; the best run of each side in brackets):")
    read_ratio = statistics.median(mbps["ours"]) / statistics.median(mbps["kernel"])
    read_best = max(mbps["ours"]) / max(mbps["kernel"])
    walk_ratio = statistics.median(samples.get("kernel", "walk")) / statistics.median(samples.get("ours", "walk"))
    walk_best = min(samples.get("kernel", "walk")) / min(samples.get("ours", "walk"))
    print(f"  read ours/kernel MB/s        = {read_ratio:5.2f} ({read_best:.2f})  (goal >= {GOAL_READ})"
          f"  {'met' if read_ratio >= GOAL_READ else 'MISSED'}")
    print(f"  walk kernel s/ours s         = {walk_ratio:5.2f} ({walk_best:.2f})  (goal >= {GOAL_WALK})"
          f"  {'met' if walk_ratio >= GOAL_WALK else 'MISSED'}")


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="rounds, each contestant once per case (default 3)")
    p.add_argument("--big", default="200M", help="the big file's size (default 200M)")
    p.add_argument("--files", type=int, default=10_000, help="small files on p1 (default 10000)")
    p.add_argument("--dirs", type=int, default=200, help="directories they are spread over (default 200)")
    p.add_argument("--many", type=int, default=100_000, help="files on p2 for the memory figure (default 100000)")
    p.add_argument("--workdir", help="where to work (default: a new dir in /var/tmp); not tmpfs")
    p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    p.add_argument("--hold", action="store_true",
                   help="after the report, wait for Enter before cleaning up (to profile the daemon)")
    p.add_argument("--seed", type=int, default=20261206)
    return p.parse_args(argv)


def check_environment(parent: str, big: int) -> None:
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark drops caches and mounts a loop device")
    for tool in ("sgdisk", "mkfs.ext4", "losetup", "mount", "find", "dd", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    kind = fs_type(parent)
    if kind in ("tmpfs", "ramfs"):
        raise SystemExit(f"{parent} is on {kind}: cold reads need a real disk; pass --workdir")
    need = 4 * big + (2 << 30)
    if shutil.disk_usage(parent).free < need:
        raise SystemExit(f"{parent} has less than {format_size(need)} free")


def build(workdir: str, args: argparse.Namespace, big: int) -> tuple[str, list[Partition]]:
    """Stage both trees and make the disk: (the disk image, its partitions). The big file's
    sha256 is left in WORKDIR/big.sha256, the staged trees are removed."""
    rng = random.Random(args.seed)
    p1, p2 = os.path.join(workdir, "stage-p1"), os.path.join(workdir, "stage-p2")
    os.mkdir(p1)
    os.mkdir(p2)
    big_sha = stage_p1(p1, big, args.files, args.dirs, rng)
    with open(os.path.join(workdir, "big.sha256"), "w") as f:
        f.write(big_sha)
    stage_p2(p2, args.many)
    p1_size = fs_size(big + args.files * (SMALL_MAX // 2 + 4096))
    p2_size = fs_size(args.many * 4096 * 2)
    disk = os.path.join(workdir, "guest.img")
    parts = make_disk(disk, [(p1_size, p1, args.files + args.dirs + 1024),
                             (p2_size, p2, args.many + args.many // MANY_PER_DIR + 1024)])
    shutil.rmtree(p1)
    shutil.rmtree(p2)
    return disk, parts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    big = parse_size(args.big)
    parent = args.workdir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    check_environment(parent, big)
    workdir = tempfile.mkdtemp(prefix="backupfs-files_vs_kernel-", dir=parent)
    print(f"backupfs files_vs_kernel: {format_size(big)} file and {args.files:,} small files in {args.dirs} dirs "
          f"(p1), {args.many:,} files (p2); GPT disk, ext4; {args.runs} rounds")
    print(f"python {platform.python_version()}, {first_line(['mkfs.ext4', '-V'])}, kernel {platform.release()}, "
          f"{os.cpu_count()} CPUs")
    print(f"work dir {workdir} ({fs_type(workdir)}); {pressure()}", flush=True)

    repo, mnt, kmnt = (os.path.join(workdir, n) for n in ("repo", "mnt", "kernel"))
    os.mkdir(mnt)
    os.mkdir(kmnt)
    mount = OurMount(repo, mnt)
    kernel: KernelMount | None = None
    try:
        t0 = time.perf_counter()
        disk, parts = build(workdir, args, big)
        with open(os.path.join(workdir, "big.sha256")) as f:
            big_sha = f.read()
        run(backupfs_command() + ["init", repo])
        run(backupfs_command() + ["device", "add", repo, DEVICE, disk])
        run(backupfs_command() + ["backup", repo, DEVICE, "full"])
        mount.start()
        assert mount.pid is not None
        backup_id = os.readlink(mount.path(DEVICE, "backups", "latest"))
        print(f"disk made and backed up in {time.perf_counter() - t0:.1f} s (backup {backup_id}); "
              f"p1 at {parts[0].offset} ({format_size(parts[0].size)}), p2 at {parts[1].offset} "
              f"({format_size(parts[1].size)}); daemon pid {mount.pid}", flush=True)

        raw = mount.path(DEVICE, "backups", backup_id)
        kernel = KernelMount(raw, parts[0], kmnt)
        kernel.start()
        ours = mount.path(DEVICE, "files", backup_id, VOLUME)
        paths = {"kernel": {"read": os.path.join(kmnt, "big.bin"), "walk": os.path.join(kmnt, "small")},
                 "ours": {"read": os.path.join(ours, "big.bin"), "walk": os.path.join(ours, "small")}}
        samples = Samples(big)
        bench_rounds(paths, args.runs, samples, mount.pid)
        lines = verify(paths, big_sha)
        print(f"  verified: the big file's sha256 matches on both sides; both walks print the same {lines:,} lines")
        kernel.stop()
        kernel = KernelMount(raw, parts[1], kmnt)
        kernel.start()
        memory = measure_memory(mount.pid, mount.path(DEVICE, "files", backup_id, "p2", "many"),
                                os.path.join(kmnt, "many"))
        print(f"after the runs: {pressure()}")
        report(samples, lines, memory, args.many)
        if args.hold:
            try:
                input(f"holding: daemon pid {mount.pid}, ours {ours}, kernel {kmnt}; Enter cleans up ")
            except EOFError:
                pass
        return 0
    finally:
        if kernel is not None:
            kernel.stop()
        mount.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
