"""Backup speed: backupfs's engine against QEMU's blockdev-backup, same run.

What is measured
    A SIZE-sized source (default 1 GiB) of random, incompressible data in a
    file on a real disk, backed up twice per run, once by each contestant:

    * ``ours``: a fresh Repository with the source as a device (bitmap
      granularity 64 KiB); ``repo.backup(dev, "full")`` (64 KiB clusters),
      then scattered 64 KiB writes through ``Device.write`` (about 5 % of the
      disk, at random 64 KiB-aligned offsets), then ``repo.backup(dev,
      "incremental", cluster_size=128 KiB)``. Each backup is timed wall-clock
      around the call: planning, copying, checksums, commit with fsync,
      catalog row: a backup that is complete and durable.
    * ``qemu``: a fresh qemu-storage-daemon driven over QMP. The source is a
      raw node on a file node; a 64 KiB dirty bitmap is created in the same
      transaction as ``blockdev-backup sync=full`` into a new 64 KiB-cluster
      qcow2; then the same writes (same offsets, same data) go through an
      NBD export of the source node with qemu-io; then ``blockdev-backup
      sync=incremental`` with that bitmap into a new 128 KiB-cluster qcow2
      whose backing file is the full image. Two times per job: ``job`` = from
      sending the command to the BLOCK_JOB_COMPLETED event, and ``durable`` =
      job plus closing the target node (``blockdev-del``: QEMU writes back
      its qcow2 metadata cache and fdatasyncs the file) plus an fsync of the
      target file. QEMU's job alone leaves data and L2 tables in caches, so
      the headline ratio uses ``durable``, which is what ours promises.

Why
    The engine's copy loop is Python; QEMU's is C with 64 parallel workers.
    The goal from the issue: QEMU time / our time >= 1.0 for both the full
    and the incremental, measured in the same run on the same disk.

How (fairness)
    Before every timed backup, of either contestant (by default), the whole source is
    read once, so both read it from the page cache (this machine reclaims
    page cache it deems cold: one warm-up at the start is not enough), and
    ``sync`` flushes whatever earlier steps left dirty, so no contestant
    pays for another's writeback; the share of the source resident at each
    clock start is reported (fincore). All targets, our repository and
    QEMU's images, are on the file system of --workdir. QEMU's target images
    are created (qemu-img create, blockdev-add) before its clock starts;
    ours creates its image inside the timed call. x-perf is not passed to
    blockdev-backup: QEMU's defaults. Contestants alternate (ours, qemu,
    ours, qemu, ...), each run with fresh repositories and targets, deleted
    after the run; medians over --runs are reported. Every run checks with
    ``qemu-img compare`` that our incremental tip and QEMU's are identical,
    and that our incremental stored exactly the 128 KiB clusters the writes
    touched.

    For scale, each run also times ``dd``: as many bytes as each backup
    stores, written from memory into a new file on the same disk, then one
    fsync, with no copy work at all (what ``dd conv=fsync`` does).

Two more cases, with the same timing rules on both sides:

    * ``--source-cache cold``: instead of reading the source in, every
      cache is dropped before each timed backup (root only), so both read
      the source from the disk.
    * ``--pause SECONDS``: quiet before each timed backup (then the
      source is read in as usual). On a virtual machine whose free memory
      is handed back to its host (virtio-balloon free page reporting,
      /sys/bus/virtio/drivers/virtio_balloon), pages freed a few seconds
      ago are gone from the host, and a backup that takes fresh pages
      (the image's page cache) pays a host fault for each: a backup right
      after another large write finds them still there, one from cron
      after a quiet minute does not.
    * ``--through-mount``: ours as a user runs it, as the issue measured
      it: the source's random data is written through a mounted device
      file (fsynced), and each of our backups is ``echo KIND >
      MOUNT/disk0/snapshot``, timed from the trigger's open to its write's
      return (the daemon's job duration from the status beside it); the
      scattered writes go through the device file too. QEMU's side is
      unchanged.

    Runs alternate which contestant goes first (A/B, then B/A): the disk
    of a virtual machine may still be writing what the guest was told is
    durable, and whoever runs just after a large write pays for it.

Run by hand:  .venv/bin/python -m bench.backup_vs_qemu [--size 1G] [--runs 3]
              [--workdir DIR] [--keep] [--profile FILE]
              [--source-cache hot|cold] [--through-mount]
Compressed backups (bench/compress_vs_qemu.py says what it measures):
              .venv/bin/python -m bench.backup_vs_qemu --compress [--size 1G] [--runs 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.repo import Repository
from engine.units import format_size, parse_size

GRANULARITY = 64 * 1024  # both bitmaps
FULL_CLUSTER = 64 * 1024  # target clusters of the full backups
INCR_CLUSTER = 128 * 1024  # target clusters of the incrementals
WRITE_SIZE = 64 * 1024  # one scattered write
DEVICE = "disk0"
GOAL = 1.0  # QEMU time / our time, for both kinds
MB = 1e6


# -- the workload ------------------------------------------------------------


@dataclass
class Writes:
    """The scattered writes both contestants apply: same offsets, same data."""

    offsets: list[int]
    data: list[bytes]
    files: list[str]  # the same data, one file per write, for `qemu-io write -s`

    @property
    def total_bytes(self) -> int:
        return len(self.offsets) * WRITE_SIZE

    def touched_units(self, unit: int, size: int) -> int:
        """Bytes of the ``unit``-aligned clusters the writes touch (clipped at ``size``)."""
        firsts = {off // unit for off in self.offsets}
        return sum(min(unit, size - u * unit) for u in firsts)


def make_source(path: str, size: int, rng: np.random.Generator) -> None:
    """A file of random bytes, fsynced: written once, in 64 MiB chunks."""
    chunk = 64 << 20
    with open(path, "wb", buffering=0) as f:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            f.write(rng.bytes(n))
            done += n
        os.fsync(f.fileno())


def make_writes(size: int, percent: float, rng: np.random.Generator, data_dir: str) -> Writes:
    """Distinct random 64 KiB-aligned offsets covering ``percent`` of the disk."""
    slots = size // WRITE_SIZE
    count = max(1, round(slots * percent / 100))
    offsets = [int(s) * WRITE_SIZE for s in rng.choice(slots, count, replace=False)]
    data = [rng.bytes(WRITE_SIZE) for _ in offsets]
    files = []
    for i, chunk in enumerate(data):
        path = os.path.join(data_dir, f"w{i:05d}.bin")
        with open(path, "wb") as f:
            f.write(chunk)
        files.append(path)
    return Writes(offsets, data, files)


def warm_up(path: str) -> int:
    """Read a file once, so that the next reader finds it in the page cache."""
    buf = bytearray(8 << 20)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def resident_bytes(path: str) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux fincore), None if unknown."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", path],
            capture_output=True, text=True, check=True,
        )
        return int(out.stdout.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


class Settle:
    """The same preparation before every timed backup, whoever runs it.

    ``cache`` "hot": the source is read once, so it is in the page cache;
    "cold": every cache is dropped, so the backup reads the source from
    the disk. Either way nothing dirty is left to be flushed on the clock.
    """

    def __init__(self, source: str, size: int, cache: str = "hot", pause: float = 0.0) -> None:
        self.source = source
        self.size = size
        self.cache = cache
        self.pause = pause
        self.resident: list[float] = []  # share of the source cached at each clock start

    def __call__(self) -> None:
        if self.pause:
            time.sleep(self.pause)  # quiet before the clock: see --pause
        if self.cache == "hot":
            warm_up(self.source)
            os.sync()  # nothing an earlier step left dirty is flushed on the clock
        else:
            drop_caches()  # syncs first
        cached = resident_bytes(self.source)
        if cached is not None:
            self.resident.append(cached / self.size)


def drop_caches() -> None:
    """Write back everything dirty, then drop the page cache (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- a small QMP client ---------------------------------------------------------


class QMPError(RuntimeError):
    pass


class QMP:
    """JSON over a unix socket: commands get their reply, events are queued."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"no QMP socket at {path} after {timeout} s") from None
                time.sleep(0.02)
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def command(self, command: str, /, **arguments: Any) -> Any:
        self._next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._next_id:
                continue
            if "error" in reply:
                desc = reply["error"].get("desc", reply["error"])
                raise QMPError(f"{command} {json.dumps(arguments)}: {desc}")
            return reply.get("return")

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event ``name`` whose data ``match`` accepts (queued ones first)."""
        for i, ev in enumerate(self.events):
            if ev["event"] == name and match(ev.get("data", {})):
                return self.events.pop(i)
        while True:
            ev = self._read()
            if ev.get("event") == name and match(ev.get("data", {})):
                return ev
            if "event" in ev:
                self.events.append(ev)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class StorageDaemon:
    """One qemu-storage-daemon process with a QMP monitor."""

    def __init__(self, run_dir: str) -> None:
        self.qmp_path = os.path.join(run_dir, "qmp.sock")
        self.nbd_path = os.path.join(run_dir, "nbd.sock")
        self.proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=qmp0",
                "--monitor", "chardev=qmp0",
            ],
            stdin=subprocess.DEVNULL,
        )
        try:
            self.qmp = QMP(self.qmp_path)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def add_qcow2(self, node: str, path: str) -> None:
        self.qmp.command(
            "blockdev-add", driver="qcow2", **{"node-name": node},
            file={"driver": "file", "filename": path},
        )

    def run_job(self, job: str, command: str, **arguments: Any) -> float:
        """Send one command that starts job ``job``; seconds until it completed."""
        t0 = time.perf_counter()
        self.qmp.command(command, **arguments)
        ev = self.qmp.wait_event("BLOCK_JOB_COMPLETED", lambda d: d.get("device") == job)
        elapsed = time.perf_counter() - t0
        if "error" in ev["data"]:
            raise QMPError(f"job {job} failed: {ev['data']['error']}")
        return elapsed

    def wait_dismissed(self, job: str) -> None:
        self.qmp.wait_event("JOB_STATUS_CHANGE", lambda d: d.get("id") == job and d.get("status") == "null")

    def bitmap_count(self, node: str, bitmap: str) -> int:
        for n in self.qmp.command("query-named-block-nodes", flat=True):
            if n.get("node-name") == node:
                for b in n.get("dirty-bitmaps", []):
                    if b["name"] == bitmap:
                        return int(b["count"])
        raise QMPError(f"no bitmap {bitmap} on {node}")

    def close(self) -> None:
        try:
            self.qmp.command("quit")
            self.qmp.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - a stuck daemon must not survive the benchmark
            self.proc.kill()
            self.proc.wait()


# -- one run of each contestant ----------------------------------------------------


@dataclass
class Outcome:
    """What one contestant did in one run."""

    full: float  # seconds, complete and durable
    incr: float
    full_job: float | None = None  # QEMU only: the job without closing the target
    incr_job: float | None = None
    full_image: str = ""
    incr_image: str = ""
    full_stored: int = 0
    incr_stored: int = 0
    profile: cProfile.Profile | None = None


def timed(fn: Callable[[], Any], settle: Settle, profile: cProfile.Profile | None) -> tuple[float, Any]:
    settle()
    t0 = time.perf_counter()
    if profile is not None:
        result = profile.runcall(fn)
    else:
        result = fn()
    return time.perf_counter() - t0, result


def run_ours(source: str, run_dir: str, writes: Writes, settle: Settle, profile: bool) -> Outcome:
    repo_path = os.path.join(run_dir, "ours")
    Repository.init(repo_path)
    prof = cProfile.Profile() if profile else None
    repo = Repository.open(repo_path)
    try:
        repo.add_device(DEVICE, source, granularity=GRANULARITY)
        full_s, full = timed(lambda: repo.backup(DEVICE, "full", cluster_size=FULL_CLUSTER), settle, prof)
        dev = repo.device(DEVICE)
        for off, data in zip(writes.offsets, writes.data):
            dev.write(off, data)
        incr_s, incr = timed(
            lambda: repo.backup(DEVICE, "incremental", cluster_size=INCR_CLUSTER), settle, prof
        )
        return Outcome(
            full=full_s, incr=incr_s,
            full_image=repo.image_path(full.record), incr_image=repo.image_path(incr.record),
            full_stored=full.record.stored_bytes, incr_stored=incr.record.stored_bytes,
            profile=prof,
        )
    finally:
        repo.close()


def trigger(mnt: str, line: str) -> tuple[str, float]:
    """One backup through the device's snapshot file, as a script runs it:
    the write returns when the backup is complete and durable. Returns the
    new backup's id and the job's own duration from its status (plan to
    catalog row, without the trigger's round trip)."""
    with open(os.path.join(mnt, DEVICE, "snapshot"), "w") as f:
        f.write(line + "\n")
    with open(os.path.join(mnt, DEVICE, "snapshot")) as f:
        status = dict(ln.split(": ", 1) for ln in f.read().splitlines() if ": " in ln)
    if status.get("state") != "succeeded":
        raise RuntimeError(f"trigger {line!r}: {status}")
    return status["backup"], float(status["duration"].split()[0])


def mounted_image(mnt: str, repo_path: str, backup: str) -> tuple[str, int]:
    """A backup's qcow2 path and stored bytes, from its extended attributes."""
    path = os.path.join(mnt, DEVICE, "backups", backup)
    image = os.getxattr(path, "user.backupfs.image").decode()
    stored = int(os.getxattr(path, "user.backupfs.stored_bytes"))
    return (image if os.path.isabs(image) else os.path.join(repo_path, image)), stored


def write_through(device_file: str, writes: Writes) -> None:
    """The scattered writes into a mounted device file, then its fsync."""
    fd = os.open(device_file, os.O_WRONLY)
    try:
        for off, data in zip(writes.offsets, writes.data):
            if os.pwrite(fd, data, off) != len(data):
                raise RuntimeError(f"short write at {off} into {device_file}")
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_through_mount(source: str, size: int, rng: np.random.Generator, workdir: str) -> None:
    """The issue's source: a sparse file whose random data is written
    through a mounted device file (what a guest does), fsynced."""
    from bench.servers import mount_new_repo

    with open(source, "wb") as f:
        f.truncate(size)
    repo_path, mnt = os.path.join(workdir, "fill-repo"), os.path.join(workdir, "fill-mnt")
    mount = mount_new_repo(repo_path, mnt, {DEVICE: source}, str(GRANULARITY))
    try:
        fd = os.open(os.path.join(mnt, DEVICE, "device"), os.O_WRONLY)
        try:
            chunk = 1 << 20
            for off in range(0, size, chunk):
                data = rng.bytes(min(chunk, size - off))
                if os.pwrite(fd, data, off) != len(data):
                    raise RuntimeError(f"short write at {off} through the mount")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        mount.stop()
    shutil.rmtree(repo_path)
    os.rmdir(mnt)


def run_ours_mounted(source: str, run_dir: str, writes: Writes, settle: Settle) -> Outcome:
    """Ours as a user runs it: a mounted repository, ``echo full > snapshot``,
    the writes through the device file, ``echo incremental > snapshot``;
    each timed from the trigger's open to its write's return."""
    from bench.servers import mount_new_repo

    repo_path, mnt = os.path.join(run_dir, "ours"), os.path.join(run_dir, "mnt")
    mount = mount_new_repo(repo_path, mnt, {DEVICE: source}, str(GRANULARITY))
    try:
        full_s, (full_id, full_job) = timed(lambda: trigger(mnt, f"full cluster_size={FULL_CLUSTER}"), settle, None)
        write_through(os.path.join(mnt, DEVICE, "device"), writes)
        incr_s, (incr_id, incr_job) = timed(
            lambda: trigger(mnt, f"incremental cluster_size={INCR_CLUSTER}"), settle, None
        )
        full_image, full_stored = mounted_image(mnt, repo_path, full_id)
        incr_image, incr_stored = mounted_image(mnt, repo_path, incr_id)
    finally:
        mount.stop()
    return Outcome(
        full=full_s, incr=incr_s, full_job=full_job, incr_job=incr_job,
        full_image=full_image, incr_image=incr_image, full_stored=full_stored, incr_stored=incr_stored,
    )


def qemu_io_writes(daemon: StorageDaemon, export: str, writes: Writes, batch: int = 256) -> None:
    """Apply the writes through the NBD export, many per qemu-io invocation."""
    uri = f"nbd+unix:///{export}?socket={daemon.nbd_path}"
    pairs = list(zip(writes.offsets, writes.files))
    for i in range(0, len(pairs), batch):
        argv = ["qemu-io", "-f", "raw"]
        for off, path in pairs[i : i + batch]:
            argv += ["-c", f"write -q -s {path} {off} {WRITE_SIZE}"]
        subprocess.run(argv + [uri], check=True, stdout=subprocess.DEVNULL)


def close_target(daemon: StorageDaemon, job: str, node: str, path: str) -> None:
    """Make QEMU's target durable: close the node (flushes), then fsync the file."""
    daemon.wait_dismissed(job)
    daemon.qmp.command("blockdev-del", **{"node-name": node})
    fsync_path(path)


def run_qemu(source: str, size: int, run_dir: str, writes: Writes, settle: Settle) -> Outcome:
    qdir = os.path.join(run_dir, "qemu")
    os.makedirs(qdir)
    full_img = os.path.join(qdir, "full.qcow2")
    incr_img = os.path.join(qdir, "incr.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={FULL_CLUSTER}",
         full_img, str(size)],
        check=True,
    )
    daemon = StorageDaemon(qdir)
    try:
        q = daemon.qmp
        q.command(
            "blockdev-add", driver="raw", **{"node-name": "src"},
            file={"driver": "file", "filename": source},
        )
        daemon.add_qcow2("tgt-full", full_img)

        # Full: the bitmap is born with the backup, in one transaction.
        settle()
        t0 = time.perf_counter()
        full_job = daemon.run_job(
            "full", "transaction",
            actions=[
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "src", "name": "bm0", "granularity": GRANULARITY}},
                {"type": "blockdev-backup",
                 "data": {"job-id": "full", "device": "src", "target": "tgt-full", "sync": "full"}},
            ],
        )
        close_target(daemon, "full", "tgt-full", full_img)
        full_s = time.perf_counter() - t0

        # The same writes, through the source node, so the bitmap sees them.
        q.command("nbd-server-start", addr={"type": "unix", "data": {"path": daemon.nbd_path}})
        q.command(
            "block-export-add", type="nbd", id="exp0", **{"node-name": "src"}, name="src", writable=True
        )
        qemu_io_writes(daemon, "src", writes)
        dirty = daemon.bitmap_count("src", "bm0")
        if dirty != writes.total_bytes:
            raise QMPError(f"bitmap bm0 counts {dirty} dirty bytes, the writes made {writes.total_bytes}")
        q.command("block-export-del", id="exp0")
        q.command("nbd-server-stop")

        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={INCR_CLUSTER}",
             "-b", os.path.basename(full_img), "-F", "qcow2", incr_img, str(size)],
            check=True,
        )
        daemon.add_qcow2("tgt-incr", incr_img)
        settle()
        t0 = time.perf_counter()
        incr_job = daemon.run_job(
            "incr", "blockdev-backup",
            **{"job-id": "incr", "device": "src", "target": "tgt-incr",
               "sync": "incremental", "bitmap": "bm0"},
        )
        close_target(daemon, "incr", "tgt-incr", incr_img)
        incr_s = time.perf_counter() - t0
    finally:
        daemon.close()
    return Outcome(
        full=full_s, incr=incr_s, full_job=full_job, incr_job=incr_job,
        full_image=full_img, incr_image=incr_img,
        full_stored=top_layer_bytes(full_img), incr_stored=top_layer_bytes(incr_img),
    )


def plain_write(path: str, nbytes: int, settle: Settle) -> float:
    """Seconds to write ``nbytes`` from memory into a new file and fsync it."""
    chunk = memoryview(os.urandom(8 << 20))
    settle()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, chunk[: min(len(chunk), nbytes - done)])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    os.unlink(path)
    return elapsed


# -- checks ----------------------------------------------------------------------


def top_layer_bytes(image: str) -> int:
    """Guest bytes whose data the image itself stores (not its backing files)."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", image], capture_output=True, text=True, check=True
    )
    return sum(e["length"] for e in json.loads(out.stdout) if e["depth"] == 0 and e["data"])


def images_identical(a: str, b: str) -> tuple[bool, str]:
    out = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b], capture_output=True, text=True
    )
    return out.returncode == 0, (out.stdout + out.stderr).strip()


# -- environment -------------------------------------------------------------------


def fs_type(path: str) -> str:
    """File system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4]
            inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, right.split()[0]
    return kind


def qemu_version() -> str:
    out = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


# -- report ------------------------------------------------------------------------


@dataclass
class Results:
    ours: list[Outcome] = field(default_factory=list)
    qemu: list[Outcome] = field(default_factory=list)
    dd: list[Outcome] = field(default_factory=list)  # plain write + fsync of the same number of bytes

    def median(self, who: str, what: str) -> float:
        return statistics.median(getattr(o, what) for o in getattr(self, who))


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(size: int, res: Results, writes: Writes) -> tuple[float, float]:
    """Print the table; returns the headline ratios (full, incremental)."""
    runs = len(res.ours)
    print()
    print("Per run (seconds):")
    print(f"{'run':>3}  {'ours full':>9}  {'(job)':>7}  {'qemu full':>9}  {'(job)':>7}  {'dd':>6}"
          f"  {'ours incr':>9}  {'(job)':>7}  {'qemu incr':>9}  {'(job)':>7}  {'dd':>6}")

    def job(t: float | None) -> str:
        return f"{t:>7.3f}" if t is not None else f"{'-':>7}"

    for i, (o, q, f) in enumerate(zip(res.ours, res.qemu, res.dd)):
        print(f"{i + 1:>3}  {o.full:>9.3f}  {job(o.full_job)}  {q.full:>9.3f}  {job(q.full_job)}  {f.full:>6.3f}"
              f"  {o.incr:>9.3f}  {job(o.incr_job)}  {q.incr:>9.3f}  {job(q.incr_job)}  {f.incr:>6.3f}")

    print()
    print(f"Medians of {runs} runs; ratio = QEMU time / our time (> 1: ours is faster):")
    print(f"{'':<12} {'ours s':>7} {'MB/s':>6}  {'QEMU s':>7} {'MB/s':>6}  {'ratio':>5}  "
          f"{'QEMU job s':>10} {'ratio':>5}  {'dd s':>7}  {'stored ours':>11}  {'stored QEMU':>11}")
    ratios = []
    kinds = (
        ("full", "full", "full_job", "full_stored"),
        ("incremental", "incr", "incr_job", "incr_stored"),
    )
    for label, t, tj, st in kinds:
        ours, qemu, job = res.median("ours", t), res.median("qemu", t), res.median("qemu", tj)
        dd = res.median("dd", t)
        ours_stored, qemu_stored = getattr(res.ours[-1], st), getattr(res.qemu[-1], st)
        ratios.append(qemu / ours)
        print(f"{label:<12} {ours:>7.3f} {ours_stored / ours / MB:>6.0f}  "
              f"{qemu:>7.3f} {qemu_stored / qemu / MB:>6.0f}  "
              f"{qemu / ours:>5.2f}  {job:>10.3f} {job / ours:>5.2f}  {dd:>7.3f}  "
              f"{format_size(ours_stored):>11}  {format_size(qemu_stored):>11}")
    if res.ours and res.ours[0].full_job is not None:
        print("  ours s   = 'echo KIND > MOUNT/disk0/snapshot' from the open to the write's return: the trigger's")
        print("             round trip, copy, checksums, image commit with fsync, catalog row ((job): the")
        print("             status's duration, plan to catalog row, without the round trip)")
    else:
        print("  ours s   = repo.backup() wall clock: copy, checksums, image commit with fsync, catalog row")
    print("  QEMU s   = blockdev-backup until BLOCK_JOB_COMPLETED, then blockdev-del of the target (qcow2")
    print("             metadata written back, fdatasync) and fsync of the file: durable, like ours")
    print("  QEMU job = blockdev-backup until BLOCK_JOB_COMPLETED only (target not flushed)")
    print("  dd s     = as many bytes as stored, written from memory to a new file on the same disk, one fsync")
    print("  MB/s     = stored bytes / time; stored = guest data the image itself holds (qemu-img map)")
    print(f"  the incremental's {len(writes.offsets)} writes of 64 KiB ({format_size(writes.total_bytes)}) touch "
          f"{format_size(writes.touched_units(INCR_CLUSTER, size))} of 128 KiB clusters")

    print()
    print("Goals (headline ratio uses QEMU's durable time):")
    for label, r in zip(("full", "incremental"), ratios):
        print(f"  {label:<12} QEMU/ours = {r:.2f}  (goal >= {GOAL})  {verdict(r >= GOAL)}")
    return ratios[0], ratios[1]


def print_profile(profiles: list[cProfile.Profile], path: str | None, top: int = 25) -> None:
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        stats.add(p)
    if path:
        stats.dump_stats(path)
    print()
    print(f"cProfile of our backups over all runs (tottime, top {top}):")
    stats.sort_stats("tottime").print_stats(top)


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="source size (default 1G)")
    p.add_argument("--runs", type=int, default=3, help="runs per contestant (default 3)")
    p.add_argument("--dirty", type=float, default=5.0,
                   help="percent of the disk rewritten by 64 KiB writes before the incremental (default 5)")
    p.add_argument("--workdir", help="where the source and all targets go (default: a new dir in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the source and the last run's images")
    p.add_argument("--seed", type=int, default=20240607)
    p.add_argument("--profile", nargs="?", const="", metavar="FILE",
                   help="cProfile our backups (slower!) and print the top; save the stats to FILE if given")
    p.add_argument("--source-cache", choices=("hot", "cold"), default="hot",
                   help="before every timed backup: read the source into the page cache (hot, default) "
                        "or drop all caches (cold; needs root)")
    p.add_argument("--pause", type=float, default=0.0, metavar="SECONDS",
                   help="quiet before every timed backup (before the source is read in): a virtual "
                        "machine that hands its free memory back to its host (free page reporting) "
                        "makes the next backup pay for fresh pages, as a backup from cron does")
    p.add_argument("--through-mount", action="store_true",
                   help="ours as a user runs it: the source's data written through a mounted device file, "
                        "each backup an 'echo KIND > snapshot' timed to the write's return")
    p.add_argument("--compress", action="store_true",
                   help="the compression mode: a zstd full of an ext4 made from /usr against "
                        "qemu-img convert -c (bench/compress_vs_qemu.py)")
    p.add_argument("--rounds", type=int, default=5,
                   help="with --compress: reads through the mount per backup (default 5)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compress:
        from bench.compress_vs_qemu import main as compress_main

        return compress_main(args)
    size = parse_size(args.size)
    if size <= 0 or size % INCR_CLUSTER:
        raise SystemExit(f"--size must be a positive multiple of {INCR_CLUSTER} bytes")
    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    base = args.workdir or "/var/tmp"
    os.makedirs(base, exist_ok=True)
    # Source, two fulls and two incrementals alive at once, plus slack.
    need = size + 2 * (size + size // 4) + (256 << 20)
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(f"{base} has {format_size(free)} free; this needs about {format_size(need)}")
    workdir = tempfile.mkdtemp(prefix="backupfs-backup_vs_qemu-", dir=base)
    rng = np.random.default_rng(args.seed)
    try:
        kind = fs_type(workdir)
        print(f"backupfs backup_vs_qemu: {format_size(size)} random source, {args.runs} runs, "
              f"{args.dirty}% rewritten by 64 KiB writes before the incremental")
        print(f"python {platform.python_version()}, {qemu_version()}, {os.cpu_count()} CPUs, "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"source and targets in {workdir} ({kind}, {format_size(free)} free)")
        if kind in ("tmpfs", "ramfs"):
            print("  warning: this is a RAM file system, not a real disk")

        if args.source_cache == "cold" and os.geteuid() != 0:
            raise SystemExit("--source-cache cold drops the page cache, which needs root")
        source = os.path.join(workdir, "source.raw")
        t0 = time.perf_counter()
        if args.through_mount:
            fill_through_mount(source, size, rng, workdir)
        else:
            make_source(source, size, rng)
        data_dir = os.path.join(workdir, "writes")
        os.makedirs(data_dir)
        writes = make_writes(size, args.dirty, rng, data_dir)
        how = "written through a mounted device file" if args.through_mount else "written directly"
        print(f"made the source ({how}) in {time.perf_counter() - t0:.1f} s; {len(writes.offsets)} writes "
              f"of 64 KiB ({format_size(writes.total_bytes)}, seed {args.seed}); source {args.source_cache} "
              f"at each clock start after {args.pause:g} s of quiet; "
              f"ours {'through the mount' if args.through_mount else 'in-process'}")
        settle = Settle(source, size, args.source_cache, args.pause)
        res = Results()
        expected = writes.touched_units(INCR_CLUSTER, size)
        for run in range(args.runs):
            run_dir = os.path.join(workdir, f"run{run + 1}")
            os.makedirs(run_dir)
            def ours_run() -> Outcome:
                if args.through_mount:
                    return run_ours_mounted(source, run_dir, writes, settle)
                return run_ours(source, run_dir, writes, settle, args.profile is not None)

            # A/B, then B/A: neither always runs just after the other's writeback.
            if run % 2 == 0:
                ours = ours_run()
                qemu = run_qemu(source, size, run_dir, writes, settle)
            else:
                qemu = run_qemu(source, size, run_dir, writes, settle)
                ours = ours_run()
            same, why = images_identical(ours.incr_image, qemu.incr_image)
            if not same:
                raise AssertionError(f"run {run + 1}: our incremental tip and QEMU's differ: {why}")
            mapped = top_layer_bytes(ours.incr_image)
            if ours.incr_stored != expected or mapped != expected:
                raise AssertionError(
                    f"run {run + 1}: our incremental stored {ours.incr_stored} bytes ({mapped} mapped), "
                    f"the writes touched {expected}"
                )
            dd_path = os.path.join(run_dir, "dd.bin")
            dd = Outcome(
                full=plain_write(dd_path, ours.full_stored, settle),
                incr=plain_write(dd_path, ours.incr_stored, settle),
            )
            res.ours.append(ours)
            res.qemu.append(qemu)
            res.dd.append(dd)
            print(f"  run {run + 1}/{args.runs}: ours {ours.full:.2f} s + {ours.incr:.3f} s, "
                  f"qemu {qemu.full:.2f} s + {qemu.incr:.3f} s, dd {dd.full:.2f} s + {dd.incr:.3f} s; "
                  f"tips identical ({why})", flush=True)
            if not (args.keep and run == args.runs - 1):
                shutil.rmtree(run_dir)

        full_ratio, incr_ratio = report(size, res, writes)
        if settle.resident:
            print(f"source resident in the page cache at each clock start: "
                  f"min {100 * min(settle.resident):.1f}%, median {100 * statistics.median(settle.resident):.1f}% "
                  f"(fincore, {len(settle.resident)} starts)")
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
              f"(other work on this machine adds noise; contestants alternate)")
        if args.profile is not None:
            print_profile([o.profile for o in res.ours if o.profile], args.profile or None)
        return 0 if min(full_ratio, incr_ratio) >= GOAL else 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
