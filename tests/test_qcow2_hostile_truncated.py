"""Truncated and empty qcow2 files: refused where a table is cut off, zeros
where only data is missing (as QEMU reads it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.errors import ImageError
from engine.qcow2.check import check_image
from engine.qcow2.format import OFFSET_MASK
from engine.qcow2.layers import Qcow2Layer, open_layer

from tests.hostile_qcow2 import build, Img, refused

KiB = 1024


@pytest.mark.parametrize(
    ("length", "problem"),
    [
        (0, r"not a qcow2 image \(bad magic\)"),
        (3, "bad magic"),
        (4, "truncated qcow2 header"),
        (71, "truncated qcow2 header"),
        (100, "truncated version 3 header"),
        (110, "header_length 112 exceeds the first cluster"),
        (2000, r"L1 table at 0x3000 \(\+8 bytes\) lies outside the file \(2000 bytes\)"),
        (4095, r"L1 table at 0x3000 \(\+8 bytes\) lies outside the file \(4095 bytes\)"),
        (4096 + 100, r"L1 table at 0x3000 \(\+8 bytes\) lies outside the file \(4196 bytes\)"),
        (0x3000 + 4, r"L1 table at 0x3000 \(\+8 bytes\) lies outside the file"),
        (0x4000 + 100, r"L2 table at 0x4000 \(L1 entry 0\) lies outside the file"),
        (0x5000 + 100, r"data cluster lies outside the file .*guest offset 0x5000"),
    ],
)
def test_truncated(std: Img, length: int, problem: str) -> None:
    std.truncate(length)
    with refused(std.path, problem):
        with open_layer(str(std.path), "qcow2") as layer:
            layer.allocation()
    # The checker refuses what the header check refuses, and reports the rest.
    try:
        report = check_image(str(std.path))
    except ImageError as e:
        assert re.search(problem, str(e)) and str(e).startswith(f"{std.path}: ")
    else:
        assert not report.ok, report.render()


def test_truncated_data_reads_as_zeros_like_qemu(std: Img) -> None:
    """Data clusters past EOF inside the table checks: a short last cluster
    (QEMU writes them) reads as zeros, not an error."""
    std.truncate(0x7000 + 1000)  # data cluster of guest 20k is at 0x7000
    assert std.get(">Q", std.l2_entry(20 * KiB)) & OFFSET_MASK == 0x7000
    with ChainView.open(str(std.path)) as view:
        assert view.read(20 * KiB, 2048) == b"\x33" * 1000 + bytes(1048)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    with refused(empty, "bad magic"):
        Qcow2Layer(str(empty))
    with refused(empty, "bad magic"):
        check_image(str(empty))
    with refused(empty, "bad magic"):
        open_layer(str(empty), "qcow2")
    # Declared qcow2 by the image above it: refused too.
    tip = build(tmp_path / "tip.qcow2", backing="empty.qcow2", writes=())
    with refused(empty, "bad magic"):
        ChainView.open(str(tip))
