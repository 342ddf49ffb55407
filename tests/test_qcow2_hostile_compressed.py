"""Hostile compressed clusters: bad descriptors, garbage that does not
decompress, or decompresses to more than a cluster: an ImageError on read."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.qcow2.check import check_image
from engine.qcow2.format import OFLAG_COMPRESSED
from engine.qcow2.layers import Qcow2Layer

from tests.hostile_qcow2 import build, compressed_descriptor, Img, refused

KiB = 1024


@pytest.mark.parametrize(
    ("coffset", "problem"),
    [
        (lambda img: img.file_size, "compressed cluster lies outside the file"),
        (lambda img: 1 << 40, "compressed cluster lies outside the file"),
        (lambda img: 100, "compressed cluster overlaps the header"),
    ],
    ids=["eof", "far", "header"],
)
def test_compressed_descriptor_bad(std: Img, coffset: Callable[[Img], int], problem: str) -> None:
    where = std.l2_entry(16 * KiB)
    assert std.get(">Q", where) & OFLAG_COMPRESSED
    std.put(">Q", where, compressed_descriptor(std, coffset(std), 1))
    with refused(std.path, problem):
        ChainView.open(str(std.path))
    assert not check_image(str(std.path)).ok


def _compressed_span(img: Img, guest: int) -> tuple[int, int]:
    with Qcow2Layer(str(img.path)) as layer:
        return layer.compressed_span(img.get(">Q", img.l2_entry(guest)))


KINDS = {
    "zlib-4k": dict(cluster=4096, opts=()),
    "zstd-4k": dict(cluster=4096, opts=("compression_type=zstd",)),
    "zlib-512": dict(cluster=512, opts=()),
    "zstd-extl2-32k": dict(cluster=32 * KiB, opts=("compression_type=zstd", "extended_l2=on")),
    "zlib-v2": dict(cluster=4096, opts=("compat=0.10",)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("garbage", ["random", "zeros", "ones"])
def test_compressed_garbage_is_an_image_error_on_read(tmp_path: Path, kind: str, garbage: str) -> None:
    cluster = KINDS[kind]["cluster"]
    writes = (f"write -q -P 0x44 0 {cluster}", f"write -q -c -P 0x22 {cluster} {cluster}")
    img = Img(build(tmp_path / "c.qcow2", cluster=cluster, size="256K", opts=KINDS[kind]["opts"], writes=writes))
    coffset, csize = _compressed_span(img, cluster)
    fill = {
        "random": random.Random(7).randbytes(csize),
        "zeros": bytes(csize),
        "ones": b"\xff" * csize,
    }[garbage]
    img.put_bytes(coffset, fill)
    with ChainView.open(str(img.path)) as view:  # the tables are fine...
        assert view.read(0, cluster) == b"\x44" * cluster  # ...and so is the rest
        with refused(img.path, f"compressed cluster at {coffset:#x} (is corrupt|decompresses to)"):
            view.read(cluster, cluster)
        with refused(img.path, "compressed cluster"):
            view.read(0, view.size)


def test_zstd_cluster_that_decompresses_to_more_than_a_cluster(tmp_path: Path) -> None:
    """QEMU fails the read with EIO; we returned the first cluster's worth
    as if it were the data, and qemu-img check cannot see it (it does not
    decompress)."""
    import zstandard

    cluster = 4096
    writes = (f"write -q -c -P 0x22 0 {cluster}",)
    img = Img(build(tmp_path / "z.qcow2", cluster=cluster, size="64K", opts=("compression_type=zstd",),
                    writes=writes))
    coffset, csize = _compressed_span(img, 0)
    frame = zstandard.ZstdCompressor().compress(b"\x22" * (cluster + 512))
    assert len(frame) <= csize
    img.put_bytes(coffset, frame)
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read 0 {cluster}", str(img.path)],
                          capture_output=True, text=True)
    assert "Input/output error" in proc.stdout + proc.stderr  # QEMU's answer
    with ChainView.open(str(img.path)) as view:
        with refused(img.path, f"compressed cluster at {coffset:#x} decompresses to more than the cluster size"):
            view.read(0, cluster)


def test_compressed_length_too_short(tmp_path: Path) -> None:
    """A descriptor claiming one sector for a cluster that needs several."""
    rng = random.Random(3)
    src = tmp_path / "text.bin"
    src.write_bytes(bytes(rng.choice(b"abcdefghijklmnop") for _ in range(4096)))
    img = Img(build(tmp_path / "c.qcow2", writes=(f"write -q -c -s {src} 0 4k",)))
    where = img.l2_entry(0)
    coffset, csize = _compressed_span(img, 0)
    assert csize > 1024  # several sectors of compressed data
    img.put(">Q", where, compressed_descriptor(img, coffset, 1))
    with ChainView.open(str(img.path)) as view:
        with refused(img.path, f"compressed cluster at {coffset:#x} (decompresses to|is corrupt)"):
            view.read(0, 4096)


def test_compressed_length_at_maximum_still_reads(std: Img) -> None:
    """The longest length the descriptor can express reads past EOF, as QEMU allows."""
    where = std.l2_entry(16 * KiB)
    coffset, _csize = _compressed_span(std, 16 * KiB)
    std.put(">Q", where, compressed_descriptor(std, coffset, 1 << (std.header.cluster_bits - 8)))
    with ChainView.open(str(std.path)) as view:
        assert view.read(16 * KiB, 4096) == b"\x22" * 4096
