"""The checker on damaged images: it reports what is wrong instead of raising,
and stays fast on tables that many snapshots and bitmaps share."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.qcow2.check import check_image
from engine.qcow2.format import OFFSET_MASK, OFLAG_COPIED

from tests.hostile_qcow2 import build, compressed_descriptor, Img, open_and_read
from tests.oracle import run

KiB = 1024
MiB = 1024 * KiB


@pytest.mark.parametrize("cluster", [512, 65536])
def test_check_of_a_file_extended_by_a_sparse_hole(tmp_path: Path, cluster: int) -> None:
    """A valid image with terabytes of hole after it (`truncate -s`): the
    check costs what the image uses, not the file's length, and says where
    the image ends as qemu-img does."""
    img = build(tmp_path / "big.qcow2", cluster=cluster, size="1M",
                writes=("write -q -P 0x11 0 64k", "write -q -P 0x22 512k 4k"))
    qemu = json.loads(subprocess.run(["qemu-img", "check", "--output=json", str(img)],
                                     capture_output=True, text=True).stdout)
    os.truncate(img, 4 << 40)
    tracemalloc.start()
    try:
        report = check_image(str(img))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok, report.render()
    assert peak < 16 * MiB, peak
    assert report.end_offset == qemu["image-end-offset"]
    assert f"Image end offset: {qemu['image-end-offset']}" in report.render()


def test_check_reports_a_zeroed_refcount(std: Img) -> None:
    data_cluster = (std.get(">Q", std.l2_entry(0)) & OFFSET_MASK) // std.cs
    std.put(">H", std.refcount_entry(data_cluster), 0)
    report = check_image(str(std.path))
    assert not report.ok
    assert any(f"cluster {data_cluster} " in m and "refcount=0 reference=1" in m for m in report.errors), report.render()


def test_check_reports_a_zeroed_refcount_block_pointer(std: Img) -> None:
    std.put(">Q", std.header.refcount_table_offset, 0)
    report = check_image(str(std.path))
    assert report.error_count >= 5, report.render()  # every cluster: refcount=0 reference=1


def test_check_reports_a_leaked_cluster(std: Img) -> None:
    end = std.file_size
    assert end % std.cs == 0
    std.put_bytes(end, b"\x5a" * std.cs)
    std.put(">H", std.refcount_entry(end // std.cs), 1)
    report = check_image(str(std.path))
    assert report.error_count == 0 and report.leak_count == 1, report.render()
    assert f"cluster {end // std.cs} " in report.leaks[0]


@pytest.mark.parametrize(
    "patch",
    [
        lambda img: img.put(">Q", img.header.refcount_table_offset, 1 << 40),
        lambda img: img.put(">Q", img.header.refcount_table_offset, img.refblock() | 0x100),
        lambda img: img.put(">Q", img.header.refcount_table_offset + 8, img.refblock()),
        lambda img: img.put(">Q", img.l2_entry(0), img.header.l1_table_offset | OFLAG_COPIED),
        lambda img: img.put(">Q", img.l2_entry(20 * KiB), img.get(">Q", img.l2_entry(0))),
        lambda img: img.put(">Q", img.l2_entry(16 * KiB), compressed_descriptor(img, 1 << 40, 1)),
        lambda img: img.put(">Q", img.l1_entry(0), img.header.refcount_table_offset | OFLAG_COPIED),
    ],
    ids=["refblock-far", "reftable-reserved", "refblock-twice", "data-on-l1", "data-twice", "compressed-far", "l2-on-reftable"],
)
def test_check_reports_structural_errors(std: Img, patch: Callable[[Img], None]) -> None:
    patch(std)
    report = check_image(str(std.path))
    assert report.error_count, report.render()
    assert "errors were found" in report.render()


def test_check_valid_snapshots_sharing_l2_tables(tmp_path: Path) -> None:
    """Snapshots share L2 tables and data clusters legitimately: each shared
    cluster's refcount counts every L1 that reaches it (as QEMU counts)."""
    path = build(tmp_path / "snap.qcow2", cluster=512, writes=("write -q -P 1 0 8k", "write -q -c -P 2 40k 2k"))
    for n in range(3):
        run("qemu-img", "snapshot", "-c", f"s{n}", path)
        run("qemu-io", "-f", "qcow2", "-c", f"write -q -P {n + 3} {n}k 1k", path)
    run("qemu-img", "check", path)
    report = check_image(str(path))
    assert report.ok, report.render()
    Img(path).put(">H", Img(path).refcount_entry(Img(path).l2_table(1) // 512), 1)  # was 4: L1 + 3 snapshots
    report = check_image(str(path))
    assert any("refcount=1 reference=4" in m for m in report.errors), report.render()


def test_check_many_snapshots_sharing_one_l1_is_fast(tmp_path: Path) -> None:
    """A small file whose snapshot table names the same L1 table (full of
    references to one L2 table) 800 times: the check must not walk that L2
    table 800 x 4096 times."""
    img = Img(build(tmp_path / "bomb.qcow2"))
    data = bytearray(img.data)
    l2 = img.l2_table()
    l1_entries = 4096
    l1_offset = len(data)
    data += struct.pack(">Q", l2 | OFLAG_COPIED) * l1_entries
    snap_offset = len(data)
    nb = 800
    for _ in range(nb):
        data += struct.pack(">QIHHIIQII", l1_offset, l1_entries, 0, 0, 0, 0, 0, 0, 0)
    data += bytes(-len(data) % 4096)
    img.path.write_bytes(bytes(data))
    img.set_field("nb_snapshots", nb)
    img.set_field("snapshots_offset", snap_offset)
    t0 = time.monotonic()
    report = check_image(str(img.path))
    assert time.monotonic() - t0 < 10
    assert not report.ok
    open_and_read(img.path)  # the active L1 is untouched: reads fine


def test_check_many_bitmaps_sharing_one_table_is_fast(tmp_path: Path) -> None:
    """A bitmap directory of 1000 bitmaps that all name one full bitmap
    table: the check must not walk that table 1000 times."""
    path = build(tmp_path / "bm.qcow2")
    run("qemu-img", "bitmap", "--add", path, "b0")
    img = Img(path)
    assert img.header.bitmaps_ext is not None
    data = bytearray(img.data)
    data += bytes(-len(data) % 4096)
    table = len(data)
    data += struct.pack(">Q", 0x1000) * 512
    directory = len(data)
    for n in range(1000):
        name = f"b{n:03d}".encode()
        raw = struct.pack(">QIIBBHI", table, 512, 0, 1, 16, len(name), 0) + name
        data += raw + bytes(-len(raw) % 8)
    size = len(data) - directory
    data += bytes(-len(data) % 4096)
    img.path.write_bytes(bytes(data))
    # Point the bitmaps extension at the new directory.
    pos = img.header.header_length
    while img.get(">I", pos) != 0x23852875:
        pos += 8 + (img.get(">I", pos + 4) + 7) // 8 * 8
    img.put(">I", pos + 8, 1000)
    img.put(">Q", pos + 16, size)
    img.put(">Q", pos + 24, directory)
    t0 = time.monotonic()
    report = check_image(str(img.path))
    assert time.monotonic() - t0 < 10
    assert not report.ok
