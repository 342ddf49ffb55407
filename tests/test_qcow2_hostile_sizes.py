"""Hostile sizes: a header asks for huge tables, we do not allocate them; a
layer of millions of extents costs tens of bytes each."""

from __future__ import annotations

import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.errors import ImageError
from engine.qcow2.check import check_image
from engine.qcow2.format import OFLAG_COPIED

from tests.hostile_qcow2 import Img, open_and_read

KiB = 1024
MiB = 1024 * KiB


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("l1_size", 0xFFFFFFFF),
        ("l1_size", 0x400000),
        ("refcount_table_clusters", 0x7FFFFFFF),
        ("nb_snapshots", 0xFFFFFFFF),
        ("backing_file_size", 0xFFFFFFFF),
        ("size", (1 << 64) - 1),
        ("header_length", 0xFFFFFFF8),
    ],
)
def test_hostile_sizes_allocate_nothing_big(std: Img, name: str, value: int) -> None:
    std.set_field(name, value)
    if name == "backing_file_size":
        std.set_field("backing_file_offset", 2048)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError):
            open_and_read(std.path)
        with pytest.raises(ImageError):
            check_image(str(std.path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"{peak} bytes for a {std.file_size}-byte file"


def _alternating_image(path: Path, tables: int) -> int:
    """A legal image QEMU reads whose clusters alternate between two host
    clusters: one extent per cluster, nothing to merge (the worst layout a
    VM's random writes approach). Returns its number of clusters."""
    cs, per = 65536, 65536 // 8
    meta = 7  # header, refcount table, refcount block, L1, data, (a gap), data
    with open(path, "wb") as f:
        f.truncate((meta + tables) * cs)
        f.write(struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 3, 0, 0, 16, tables * per * cs, 0, tables,
                            3 * cs, 1 * cs, 1, 0, 0) + struct.pack(">QQQII", 0, 0, 0, 4, 104))
        f.seek(1 * cs)
        f.write(struct.pack(">Q", 2 * cs))
        f.seek(2 * cs)
        f.write(struct.pack(">H", 1) * (meta + tables))
        f.seek(3 * cs)
        f.write(b"".join(struct.pack(">Q", (meta + i) * cs | OFLAG_COPIED) for i in range(tables)))
        f.seek(4 * cs)
        f.write(b"\x11" * cs)
        f.seek(6 * cs)
        f.write(b"\x22" * cs)
        f.seek(meta * cs)
        f.write(struct.pack(">QQ", 4 * cs, 6 * cs) * (per // 2) * tables)
    return tables * per


def test_a_layer_of_millions_of_extents_costs_tens_of_bytes_each(tmp_path: Path) -> None:
    """Decoding all of a big layer at once, and sorting and coalescing its
    rows whole, took ~300 bytes an extent at the peak: gigabytes for a
    fragmented terabyte, where QEMU reads on with megabytes."""
    img = tmp_path / "alt.qcow2"
    clusters = _alternating_image(img, 256)
    assert subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x22 {(clusters - 1) * 65536} 64k", str(img)],
                          capture_output=True, text=True).stdout.startswith("read 65536/65536")
    tracemalloc.start()
    try:
        with ChainView.open(str(img)) as view:
            assert view.extent_count == clusters
            peak = tracemalloc.get_traced_memory()[1]
            for c in (0, 1, clusters // 2 + 1, clusters - 1):
                assert view.read(c * 65536, 65536) == (b"\x22" if c % 2 else b"\x11") * 65536
    finally:
        tracemalloc.stop()
    assert peak / clusters < 120, f"{peak / clusters:.0f} bytes an extent at the peak"
