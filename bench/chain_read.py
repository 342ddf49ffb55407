"""Sequential read of a backup chain: backupfs's ChainView against `qemu-img convert`.

What is measured
    One chain of a DEVICE-sized disk (default 1 GiB) built the way backups
    build it: a full backup (our Qcow2Writer, 64 KiB clusters, incompressible
    random data in most clusters, zero regions left unallocated), then
    incrementals that each rewrite a few percent of the disk in scattered
    64 KiB-aligned runs (a small share of them as zeroed clusters). Tips at
    depth 1 (the full backup alone), 8 and 64 all describe the same-sized
    disk; the deeper the tip, the more the disk is a patchwork of layers.

    For each tip, whole-disk sequential reads by three contestants:

    * ``ours in-proc``: ChainView.open(tip) (the flattened index is built
      here, so it is part of the time) and ``view.readinto()`` of the whole
      disk in 1 MiB and in 4 MiB chunks into one reused buffer, as the mount
      and ``cat`` read (a fresh zeroed buffer per chunk would add its
      calloc to every read), data discarded; the time without the open is
      reported too ("reads only": what a mounted backup, index built once,
      sees);
    * ``qemu-img -> null``: ``qemu-img convert -n TIP`` into QEMU's null-co
      driver, its /dev/null (``-O raw /dev/null`` itself fails: "Cannot grow
      device files"): QEMU reading the chain and writing nothing, the
      reference for the in-process reads;
    * ``ours cat``: ``backupfs image cat TIP > /dev/shm/FILE``, end to end
      (interpreter start and imports, index build, reads, sparse write of a
      raw file); the start-up alone is timed as well;
    * ``qemu-img -> file``: ``qemu-img convert -O raw TIP /dev/shm/FILE``,
      the same job as ``cat``.

    * ``floor``: bench/pread_floor.c, compiled here: the same whole-disk
      1 MiB reads as ours "reads only", in C, doing nothing but the preads
      (and memsets) that ``qemu-img map`` of the tip calls for. It shows
      what depth costs any reader that copies through read(2): more, smaller
      reads from more files.

    * ``flat``: the deepest tip's disk written again as one full image
      (depth 1, our writer, its data clusters in disk order, as a full
      backup of that disk would be), read by ours (reads only) and by the
      floor. The tips of one chain are not the same disk: the incrementals
      fill the full's holes, so the depth-64 tip holds more data to copy
      than the depth-1 tip (and fewer zeros to memset). Depth 64 against
      the flat copy of its own disk is what the chain alone costs.

    Also the index: build time, extents, bytes, extrapolated to 1 TiB.

Why
    The chain index promises that a read at depth 64 costs what it costs at
    depth 1 (one bisect, then one pread per contiguous host run), and the
    Python read path has to stay within reach of QEMU's C one. The goals:
    depth-64/depth-1 >= 0.95 for ours, and ours >= 0.8x qemu-img (in-proc
    against qemu-img -> null, cat against qemu-img -> file). Ratios
    taken in the same run are the headline: bare MB/s depend on the machine.

How
    All image files are read, then pinned in the page cache (mmap + mlock)
    for the whole measurement, so every contestant reads from memory:
    reading them once is not enough where, as on this VM, DAMON proactive
    reclaim pages out data it sees as cold (the output says when it is on;
    the interpreter's and qemu-img's own files are not pinned). Contestants
    alternate run by run
    (ours, qemu-img, ours, ...), each run is timed wall-clock, medians over
    --runs are reported. Output files on /dev/shm are deleted after each run.
    The load average is printed: other work on the machine slows both sides
    (ratios of one run stay comparable, bare MB/s less so). At the end, the
    deepest tip's `image cat` output is compared byte for byte with
    `qemu-img convert`'s.

Run by hand:  .venv/bin/python -m bench.chain_read [--size 1G] [--runs 5]
              [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from engine.chain import ChainView, aligned_buffer, flatten_arrays
from bench.floor import argv as floor_argv
from bench.floor import build as floor_build
from bench.floor import run as floor_run
from engine.qcow2.layers import DATA, UNALLOC, Extent, Layer
from engine.qcow2.writer import Qcow2Writer
from engine.units import format_size, parse_size

CLUSTER = 64 * 1024
SHM = "/dev/shm"
TIB = 1 << 40
MB = 1e6  # throughput in decimal MB/s, as dd and fio print it

# Goals from the issue.
GOAL_DEPTH_RATIO = 0.95
GOAL_VS_QEMU = 0.8


# -- building the chain ----------------------------------------------------


def layer_name(index: int) -> str:
    return f"layer-{index:02d}.qcow2"


def base_runs(nclusters: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(first cluster, count) of the data runs of a full backup.

    Data runs of 1-32 MiB alternate with holes of 64 KiB-4 MiB, so about
    a tenth of the disk is never written (unallocated in the image).
    """
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < nclusters:
        n = min(int(rng.integers(16, 513)), nclusters - pos)
        runs.append((pos, n))
        pos += n + int(rng.integers(1, 65))
    return runs


def incremental_runs(
    nclusters: int, dirty_fraction: float, rng: np.random.Generator
) -> list[tuple[int, int, bool]]:
    """(first cluster, count, zeroed) of one incremental, sorted by offset.

    Scattered writes of 1-4 clusters (a file system's small writes) until
    ``dirty_fraction`` of the clusters are dirty; about 1 run in 30 is
    stored as zeroed clusters (a discard), the rest as data.
    """
    want = max(1, int(nclusters * dirty_fraction))
    dirty = np.zeros(nclusters, dtype=bool)
    count = 0
    while count < want:
        start = int(rng.integers(0, nclusters))
        n = min(int(rng.integers(1, 5)), nclusters - start)
        count += int(n - dirty[start : start + n].sum())
        dirty[start : start + n] = True
    # Contiguous dirty clusters form one run, as the backup job copies them.
    edges = np.flatnonzero(np.diff(np.concatenate(([0], dirty.view(np.int8), [0]))))
    starts, ends = edges[0::2], edges[1::2]
    zeroed = rng.random(len(starts)) < 1 / 30
    return [(int(s), int(e - s), bool(z)) for s, e, z in zip(starts, ends, zeroed)]


def write_runs(
    writer: Qcow2Writer,
    runs: list[tuple[int, int, bool]],
    rng: np.random.Generator,
    max_chunk: int = 64,
) -> None:
    for first, count, zeroed in runs:
        if zeroed:
            writer.write_zeroes(first * CLUSTER, count * CLUSTER)
            continue
        done = 0
        while done < count:
            n = min(max_chunk, count - done)
            writer.write((first + done) * CLUSTER, rng.bytes(n * CLUSTER))
            done += n


def build_chain(workdir: str, size: int, depth: int, dirty_fraction: float, seed: int) -> list[str]:
    """Write the chain; returns the image paths, base first."""
    rng = np.random.default_rng(seed)
    nclusters = size // CLUSTER
    paths: list[str] = []
    for index in range(depth):
        path = os.path.join(workdir, layer_name(index))
        if index == 0:
            writer = Qcow2Writer(path, size, CLUSTER)
            runs = [(s, n, False) for s, n in base_runs(nclusters, rng)]
        else:
            writer = Qcow2Writer(path, size, CLUSTER, layer_name(index - 1), "qcow2")
            runs = incremental_runs(nclusters, dirty_fraction, rng)
        with writer:
            write_runs(writer, runs, rng)
            writer.commit()
        paths.append(path)
    return paths


def write_flat(tip: str, path: str) -> int:
    """Write ``tip``'s disk as one image with no backing file; returns its data bytes.

    Clusters that read as zeros are left out, as a full backup leaves them;
    runs of data clusters go in 4 MiB writes, in disk order.
    """
    data = 0
    zero = bytes(CLUSTER)
    with ChainView.open(tip) as view, Qcow2Writer(path, view.size, CLUSTER) as writer:
        chunk = 4 << 20
        for pos in range(0, view.size, chunk):
            buf = view.read(pos, min(chunk, view.size - pos))
            run_start = None
            for off in range(0, len(buf) + CLUSTER, CLUSTER):
                keep = off < len(buf) and buf[off : off + CLUSTER] != zero
                if keep and run_start is None:
                    run_start = off
                elif not keep and run_start is not None:
                    writer.write(pos + run_start, buf[run_start:off])
                    data += off - run_start
                    run_start = None
        writer.commit()
    return data


def data_bytes(tip: str) -> int:
    """Bytes of the tip's disk that a read copies from an image (not zeros it fills)."""
    with ChainView.open(tip) as view:
        return sum(end - start for start, end in view.allocated_ranges())


# -- environment -------------------------------------------------------------


def fs_type(path: str) -> str:
    """File system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount_point = left.split()[4]
                inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, kind = mount_point, right.split()[0]
    except OSError:
        pass
    return kind


def warm_up(paths: list[str]) -> int:
    """Read every file once so that all contestants read from the page cache."""
    buf = bytearray(8 << 20)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


@contextlib.contextmanager
def pinned(paths: list[str]) -> Iterator[bool]:
    """Keep the files' pages in the page cache while inside (mmap + mlock).

    Reading them once is not enough where a proactive reclaimer (DAMON
    here) pages out what it sees as cold: measured on this VM, a chain read
    with ``cat`` just before was back on disk within seconds and a timed
    read took 3.6 s instead of 0.24 s. Yields whether pinning worked.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    failed = ctypes.c_void_p(-1).value
    maps: list[tuple[int, int]] = []
    ok = True
    try:
        for path in paths:
            size = os.path.getsize(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            finally:
                os.close(fd)
            if addr in (None, failed):
                ok = False
                break
            maps.append((addr, size))
            if libc.mlock(addr, size) != 0:  # faults every page in, then keeps it
                ok = False
                break
        yield ok
    finally:
        for addr, size in maps:
            libc.munmap(addr, size)  # also unlocks


def damon_reclaim_on() -> bool:
    """Whether a DAMON scheme that pages out cold memory is running (read-only look)."""
    root = "/sys/kernel/mm/damon/admin/kdamonds"
    try:
        for k in os.listdir(root):
            with open(os.path.join(root, k, "state")) as f:
                if f.read().strip() != "on":
                    continue
            for dirpath, _, files in os.walk(os.path.join(root, k, "contexts")):
                if "action" in files:
                    with open(os.path.join(dirpath, "action")) as f:
                        if f.read().strip() == "pageout":
                            return True
    except OSError:
        pass
    return False


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def qemu_img_version() -> str:
    out = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def backupfs_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "backupfs")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "import sys; from backupfs.cli import main; sys.exit(main())"]


# -- contestants ---------------------------------------------------------------


def run_inproc(tip: str, chunk: int) -> tuple[float, float]:
    """(total seconds, of which index build) for open + whole-disk read."""
    buf = memoryview(aligned_buffer(chunk))
    gc.collect()
    t0 = time.perf_counter()
    view = ChainView.open(tip)
    t1 = time.perf_counter()
    with view:
        pos, size, readinto = 0, view.size, view.readinto
        while pos < size:
            n = min(chunk, size - pos)
            readinto(pos, buf[:n])
            pos += n
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0


def run_command(argv: list[str], out_path: str, to_stdout: bool) -> float:
    """Seconds for one command writing ``out_path``; the file is removed after."""
    t0 = time.perf_counter()
    try:
        if to_stdout:
            with open(out_path, "wb") as out:
                subprocess.run(argv, stdout=out, check=True)
        else:
            subprocess.run(argv + [out_path], check=True)
        return time.perf_counter() - t0
    finally:
        try:
            os.unlink(out_path)
        except FileNotFoundError:
            pass


def run_startup() -> float:
    """Seconds for the interpreter to start and import the `backupfs` command."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import backupfs.cli"], check=True)
    return time.perf_counter() - t0


@dataclass
class Samples:
    """Seconds per run, per contestant, for one tip."""

    depth: int
    tip: str
    size: int
    times: dict[str, list[float]] = field(default_factory=dict)
    open_times: list[float] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


def contestants(
    tip: str, shm_dir: str, samples: Samples, floor: list[str] | None = None
) -> list[tuple[str, Callable[[], None]]]:
    """The runs of one round for one tip, ours and qemu-img alternating."""
    out = os.path.join(shm_dir, f"depth{samples.depth}.raw")

    def inproc(chunk: int, name: str) -> Callable[[], None]:
        def go() -> None:
            total, opened = run_inproc(tip, chunk)
            samples.add(name, total)
            if chunk == 1 << 20:
                samples.open_times.append(opened)
                samples.add("in1M-read", total - opened)

        return go

    def qemu() -> None:
        samples.add("qemu", run_command(["qemu-img", "convert", "-O", "raw", tip], out, False))

    def qemu_null() -> None:
        t0 = time.perf_counter()
        subprocess.run(qemu_null_argv(tip, samples.size), check=True)
        samples.add("qnull", time.perf_counter() - t0)

    def cat() -> None:
        samples.add("cat", run_command(backupfs_command() + ["image", "cat", tip], out, True))

    def pread_floor() -> None:
        assert floor is not None
        samples.add("floor", floor_run(floor))

    return [
        ("in1M", inproc(1 << 20, "in1M")),
        *([("floor", pread_floor)] if floor else []),
        ("qnull", qemu_null),
        ("in4M", inproc(4 << 20, "in4M")),
        ("qemu", qemu),
        ("cat", cat),
        ("qemu", qemu),
        ("qnull", qemu_null),
    ]


def flat_contestants(
    samples: Samples, floor: list[str] | None
) -> list[tuple[str, Callable[[], None]]]:
    """The flat copy of the deepest tip: ours (reads only) and the floor."""

    def inproc() -> None:
        total, opened = run_inproc(samples.tip, 1 << 20)
        samples.add("in1M-read", total - opened)

    def pread_floor() -> None:
        assert floor is not None
        samples.add("floor", floor_run(floor))

    return [("in1M", inproc), *([("floor", pread_floor)] if floor else [])]


def qemu_null_argv(tip: str, size: int) -> list[str]:
    """qemu-img converting ``tip`` into nothing: QEMU's null block driver."""
    return ["qemu-img", "convert", "-n", tip, "--target-image-opts",
            f"driver=null-co,size={size}"]


# -- index --------------------------------------------------------------------


@dataclass
class IndexInfo:
    depth: int
    extents: int
    index_bytes: int
    peak_open_bytes: int


def index_info(tip: str, depth: int) -> IndexInfo:
    """Index size, and the Python heap peak while building it (traced, untimed)."""
    gc.collect()
    tracemalloc.start()
    try:
        view = ChainView.open(tip)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with view:
        return IndexInfo(depth, view.extent_count, view.index_bytes(), peak)


# -- verification ---------------------------------------------------------------


def same_bytes(a: str, b: str, chunk: int = 16 << 20) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def verify(tip: str, shm_dir: str) -> bool:
    ours = os.path.join(shm_dir, "verify-ours.raw")
    theirs = os.path.join(shm_dir, "verify-qemu.raw")
    try:
        with open(ours, "wb") as out:
            subprocess.run(backupfs_command() + ["image", "cat", tip], stdout=out, check=True)
        subprocess.run(["qemu-img", "convert", "-O", "raw", tip, theirs], check=True)
        return same_bytes(ours, theirs)
    finally:
        for p in (ours, theirs):
            if os.path.exists(p):
                os.unlink(p)


# -- report ---------------------------------------------------------------------


def mbps(size: int, seconds: float) -> float:
    return size / seconds / MB


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def table(header: list[str], rows: list[list[str]]) -> None:
    """Right-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


class SyntheticLayer(Layer):
    """A layer that is only an allocation list: the index build without I/O."""

    def __init__(self, size: int, extents: list[Extent]) -> None:
        self.path = "synthetic"
        self.fd = -1
        self.size = size
        self._rows = np.array(extents, dtype=np.uint64).reshape(-1, 4)

    def extents(self) -> np.ndarray:
        return self._rows


def synthetic_index_scaling(
    disks: tuple[int, ...] = (1 << 30, 8 << 30, 64 << 30), depth: int = 64
) -> list[tuple[int, int, float]]:
    """(disk size, extents, seconds) of flatten_arrays on chains of one shape."""
    cluster = 64 * 1024
    out = []
    for disk in disks:
        rng = np.random.default_rng(1)
        slots = disk // cluster
        layers = []
        for _ in range(depth - 1):
            extents, pos, host = [], 0, 1 << 20
            for slot in np.sort(rng.choice(slots, slots // 50, replace=False)).tolist():
                if slot * cluster > pos:
                    extents.append(Extent(pos, slot * cluster, UNALLOC, 0))
                extents.append(Extent(slot * cluster, (slot + 1) * cluster, DATA, host))
                pos, host = (slot + 1) * cluster, host + cluster
            if pos < disk:
                extents.append(Extent(pos, disk, UNALLOC, 0))
            layers.append(SyntheticLayer(disk, extents))
        layers.append(SyntheticLayer(disk, [Extent(0, disk, DATA, 1 << 20)]))
        t0 = time.perf_counter()
        starts = flatten_arrays(layers)[0]
        out.append((disk, len(starts), time.perf_counter() - t0))
    return out


def report(
    size: int, results: list[Samples], infos: list[IndexInfo], runs: int, startup: float,
    flat: Samples,
) -> None:
    # Each of ours against the qemu-img run doing the same job.
    ours = [("in1M", "ours in-proc 1M", "qnull"), ("in4M", "ours in-proc 4M", "qnull"),
            ("cat", "ours cat", "qemu")]
    base, deepest = results[0], results[-1]

    print()
    print(f"Throughput, median of {runs} runs (MB/s = 10^6 bytes/s of the {format_size(size)}")
    print("disk), and ours/qemu-img (>1: ours faster); in-proc against qemu-img -> null,")
    print("cat against qemu-img -> file:")
    table(
        ["depth", "in-proc 1M", "in-proc 4M", "qemu->null", "cat", "qemu->file",
         "1M/qemu", "4M/qemu", "cat/qemu"],
        [
            [str(s.depth)]
            + [f"{mbps(size, s.median(n)):.0f}" for n in ("in1M", "in4M", "qnull", "cat", "qemu")]
            + [f"{s.median(q) / s.median(n):.2f}" for n, _, q in ours]
            for s in results
        ],
    )
    print(f"  cat includes starting Python and importing `backupfs`: {startup * 1000:.0f} ms"
          f" (median of `python -c 'import backupfs.cli'`),")
    print(f"  {startup / base.median('cat') * 100:.0f}% of the depth-{base.depth} cat;"
          " qemu-img starts in milliseconds.")

    print()
    print(f"Depth ratios, throughput at depth N / at depth {base.depth}. 'reads only' leaves out")
    print("the index build, as a mounted backup (index built once) sees it:")
    table(
        ["depth", "in-proc 1M", "in-proc 4M", "qemu->null", "cat", "qemu->file",
         "1M reads only"],
        [
            [str(s.depth)]
            + [f"{base.median(n) / s.median(n):.2f}"
               for n in ("in1M", "in4M", "qnull", "cat", "qemu", "in1M-read")]
            for s in results[1:]
        ],
    )
    print("  reads only, MB/s: " + ", ".join(
        f"depth {s.depth} {mbps(size, s.median('in1M-read')):.0f}" for s in results))
    has_floor = all("floor" in s.times for s in results)
    if has_floor:
        print()
        print("The floor (bench/pread_floor.c): the same 1 MiB reads as 'reads only', in C, with")
        print("nothing but the preads and memsets that `qemu-img map` of the tip calls for:")
        table(
            ["depth", "floor MB/s", f"floor depth N/{base.depth}", "ours reads only/floor"],
            [
                [str(s.depth), f"{mbps(size, s.median('floor')):.0f}",
                 f"{base.median('floor') / s.median('floor'):.2f}",
                 f"{s.median('floor') / s.median('in1M-read'):.2f}"]
                for s in results
            ],
        )
        print("  a depth ratio under the goal here is the kernel's cost of more, smaller reads")
        print("  from more files, which no reader that copies through read(2) avoids")

    print()
    print(f"Same disk, no chain: the depth-{deepest.depth} tip against the flat copy of its disk")
    print("(one image, depth 1), 1 MiB reads only, MB/s and depth/flat:")
    has_flat_floor = "floor" in flat.times and "floor" in deepest.times
    table(
        ["read", f"depth {deepest.depth}", "flat", f"{deepest.depth}/flat"],
        [["ours", f"{mbps(size, deepest.median('in1M-read')):.0f}", f"{mbps(size, flat.median('in1M-read')):.0f}",
          f"{flat.median('in1M-read') / deepest.median('in1M-read'):.2f}"]]
        + ([["floor", f"{mbps(size, deepest.median('floor')):.0f}", f"{mbps(size, flat.median('floor')):.0f}",
             f"{flat.median('floor') / deepest.median('floor'):.2f}"]] if has_flat_floor else []),
    )

    print()
    print("Index (ChainView.open; build time is the median over the 1M in-proc runs):")
    scale = TIB / size
    table(
        ["depth", "build ms", "extents", "index", "peak heap", "index @1TiB", "build @1TiB"],
        [
            [
                str(s.depth),
                f"{statistics.median(s.open_times) * 1000:.1f}",
                str(info.extents),
                format_size(info.index_bytes),
                format_size(info.peak_open_bytes),
                format_size(int(info.index_bytes * scale)),
                f"{statistics.median(s.open_times) * scale:.0f} s",
            ]
            for s, info in zip(results, infos)
        ],
    )
    print("  index = the per-extent arrays (index_bytes()); peak heap = Python allocations")
    print("  while opening, traced once; @1TiB = scaled linearly: the same shape of chain")
    print("  on a 1 TiB device (linear: see the synthetic chains below)")

    print()
    print("Index build on synthetic chains (flatten_arrays, no I/O): a full under 63 layers")
    print("of 64 KiB extents at random, 2% of the disk each, growing the disk:")
    table(["disk", "extents", "build ms", "us/extent"], [
        [format_size(disk), str(n), f"{sec * 1000:.0f}", f"{sec / n * 1e6:.2f}"]
        for disk, n, sec in synthetic_index_scaling()
    ])

    print()
    print("Goals:")
    for n, label in [*((n, label) for n, label, _ in ours), ("in1M-read", "in-proc reads only")]:
        ratio = base.median(n) / deepest.median(n)
        print(f"  {label:<18} depth-{deepest.depth}/depth-{base.depth} = {ratio:.2f}"
              f"  (goal >= {GOAL_DEPTH_RATIO})  {verdict(ratio >= GOAL_DEPTH_RATIO)}")
    if has_floor:
        ratio = base.median("floor") / deepest.median("floor")
        print(f"  {'(the pread floor)':<18} depth-{deepest.depth}/depth-{base.depth} = {ratio:.2f}"
              "  (for reference: the most any read(2) reader gets here)")
    ratio = flat.median("in1M-read") / deepest.median("in1M-read")
    print(f"  {'(same disk)':<18} reads only depth-{deepest.depth}/flat = {ratio:.2f}"
          "  (for reference: what the chain costs, the disk's content aside)")
    for n, label, q in ours:
        worst = min(s.median(q) / s.median(n) for s in results)
        against = "qemu-img->null" if q == "qnull" else "qemu-img->file"
        print(f"  {label:<18} ours/{against}, worst depth = {worst:.2f}"
              f"  (goal >= {GOAL_VS_QEMU})  {verdict(worst >= GOAL_VS_QEMU)}")


# -- main -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="device size (default 1G)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per contestant (default 5)")
    p.add_argument("--depths", default="1,8,64", help="tip depths to measure (default 1,8,64)")
    p.add_argument("--dirty", type=float, default=2.0,
                   help="percent of the disk each incremental rewrites (default 2)")
    p.add_argument("--workdir", help="where to build the chain (default: a new dir in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the chain afterwards")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--no-verify", action="store_true", help="skip the byte comparison at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = parse_size(args.size)
    if size <= 0 or size % CLUSTER:
        raise SystemExit(f"--size must be a positive multiple of {CLUSTER} bytes")
    depths = sorted({int(d) for d in args.depths.split(",")})
    if depths[0] < 1:
        raise SystemExit("--depths must be >= 1")
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img not found")
    free = shutil.disk_usage(SHM).free
    if free < size + (64 << 20):
        raise SystemExit(
            f"{SHM} has {format_size(free)} free; the raw outputs need {format_size(size)}"
        )

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="chain_read-", dir=args.workdir)
    else:
        workdir = tempfile.mkdtemp(prefix="backupfs-chain_read-", dir="/var/tmp")
    shm_dir = tempfile.mkdtemp(prefix="backupfs-chain_read-", dir=SHM)
    try:
        kind = fs_type(workdir)
        print(f"backupfs chain_read: {format_size(size)} device, tips at depth {depths}, "
              f"{args.runs} runs, incrementals dirty {args.dirty}% each")
        print(f"python {platform.python_version()}, {qemu_img_version()}, {os.cpu_count()} CPUs")
        print(f"chain in {workdir} ({kind}); raw outputs in {shm_dir}")
        print(f"load average at start: {load_average()}")
        if kind in ("tmpfs", "ramfs"):
            print("  warning: the chain is on a RAM file system, not a real disk")

        t0 = time.perf_counter()
        paths = build_chain(workdir, size, depths[-1], args.dirty / 100, args.seed)
        on_disk = sum(os.path.getsize(p) for p in paths)
        print(f"built {len(paths)} images, {format_size(on_disk)} on disk, "
              f"in {time.perf_counter() - t0:.1f} s")

        results = [Samples(d, paths[d - 1], size) for d in depths]
        flat_path = os.path.join(workdir, "flat.qcow2")
        flat_data = write_flat(results[-1].tip, flat_path)
        flat = Samples(1, flat_path, size)
        print(f"flat copy of the depth-{depths[-1]} tip's disk: {format_size(flat_data)} of data "
              f"(the depth-{depths[0]} tip: {format_size(data_bytes(results[0].tip))})")
        floors: dict[int, list[str] | None] = {}
        exe = floor_build(workdir)
        for s in results:
            floors[s.depth] = floor_argv(exe, s.tip, workdir, f"depth{s.depth}") if exe else None
        flat_floor = floor_argv(exe, flat_path, workdir, "flat") if exe else None
        startup: list[float] = []
        with pinned(paths + [flat_path]) as ok:
            warmed = warm_up(paths + [flat_path])
            print(f"warm-up: read all {len(paths) + 1} image files ({format_size(warmed)}) and "
                  + ("pinned them in the page cache (mlock) for all runs"
                     if ok else "pinning them in the page cache (mlock) FAILED"))
            if damon_reclaim_on():
                print("  (DAMON proactive reclaim is on here: unpinned, they would be paged out)")
            for run in range(args.runs):
                for s in results:
                    for _, go in contestants(s.tip, shm_dir, s, floors[s.depth]):
                        go()
                for _, go in flat_contestants(flat, flat_floor):
                    go()
                startup.append(run_startup())
                print(f"  run {run + 1}/{args.runs} done", flush=True)

        print(f"load average after the runs: {load_average()} (other work on the machine"
              " slows both sides; ratios of one run stay comparable, bare MB/s less so)")
        infos = [index_info(s.tip, s.depth) for s in results]
        report(size, results, infos, args.runs, statistics.median(startup), flat)

        if not args.no_verify:
            deepest = results[-1]
            ok = verify(deepest.tip, shm_dir)
            print()
            print(f"verify: `backupfs image cat` of the depth-{deepest.depth} tip == "
                  f"`qemu-img convert -O raw`: {'identical' if ok else 'DIFFERENT'}")
            if not ok:
                return 1
        return 0
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
        if args.keep:
            print(f"kept the chain in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
