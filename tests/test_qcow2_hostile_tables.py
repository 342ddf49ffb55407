"""Hostile qcow2 tables: where the header puts the L1, refcount and snapshot
tables and the backing name, and what the L1 and L2 entries hold, each
refused with one clear ImageError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.qcow2.check import check_image
from engine.qcow2.format import OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO

from tests.hostile_qcow2 import build, Img, refused
from tests.oracle import qemu_raw

KiB = 1024
MiB = 1024 * KiB


def test_l1_table_misaligned(std: Img) -> None:
    std.set_field("l1_table_offset", std.header.l1_table_offset + 8)
    with refused(std.path, r"L1 table offset 0x3008 is not cluster-aligned"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize("where", ["eof", "far", "max"])
def test_l1_table_beyond_eof(std: Img, where: str) -> None:
    offset = {"eof": std.file_size, "far": 1 << 40, "max": OFFSET_MASK & ~0xFFF}[where]
    std.set_field("l1_table_offset", offset)
    with refused(std.path, rf"L1 table at {offset:#x} \(\+8 bytes\) lies outside the file"):
        ChainView.open(str(std.path))


def test_l1_table_over_the_header(std: Img) -> None:
    std.set_field("l1_table_offset", 0)
    with refused(std.path, "L1 table overlaps the header"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize(
    ("l1_size", "size", "problem"),
    [
        (0, 64 * KiB, r"L1 table too small: 0 entries for a virtual size of 65536 \(needs 1\)"),
        (1, 4 * MiB, r"L1 table too small: 1 entries for a virtual size of 4194304 \(needs 2\)"),
        (1, 1 << 62, "L1 table too small"),
        (1, (1 << 64) - 1, "L1 table too small"),
    ],
)
def test_l1_too_small_for_the_size(std: Img, l1_size: int, size: int, problem: str) -> None:
    std.set_field("l1_size", l1_size)
    std.set_field("size", size)
    with refused(std.path, problem):
        ChainView.open(str(std.path))


@pytest.mark.parametrize("l1_size", [0x400001, 0x7FFFFFFF, 0xFFFFFFFF])
def test_l1_size_over_32_mib(std: Img, l1_size: int) -> None:
    std.set_field("l1_size", l1_size)
    with refused(std.path, f"L1 table of {l1_size} entries exceeds QEMU's 32 MiB limit"):
        ChainView.open(str(std.path))


def test_l1_size_within_limit_but_beyond_eof(std: Img) -> None:
    """32 MiB exactly is allowed by QEMU, but this file is 32 KiB."""
    std.set_field("l1_size", 0x400000)
    with refused(std.path, r"L1 table at 0x3000 \(\+33554432 bytes\) lies outside the file"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("refcount_table_offset", 1 << 30, r"refcount table at 0x40000000 \(\+4096 bytes\) lies outside the file"),
        ("refcount_table_offset", 0x1001, "refcount table offset 0x1001 is not cluster-aligned"),
        ("refcount_table_clusters", 8, r"refcount table at 0x1000 \(\+32768 bytes\) lies outside the file"),
        ("refcount_table_clusters", 0xFFFFFFFF, "refcount table of 4294967295 clusters exceeds QEMU's 8 MiB limit"),
    ],
)
def test_refcount_table_bad(std: Img, name: str, value: int, problem: str) -> None:
    std.set_field(name, value)
    with refused(std.path, problem):
        ChainView.open(str(std.path))
    with refused(std.path, problem):
        check_image(str(std.path))


@pytest.mark.parametrize(
    ("nb", "offset", "problem"),
    [
        (1, 1 << 30, "snapshot table at 0x40000000 .* lies outside the file"),
        (1, 0x800, "snapshot table offset 0x800 is not cluster-aligned"),
        (65537, 0x1000, "65537 internal snapshots exceeds QEMU's limit"),
        (0xFFFFFFFF, 0x1000, "internal snapshots exceeds QEMU's limit"),
    ],
)
def test_snapshot_table_bad(std: Img, nb: int, offset: int, problem: str) -> None:
    std.set_field("nb_snapshots", nb)
    std.set_field("snapshots_offset", offset)
    with refused(std.path, problem):
        ChainView.open(str(std.path))


@pytest.mark.parametrize(
    ("offset", "size", "problem"),
    [
        (2048, 5000, "backing file name of 5000 bytes is too long"),
        (4090, 100, "backing file name lies outside the header cluster"),
        (1 << 63, 10, "backing file name lies outside the header cluster"),
        (16, 10, "backing file name overlaps the header"),
    ],
)
def test_backing_name_fields(std: Img, offset: int, size: int, problem: str) -> None:
    std.set_field("backing_file_offset", offset)
    std.set_field("backing_file_size", size)
    with refused(std.path, problem):
        ChainView.open(str(std.path))


def test_an_empty_backing_name_is_no_backing_file(std: Img, tmp_path: Path) -> None:
    """As QEMU reads it: an offset with a name of no bytes names nothing."""
    std.set_field("backing_file_offset", 2048)
    std.set_field("backing_file_size", 0)
    with ChainView.open(str(std.path)) as view:
        assert view.depth == 1
        assert view.read(0, view.size) == qemu_raw(std.path, tmp_path)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (lambda img: (1 << 30) | OFLAG_COPIED, r"L2 table at 0x40000000 \(L1 entry 0\) lies outside the file"),
        (lambda img: img.file_size | OFLAG_COPIED, r"\(L1 entry 0\) lies outside the file"),
        (lambda img: (img.l2_table() + 512) | OFLAG_COPIED, r"L2 table offset 0x4200 \(L1 entry 0\) is not cluster-aligned"),
        (lambda img: img.l2_table() | OFLAG_COPIED | 1 << 56, "L1 entry 0 has reserved bits set"),
        (lambda img: img.l2_table() | OFLAG_COPIED | 1, "L1 entry 0 has reserved bits set"),
    ],
    ids=["far", "eof", "misaligned", "reserved-high", "reserved-low"],
)
def test_l1_entry_bad(std: Img, entry: Callable[[Img], int], problem: str) -> None:
    std.put(">Q", std.l1_entry(0), entry(std))
    with refused(std.path, problem):
        ChainView.open(str(std.path))
    report = check_image(str(std.path))
    assert not report.ok


def test_same_l2_table_twice_in_l1(tmp_path: Path) -> None:
    """512-byte clusters: one L2 table covers 32 KiB, so 64 KiB needs two."""
    img = Img(build(tmp_path / "two.qcow2", cluster=512, writes=("write -q -P 1 0 1k", "write -q -P 2 40k 1k")))
    assert img.header.l1_size == 2 and img.l2_table(1)
    img.put(">Q", img.l1_entry(1), img.get(">Q", img.l1_entry(0)))
    with refused(img.path, "is referenced twice by the L1 table"):
        ChainView.open(str(img.path))
    report = check_image(str(img.path))
    assert report.error_count and any("twice" in m for m in report.errors), report.render()


@pytest.mark.parametrize(
    ("guest", "entry", "problem"),
    [
        (0, lambda img, e: e + 512, "data cluster offset is not cluster-aligned .*entry 0, guest offset 0x0"),
        (0, lambda img, e: (e & ~OFFSET_MASK) | (1 << 40), "data cluster lies outside the file"),
        (0, lambda img, e: (e & ~OFFSET_MASK) | img.file_size, "data cluster lies outside the file"),
        (20 * KiB, lambda img, e: e | 2, "L2 entry has reserved bits set .*entry 5"),
        (20 * KiB, lambda img, e: e | 1 << 57, "L2 entry has reserved bits set"),
    ],
    ids=["misaligned", "far", "eof", "reserved-low", "reserved-high"],
)
def test_l2_entry_bad(std: Img, guest: int, entry: Callable[[Img, int], int], problem: str) -> None:
    where = std.l2_entry(guest)
    std.put(">Q", where, entry(std, std.get(">Q", where)))
    with refused(std.path, problem):
        ChainView.open(str(std.path))
    report = check_image(str(std.path))
    assert not report.ok, report.render()


def test_zero_flag_with_a_bad_offset_is_still_refused(std: Img) -> None:
    where = std.l2_entry(8 * KiB)
    std.put(">Q", where, OFLAG_ZERO | (1 << 40))
    with refused(std.path, "data cluster lies outside the file"):
        ChainView.open(str(std.path))
