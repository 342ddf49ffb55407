"""Served I/O through the mount: backupfs's FUSE files against QEMU's FUSE export.

What is measured
    One chain built through backupfs itself, on a real disk: a SIZE-sized
    device (default 1 GiB) of random, incompressible data in most of it
    (about one 4 MiB chunk in eight left as zeros), ``echo full``, then
    rounds of scattered 64 KiB writes through ``MNT/vm1/device`` (DIRTY % of
    the disk each, default 2 %) each followed by ``echo incremental``, until
    the chain is 64 deep. The tips at depth 1 (the full), 8 and 64 are kept.
    For each of those tips, whole-disk sequential reads with
    ``dd if=FILE of=/dev/null bs=1M`` by two contestants:

    * ``ours``: the backup's file ``MNT/vm1/backups/<id>`` on the mount;
    * ``qemu``: qemu-storage-daemon serving the *same* qcow2 file (it opens
      the backing chain from the image headers, read-only) through its FUSE
      export (``--export type=fuse,writable=off``) onto a regular file.

    Three modes. The first two after ``sync; echo 3 > /proc/sys/vm/drop_caches``
    (so the image files come from the disk, and neither contestant's page
    cache of the served file helps):

    * ``cold``: plain buffered ``dd`` (kernel readahead decides the request
      size; our mount raises its bdi read_ahead_kb to 4096, QEMU's export
      keeps the kernel default, as each ships);
    * ``direct``: ``dd iflag=direct`` (1 MiB requests where the file system
      lets them through).

    And ``warm``: ``dd iflag=direct`` again, but with every image file of
    the chain (and the baseline's raw file) read into the host page cache
    first. Cold reads are bound by the disk for both contestants (the
    baseline line shows how close each gets to plain ``dd`` of a raw file);
    warm-direct takes the disk out and measures what the issue's P1 is
    about, the serving path itself: FUSE request handling, the chain
    lookup, the copy. Its baseline is plain buffered ``dd`` of the raw file
    from the page cache (``iflag=direct`` there would go to the disk).

    For context, not as a contestant, the same tips read by a plain local
    reader, bench/pread_floor.c: no FUSE, no read-ahead advice, one blocking
    pread per piece that ``qemu-img map`` lists, 1 MiB at a time (after
    dropping caches for cold and direct, which are the same read for it).
    Its depth-64/depth-1 ratio is what depth costs a reader that only has
    the kernel's own read-ahead.

    And writes (P5): a fresh (sparse) raw file of SIZE per contestant,
    ``dd if=SRC of=TARGET bs=1M conv=fsync,notrunc`` from a random-data SRC
    held in the page cache. ``ours``: TARGET is ``MNT/wr/device`` of a device
    registered on a raw file; ``qemu``: a qemu-storage-daemon with file and
    raw nodes on a raw file, exported writable over FUSE. Before every write
    run both raw files get their blocks punched out (``fallocate
    --punch-hole``), so each run writes into a fresh sparse file.

    And reads of the live device (our addition: a VM on the device file
    reads as much as it writes), from the same two files once written, their
    raw sources in the page cache: ``dd iflag=direct`` of the whole device in
    1 MiB requests, and of its first 64 MiB in 4 KiB requests (what a
    request costs, beyond the copy).

Why
    backupfs shows every backup as a file that ordinary tools read, and the
    live device as a file they write; QEMU's FUSE export is the obvious
    alternative for both. The goals from the issue, same run:

    * P1: ours/qemu on the depth-8 tip >= 1.5 (cold) and >= 2.0 (direct);
    * P2: ours at depth 64 / ours at depth 1 >= 0.95 (cold and direct);
      QEMU's own depth-64/depth-1 is printed for context;
    * P5: ours/qemu for the write >= 1.0.

How (fairness)
    Times are wall-clock around each ``dd`` process (open, I/O, fsync,
    close), throughput in decimal MB/s of the SIZE bytes; ``dd`` must report
    exactly SIZE bytes. Next to it, ``cpu``: the CPU seconds (user + system,
    all threads, /proc/PID/stat) the serving process spent per GiB, which
    other work on a shared machine disturbs much less than MB/s. Both contestants are long-lived (our mount and one
    qemu-storage-daemon per tip, started once), so both keep their metadata
    (our chain index, QEMU's L2 cache) across runs, and both read the image
    files through the host page cache, which every read run empties first.
    Contestants alternate (ours first on even rounds, qemu first on odd
    ones), medians over --runs are reported with the spread. Correctness is
    checked once per contestant before timing: for every tip, an xxh3 of the
    whole served file, ours and QEMU's, must equal the xxh3 of the source
    device taken at the instant of that backup; after the write runs, both
    written raw files must equal SRC.

Dropping caches is machine-wide: it also empties the page cache that any
other benchmark running at the same time relies on. The header and the
footer print the load and the CPU/IO pressure (PSI) to judge the noise.

Run by hand (root: it drops caches and mounts):
    .venv/bin/python -m bench.fuse_vs_qemu [--size 1G] [--runs 5]
        [--workdir DIR] [--keep] [--dirty 2]

IOPS mode (bench/device_iops.py: fio, 4 KiB random at iodepth 16 and 1, on
the live device file against QEMU's writable FUSE export):
    .venv/bin/python -m bench.fuse_vs_qemu --iops [--size 256M] [--runs 5] [--runtime 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import xxhash

from bench.servers import (
    OurMount,
    QemuExport,
    backupfs_command,
    cpu_seconds,
    drop_caches,
    first_line,
    fs_type,
    mounted_at,
    pressure,
    run,
)
from engine.units import format_size, parse_size
from bench.floor import argv as floor_argv
from bench.floor import build as floor_build
from bench.floor import run as floor_run

MiB = 1 << 20
MB = 1e6  # decimal MB/s, as dd prints it
WRITE_SIZE = 64 * 1024  # one scattered write while building the chain
FILL_CHUNK = 4 * MiB  # the source is written in chunks; 1 in ZERO_EVERY stays zero
ZERO_EVERY = 8
DEPTHS = (1, 8, 64)  # tips kept; the chain is built to the last
CHAIN_DEVICE = "vm1"
WRITE_DEVICE = "wr"
MODES = ("cold", "direct", "warm")
SMALL_READ_BYTES = 64 * MiB  # the device read in 4 KiB requests covers this much

GOAL_P1 = {"cold": 1.5, "direct": 2.0, "warm": 2.0}  # ours/qemu at depth 8; the "direct" goal for both direct modes
GOAL_P2 = 0.95  # ours depth 64 / depth 1
GOAL_P5 = 1.0  # ours/qemu, write
P1_DEPTH = 8

_DD_BYTES = re.compile(r"^(\d+) bytes", re.MULTILINE)


# -- environment ---------------------------------------------------------------------


def read_ahead_kb(path: str) -> str:
    dev = mounted_at(path)
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
            return f.read().strip()
    except OSError:
        return "?"


# -- files ----------------------------------------------------------------------------


def write_source(path: str, size: int, rng: np.random.Generator) -> None:
    """A sparse file of ``size`` with random data in all but 1 in ZERO_EVERY chunks."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, FILL_CHUNK)):
            if i % ZERO_EVERY == ZERO_EVERY - 1:
                continue
            f.seek(off)
            f.write(rng.bytes(min(FILL_CHUNK, size - off)))
        f.flush()
        os.fsync(f.fileno())


def digest(path: str) -> str:
    """xxh3-128 of a whole file, read in 4 MiB blocks."""
    h = xxhash.xxh3_128()
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def punch(path: str, size: int) -> None:
    """Make a raw file fresh again: same size, no blocks."""
    run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(size), path])


def cache_file(path: str) -> None:
    """Read a file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


# -- dd ---------------------------------------------------------------------------------


def dd(argv: list[str], size: int) -> float:
    """Seconds for one dd process (wall clock); it must move exactly ``size`` bytes."""
    env = dict(os.environ, LC_ALL="C")
    t0 = time.perf_counter()
    proc = subprocess.run(["dd", *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dd {' '.join(argv)} failed: {proc.stderr.strip()}")
    moved = [int(m) for m in _DD_BYTES.findall(proc.stderr)]
    if not moved or moved[-1] != size:
        raise RuntimeError(f"dd {' '.join(argv)} moved {moved[-1] if moved else '?'} bytes, not {size}")
    return seconds


def dd_read(path: str, size: int, mode: str, server: int, baseline: bool = False) -> tuple[float, float]:
    """(seconds, server CPU seconds) of one whole-file read.

    cold and direct drop the caches first; warm expects the caller to have
    put the image files in the page cache. The baseline's warm read is
    buffered: iflag=direct on a plain file would bypass that cache."""
    argv = [f"if={path}", "of=/dev/null", "bs=1M"]
    if mode == "direct" or (mode == "warm" and not baseline):
        argv.append("iflag=direct")
    if mode != "warm":
        drop_caches()
    cpu = cpu_seconds(server)
    seconds = dd(argv, size)
    return seconds, cpu_seconds(server) - cpu


def dd_write(src: str, target: str, size: int, server: int) -> tuple[float, float]:
    cpu = cpu_seconds(server)
    seconds = dd([f"if={src}", f"of={target}", "bs=1M", "conv=fsync,notrunc"], size)
    return seconds, cpu_seconds(server) - cpu


# -- the contestants' servers -------------------------------------------------------------


# -- building the chain through the mount -------------------------------------------------


def trigger(mount: OurMount, device: str, line: str) -> str:
    """Run one backup through the snapshot file; returns the new backup's id."""
    with open(mount.path(device, "snapshot"), "w") as f:
        f.write(line + "\n")
    return os.readlink(mount.path(device, "backups", "latest"))


def scattered_writes(device_file: str, size: int, fraction: float, rng: np.random.Generator) -> None:
    """Distinct random 64 KiB-aligned writes of random data, ``fraction`` of the disk."""
    slots = size // WRITE_SIZE
    count = max(1, int(slots * fraction))
    offsets = np.sort(rng.choice(slots, size=count, replace=False)) * WRITE_SIZE
    fd = os.open(device_file, os.O_WRONLY)
    try:
        for off in offsets:
            data = rng.bytes(WRITE_SIZE)
            if os.pwrite(fd, data, int(off)) != WRITE_SIZE:
                raise RuntimeError(f"short write at {off} into {device_file}")
    finally:
        os.close(fd)


@dataclass
class Tip:
    depth: int
    backup_id: str
    image: str  # the qcow2 file in the repository
    ours: str  # MNT/vm1/backups/<id>
    truth: str  # xxh3 of the source at the instant of the backup
    qemu: str = ""  # QEMU's export file, once started
    qemu_pid: int = 0
    floor: list[str] | None = None  # bench/pread_floor.c's command line for this tip


def build_chain(mount: OurMount, repo: str, source: str, size: int, fraction: float,
                rng: np.random.Generator) -> dict[int, Tip]:
    """full + incrementals to the deepest DEPTHS; the kept tips by depth."""
    tips: dict[int, Tip] = {}
    device_file = mount.path(CHAIN_DEVICE, "device")
    t0 = time.perf_counter()
    for depth in range(1, max(DEPTHS) + 1):
        if depth == 1:
            backup_id = trigger(mount, CHAIN_DEVICE, "full")
        else:
            scattered_writes(device_file, size, fraction, rng)
            backup_id = trigger(mount, CHAIN_DEVICE, "incremental")
        if depth in DEPTHS:
            ours = mount.path(CHAIN_DEVICE, "backups", backup_id)
            image = os.getxattr(ours, "user.backupfs.image").decode()
            if not os.path.isabs(image):
                image = os.path.join(repo, image)
            if not os.path.isfile(image):
                raise RuntimeError(f"backup {backup_id}: image {image} not found")
            tips[depth] = Tip(depth, backup_id, image, ours, digest(source))
        if depth % 16 == 0 or depth == 1:
            print(f"  chain depth {depth} in {time.perf_counter() - t0:.1f} s", flush=True)
    return tips


# -- samples and report --------------------------------------------------------------------


@dataclass
class Samples:
    size: int
    seconds: dict[tuple[str, ...], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, ...], list[float]] = field(default_factory=dict)
    moved: dict[tuple[str, ...], int] = field(default_factory=dict)  # bytes per run, if not size

    def add(self, key: tuple[str, ...], seconds: float, cpu: float) -> None:
        self.seconds.setdefault(key, []).append(seconds)
        self.cpu.setdefault(key, []).append(cpu)

    def cpu_per_gib(self, key: tuple[str, ...]) -> float:
        """Median CPU seconds the server spent per GiB moved."""
        return statistics.median(self.cpu[key]) * (1 << 30) / self.moved.get(key, self.size)

    def mbps(self, key: tuple[str, ...]) -> float:
        """Median throughput in MB/s."""
        n = self.moved.get(key, self.size)
        return statistics.median(n / s / MB for s in self.seconds[key])

    def spread(self, key: tuple[str, ...]) -> str:
        n = self.moved.get(key, self.size)
        rates = [n / s / MB for s in self.seconds[key]]
        return f"{min(rates):.0f}-{max(rates):.0f}"


def ordered(run_index: int, slot: int) -> tuple[str, str]:
    """Which contestant goes first: alternates run by run and slot by slot."""
    return ("ours", "qemu") if (run_index + slot) % 2 == 0 else ("qemu", "ours")


def row(samples: Samples, case: tuple[str, ...], label: str) -> str:
    o, q = ("ours", *case), ("qemu", *case)
    return (f"{label}  {samples.mbps(o):>6.0f} {'[' + samples.spread(o) + ']':>11} {samples.cpu_per_gib(o):>5.2f}"
            f"  {samples.mbps(q):>6.0f} {'[' + samples.spread(q) + ']':>11} {samples.cpu_per_gib(q):>5.2f}"
            f"  {samples.mbps(o) / samples.mbps(q):>9.2f}")


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(samples: Samples, runs: int) -> None:
    """Print the tables and the goals."""
    print()
    print(f"Sequential read of a whole backup (dd bs=1M of {format_size(samples.size)}), "
          f"MB/s, median of {runs} runs [min-max];")
    print("cpu = the server process's CPU seconds (all threads) per GiB served, median:")
    print(f"{'depth':>5}  {'mode':<6}  {'ours':>6} {'[spread]':>11} {'cpu':>5}  {'qemu':>6} {'[spread]':>11}"
          f" {'cpu':>5}  {'ours/qemu':>9}")
    for depth in DEPTHS:
        for mode in MODES:
            print(row(samples, (str(depth), mode), f"{depth:>5}  {mode:<6}"))
    raw = ", ".join(f"{mode} {samples.mbps(('raw', 'file', mode)):.0f} MB/s" for mode in MODES)
    print(f"baseline, plain dd of a raw file of the same size on the same disk: {raw}")
    print("  (warm: buffered dd of that file from the page cache, the ceiling for a served read)")
    for mode in MODES:
        r = samples.mbps(("ours", str(P1_DEPTH), mode)) / samples.mbps(("raw", "file", mode))
        print(f"  ours at depth {P1_DEPTH} / plain dd, {mode}: {r:.2f}")
    if all(("plain", str(d), m) in samples.seconds for d in DEPTHS for m in MODES):
        lo, hi = str(min(DEPTHS)), str(max(DEPTHS))
        print("plain local reader of the same tips (bench/pread_floor.c: no FUSE, one blocking pread")
        print("per piece that `qemu-img map` lists, 1 MiB at a time, the kernel's own read-ahead only;")
        print("'direct' is its cold read again), MB/s:")
        for mode in MODES:
            rates = ", ".join(f"depth {d} {samples.mbps(('plain', str(d), mode)):.0f}" for d in DEPTHS)
            r = samples.mbps(("plain", hi, mode)) / samples.mbps(("plain", lo, mode))
            print(f"  {mode:<6} {rates}; depth {hi}/depth {lo} = {r:.2f}")
    print()
    print(f"Write of {format_size(samples.size)} (dd bs=1M conv=fsync,notrunc into a fresh raw file):")
    print(row(samples, ("write",), f"{'':>5}  {'write':<6}"))
    print()
    print(f"Read of the live device (dd iflag=direct, its raw source in the page cache; 1M: all"
          f" {format_size(samples.size)},")
    print(f"4k: the first {format_size(min(samples.size, SMALL_READ_BYTES))} in 4 KiB requests):")
    print(row(samples, ("dread 1M",), f"{'':>5}  {'1M':<6}"))
    print(row(samples, ("dread 4k",), f"{'':>5}  {'4k':<6}"))
    print(f"Write into the live device ({format_size(min(samples.size, SMALL_READ_BYTES))} in 4 KiB requests,"
          " dd oflag=direct, the data in the page cache):")
    print(row(samples, ("dwrite 4k",), f"{'':>5}  {'4k':<6}"))

    print()
    print("Goals:")
    for mode in MODES:
        r = samples.mbps(("ours", str(P1_DEPTH), mode)) / samples.mbps(("qemu", str(P1_DEPTH), mode))
        print(f"  P1 {mode:<6} depth {P1_DEPTH}, ours/qemu          = {r:5.2f}  (goal >= {GOAL_P1[mode]})"
              f"  {verdict(r >= GOAL_P1[mode])}")
    lo, hi = str(min(DEPTHS)), str(max(DEPTHS))
    for mode in MODES:
        r = samples.mbps(("ours", hi, mode)) / samples.mbps(("ours", lo, mode))
        rq = samples.mbps(("qemu", hi, mode)) / samples.mbps(("qemu", lo, mode))
        print(f"  P2 {mode:<6} ours depth {hi}/depth {lo}      = {r:5.2f}  (goal >= {GOAL_P2})"
              f"  {verdict(r >= GOAL_P2)}   (qemu's: {rq:.2f})")
    r = samples.mbps(("ours", "write")) / samples.mbps(("qemu", "write"))
    print(f"  P5 write  ours/qemu                   = {r:5.2f}  (goal >= {GOAL_P5})  {verdict(r >= GOAL_P5)}")


# -- phases --------------------------------------------------------------------------------


def verify_reads(tips: dict[int, Tip]) -> None:
    """Every served file, ours and QEMU's, equals the source at backup time."""
    for tip in tips.values():
        for who, path in (("ours", tip.ours), ("qemu", tip.qemu)):
            got = digest(path)
            if got != tip.truth:
                raise RuntimeError(f"{who}'s depth-{tip.depth} file {path} differs from the source "
                                   f"at backup time ({got} != {tip.truth}): not timing a wrong answer")
        print(f"  depth {tip.depth:>2}: ours and qemu == source at backup {tip.backup_id}", flush=True)


def bench_reads(tips: dict[int, Tip], our_pid: int, size: int, runs: int, samples: Samples,
                raw_file: str, images: list[str]) -> None:
    for r in range(runs):
        slot = 0
        for mode in MODES:
            if mode == "warm":
                for path in [*images, raw_file]:
                    cache_file(path)
            # The baseline: plain dd of a raw file of the same size on the same disk.
            samples.add(("raw", "file", mode), *dd_read(raw_file, size, mode, os.getpid(), baseline=True))
            for depth in DEPTHS:
                tip = tips[depth]
                for who in ordered(r, slot):
                    path, pid = (tip.ours, our_pid) if who == "ours" else (tip.qemu, tip.qemu_pid)
                    samples.add((who, str(depth), mode), *dd_read(path, size, mode, pid))
                if tip.floor:
                    # Context, not a contestant: a local reader of the same pieces.
                    if mode != "warm":
                        drop_caches()
                    samples.add(("plain", str(depth), mode), floor_run(tip.floor), 0.0)
                slot += 1
        print(f"  read run {r + 1}/{runs} done ({pressure()})", flush=True)


def bench_writes(src: str, targets: dict[str, tuple[str, str, int]], size: int, runs: int,
                 samples: Samples) -> None:
    """``targets``: contestant -> (the file dd writes, the raw file beneath it, server pid)."""
    for r in range(runs):
        for who in ordered(r, 0):
            dest, raw, pid = targets[who]
            punch(raw, size)
            cache_file(src)
            os.sync()
            samples.add((who, "write"), *dd_write(src, dest, size, pid))
        print(f"  write run {r + 1}/{runs} done", flush=True)
    truth = digest(src)
    for who, (_, raw, _) in targets.items():
        drop_caches()
        if digest(raw) != truth:
            raise RuntimeError(f"{who}'s written raw file {raw} differs from the source it was written from")
    print("  verify: both written raw files == SRC", flush=True)


def bench_device_io(src: str, targets: dict[str, tuple[str, str, int]], size: int, runs: int,
                    samples: Samples) -> None:
    """Reads of the live device, its source in the page cache: 1 MiB and 4 KiB
    requests; then 4 KiB writes into it (what a guest's small writes cost)."""
    small = min(size, SMALL_READ_BYTES)
    for r in range(runs):
        cache_file(src)
        for _, raw, _ in targets.values():
            cache_file(raw)
        for who in ordered(r, 0):
            dest, _, pid = targets[who]
            for case, bs, n in (("dread 1M", "1M", size), ("dread 4k", "4k", small)):
                key = (who, case)
                samples.moved[key] = n
                cpu = cpu_seconds(pid)
                seconds = dd([f"if={dest}", "of=/dev/null", f"bs={bs}", f"count={n // parse_size(bs)}",
                              "iflag=direct"], n)
                samples.add(key, seconds, cpu_seconds(pid) - cpu)
            key = (who, "dwrite 4k")
            samples.moved[key] = small
            cpu = cpu_seconds(pid)
            seconds = dd([f"if={src}", f"of={dest}", "bs=4k", f"count={small // 4096}", "oflag=direct",
                          "conv=notrunc"], small)
            samples.add(key, seconds, cpu_seconds(pid) - cpu)
        print(f"  device read/write run {r + 1}/{runs} done", flush=True)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="device size (default 1G)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per contestant and case (default 5)")
    p.add_argument("--workdir", help="where to work (default: a new dir in /var/tmp); not tmpfs")
    p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    p.add_argument("--dirty", type=float, default=2.0,
                   help="percent of the disk each incremental's writes touch (default 2)")
    p.add_argument("--seed", type=int, default=20241127)
    return p.parse_args(argv)


def check_environment(size: int, parent: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark drops caches and mounts")
    if size < 64 * MiB or size % MiB:
        raise SystemExit("--size must be a multiple of 1 MiB and at least 64 MiB")
    for tool in ("qemu-storage-daemon", "dd", "fallocate", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    kind = fs_type(parent)
    if kind in ("tmpfs", "ramfs"):
        raise SystemExit(f"{parent} is on {kind}: cold reads need a real disk; pass --workdir")
    free = shutil.disk_usage(parent).free
    need = 6 * size + (1 << 30)
    if free < need:
        raise SystemExit(f"{parent} has {format_size(free)} free; this needs about {format_size(need)}")


def main(argv: list[str] | None = None) -> int:
    if "--iops" in (sys.argv[1:] if argv is None else argv):
        from bench.device_iops import main as iops_main  # the IOPS mode: small random I/O, fio

        return iops_main(argv)
    args = parse_args(argv)
    size = parse_size(args.size)
    parent = args.workdir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    check_environment(size, parent)
    workdir = tempfile.mkdtemp(prefix="backupfs-fuse_vs_qemu-", dir=parent)
    rng = np.random.default_rng(args.seed)

    print(f"backupfs fuse_vs_qemu: {format_size(size)} device, {args.runs} runs, "
          f"chain to depth {max(DEPTHS)} ({args.dirty}% scattered 64 KiB writes per incremental)")
    print(f"python {platform.python_version()}, {first_line(['qemu-storage-daemon', '--version'])}, "
          f"kernel {platform.release()}, {os.cpu_count()} CPUs")
    print(f"work dir {workdir} ({fs_type(workdir)}); {pressure()}")

    repo = os.path.join(workdir, "repo")
    mnt = os.path.join(workdir, "mnt")
    source = os.path.join(workdir, "vm1.img")
    src = os.path.join(workdir, "src.raw")
    raw_ours = os.path.join(workdir, "wr-ours.raw")
    raw_qemu = os.path.join(workdir, "wr-qemu.raw")
    os.mkdir(mnt)
    mount = OurMount(repo, mnt)
    exports: list[QemuExport] = []
    try:
        t0 = time.perf_counter()
        write_source(source, size, rng)
        write_source(src, size, rng)
        for raw in (raw_ours, raw_qemu):
            with open(raw, "wb") as f:
                f.truncate(size)
        run(backupfs_command() + ["init", repo])
        run(backupfs_command() + ["device", "add", repo, CHAIN_DEVICE, source, "--granularity", "64K"])
        run(backupfs_command() + ["device", "add", repo, WRITE_DEVICE, raw_ours])
        mount.start()
        print(f"files written in {time.perf_counter() - t0:.1f} s; mounted (daemon pid {mount.pid})",
              flush=True)

        tips = build_chain(mount, repo, source, size, args.dirty / 100, rng)
        image_dir = os.path.dirname(tips[1].image)
        images = sorted(os.path.join(image_dir, n) for n in os.listdir(image_dir) if n.endswith(".qcow2"))
        on_disk = sum(os.path.getsize(path) for path in images)
        print(f"chain built: {format_size(on_disk)} of qcow2; tips "
              + ", ".join(f"depth {d} = {t.backup_id}" for d, t in tips.items()))

        for tip in tips.values():
            export = QemuExport(tip.image, "qcow2", os.path.join(workdir, f"qemu-depth{tip.depth}.raw"),
                                writable=False, log_path=os.path.join(workdir, "qemu.log"))
            exports.append(export)
            export.start()
            tip.qemu = export.export_file
            tip.qemu_pid = export.pid
        print("qemu exports up; verifying", flush=True)
        exe = floor_build(workdir)
        if exe:
            for tip in tips.values():
                tip.floor = floor_argv(exe, tip.image, workdir, f"depth{tip.depth}")
        verify_reads(tips)
        print(f"kernel read-ahead (read_ahead_kb) after the first reads: ours {read_ahead_kb(mnt)}, "
              f"qemu {read_ahead_kb(tips[1].qemu)}", flush=True)

        samples = Samples(size)
        assert mount.pid is not None
        bench_reads(tips, mount.pid, size, args.runs, samples, source, images)
        for export in exports:
            export.stop()

        writer = QemuExport(raw_qemu, "raw", os.path.join(workdir, "qemu-write.raw"), writable=True,
                            log_path=os.path.join(workdir, "qemu.log"))
        exports.append(writer)
        writer.start()
        targets = {"ours": (mount.path(WRITE_DEVICE, "device"), raw_ours, mount.pid),
                   "qemu": (writer.export_file, raw_qemu, writer.pid)}
        bench_writes(src, targets, size, args.runs, samples)
        bench_device_io(src, targets, size, args.runs, samples)
        writer.stop()

        print(f"after the runs: {pressure()}")
        report(samples, args.runs)
        return 0
    finally:
        for export in exports:
            try:
                export.stop()
            except Exception as e:  # noqa: BLE001 - clean up the rest regardless
                print(f"warning: stopping qemu-storage-daemon: {e}", file=sys.stderr)
        mount.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
