"""What opening a backup of a big device costs: a 1 TiB device, synthetic.

What is measured
    1. Checksums. Opening a backup reads the checksum records of its whole
       lineage and overlays them (newest wins), one 8-byte xxh3 per granule.
       A full of a DEVICE-sized disk (64 KiB granules: every granule
       defined) and DEPTH-1 incrementals, each defining 2 % of the granules
       at random, are written as record files; then the lineage is opened
       the way ``Repository.open_backup`` does it: peak Python heap
       (tracemalloc, which sees numpy's buffers), what stays, and the time.
       The baseline is the dense design this replaced, one full-size array
       per record all held at once: DEPTH x 8 bytes x granules, computed.
    2. Layer decode. One qcow2 image of a DEVICE-sized disk, 64 KiB clusters,
       with 2 % of its clusters allocated at random (one in 64 as data, the
       rest as zero clusters, so the file stays small), written by our
       writer; then its L2 tables decoded into extents (what every chain
       open does for every layer it has not cached), against
       ``qemu-img map --output=json`` of the same image in the same run (the
       same walk in C, plus printing one JSON line per extent). The two must
       report the same extents.

Why
    Users back up 1 TiB VM disks and open last night's backup to restore a
    file: the open must not need gigabytes or minutes. The numbers for the
    1 GiB chains of bench/chain_read.py scale linearly to these.

Run by hand:  .venv/bin/python -m bench.large_device [--size 1T] [--depth 64] [--runs 3]
              [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from bitarray import bitarray

from engine.checksums import ChecksumRecord, overlay
from engine.qcow2 import layers
from engine.qcow2.layers import KIND_NAMES, UNALLOC
from engine.qcow2.writer import Qcow2Writer
from engine.units import parse_size

GRANULE = 64 * 1024
MiB = 1024 * 1024


def build_records(directory: Path, size: int, depth: int, share: float) -> list[str]:
    rng = np.random.default_rng(1)
    paths = []
    for k in range(depth):
        rec = ChecksumRecord(size, GRANULE)
        if k == 0:
            rec.hashes[:] = rng.integers(1, 2**63, rec.count, dtype=np.uint64)
            rec.defined.setall(1)
        else:
            idx = rng.choice(rec.count, int(rec.count * share), replace=False)
            rec.hashes[idx] = rng.integers(1, 2**63, len(idx), dtype=np.uint64)
            mask = np.zeros(rec.count, dtype=bool)
            mask[idx] = True
            bits = bitarray(endian="little")
            bits.pack(mask.tobytes())
            rec.defined = bits
        path = str(directory / f"{k:03d}.sums")
        rec.save(path, atomic=False)
        paths.append(path)
    return paths


def open_lineage(paths: list[str]) -> tuple[float, int, int]:
    """(seconds, peak heap bytes, kept bytes) of overlaying the lineage."""
    tracemalloc.start()
    try:
        t = time.perf_counter()
        hashes, defined = overlay(ChecksumRecord.load(p) for p in paths)
        elapsed = time.perf_counter() - t
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert defined.all() and len(hashes) == len(defined)
    return elapsed, peak, kept


def build_image(path: Path, size: int, share: float) -> int:
    cs = GRANULE
    rng = np.random.default_rng(2)
    slots = np.sort(rng.choice(size // cs, int(size // cs * share), replace=False))
    data = os.urandom(cs)
    w = Qcow2Writer(str(path), size, cs)
    for k, slot in enumerate(slots.tolist()):
        if k % 64 == 0:
            w.write(slot * cs, data)
        else:
            w.write_zeroes(slot * cs, cs)
    w.commit()
    return len(slots)


def decode(path: Path) -> tuple[float, np.ndarray]:
    layers._ALLOCATIONS = layers._AllocationCache()  # decode, not a cache hit
    with layers.open_layer(str(path)) as layer:
        t = time.perf_counter()
        rows = layer.extents()
        return time.perf_counter() - t, rows


def qemu_map(path: Path) -> tuple[float, list[dict]]:
    t = time.perf_counter()
    out = subprocess.run(["qemu-img", "map", "--output=json", str(path)], check=True, capture_output=True)
    elapsed = time.perf_counter() - t
    return elapsed, json.loads(out.stdout)


def same_extents(rows: np.ndarray, qemu: list[dict]) -> bool:
    """Our rows against qemu-img map: same start/length/zero/data, unallocated as holes."""
    ours = []
    for start, end, kind, host in rows.tolist():
        name = KIND_NAMES[kind]
        ours.append((start, end - start, name == "zero" or kind == UNALLOC, name == "data"))
    theirs = [(e["start"], e["length"], e["zero"], e["data"]) for e in qemu]

    def merged(seq: list[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool, bool]]:
        out: list[tuple[int, int, bool, bool]] = []
        for s, n, z, d in seq:
            if out and out[-1][2:] == (z, d) and out[-1][0] + out[-1][1] == s and not d:
                out[-1] = (out[-1][0], out[-1][1] + n, z, d)
            else:
                out.append((s, n, z, d))
        return out

    return merged(ours) == merged(theirs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1T")
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--share", type=float, default=0.02, help="share of granules/clusters per layer (0.02)")
    p.add_argument("--workdir", default="/var/tmp")
    args = p.parse_args()
    size = parse_size(args.size)
    granules = size // GRANULE
    print(f"backupfs large_device: {size / 2**40:g} TiB device, 64 KiB granules and clusters "
          f"({granules} of them), lineage depth {args.depth}, {100 * args.share:g}% per layer; "
          f"load {os.getloadavg()[0]:.1f}")
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="backupfs-large-"))
    try:
        t = time.perf_counter()
        paths = build_records(work, size, args.depth, args.share)
        on_disk = sum(os.path.getsize(q) for q in paths)
        print(f"records written in {time.perf_counter() - t:.1f} s: {on_disk / MiB:.0f} MiB on disk")
        runs = [open_lineage(paths) for _ in range(args.runs)]
        secs = statistics.median(r[0] for r in runs)
        peak = statistics.median(r[1] for r in runs)
        kept = statistics.median(r[2] for r in runs)
        dense = args.depth * granules * 8
        print("\n1. Opening the lineage's checksums (median of runs):")
        print(f"   time {secs:.2f} s; peak heap {peak / MiB:.0f} MiB; kept {kept / MiB:.0f} MiB "
              f"(the overlay: 8 bytes a granule, plus the defined bitmap)")
        print(f"   dense baseline (every record a full-size array, all held): {dense / MiB:.0f} MiB; "
              f"peak/baseline = {peak / dense:.3f}")
        for q in paths:
            os.unlink(q)

        image = work / "layer.qcow2"
        t = time.perf_counter()
        n = build_image(image, size, args.share)
        print(f"\nimage written in {time.perf_counter() - t:.1f} s: {n} clusters allocated, "
              f"{os.path.getsize(image) / MiB:.0f} MiB file")
        ours, theirs, rows, qmap = [], [], None, None
        for _ in range(args.runs):  # alternating
            el, rows = decode(image)
            ours.append(el)
            el, qmap = qemu_map(image)
            theirs.append(el)
        assert rows is not None and qmap is not None
        agree = same_extents(rows, qmap)
        o, q = statistics.median(ours), statistics.median(theirs)
        print("2. Decoding the layer's L2 tables into extents (median of runs):")
        print(f"   ours {o:.2f} s ({len(rows)} extents); qemu-img map {q:.2f} s ({len(qmap)} entries); "
              f"qemu-img/ours = {q / o:.2f}; extents agree: {'yes' if agree else 'NO'}")
        return 0 if agree else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
