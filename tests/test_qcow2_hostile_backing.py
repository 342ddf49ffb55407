"""Hostile backing chains: loops, depth, missing files, protocols, formats,
directories and fifos, each refused with one clear ImageError, never a hang."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.qcow2.backing import open_chain
from engine.qcow2.check import check_image
from engine.qcow2.format import MAX_CHAIN_DEPTH
from engine.qcow2.writer import Qcow2Writer

from tests.hostile_qcow2 import build, Img, open_and_read, open_fds, refused, rename_backing

KiB = 1024


def test_backing_loop_a_b_a(tmp_path: Path) -> None:
    build(tmp_path / "a.qcow2", backing="b.qcow2", writes=())
    build(tmp_path / "b.qcow2", backing="a.qcow2", writes=())
    before = open_fds()
    # Named: the image met twice, and where it was first met.
    with refused(tmp_path / "a.qcow2", f"backing chain loops back to {re.escape(str(tmp_path / 'a.qcow2'))}"):
        ChainView.open(str(tmp_path / "a.qcow2"))
    assert open_fds() == before  # every layer opened so far was closed


def test_backing_loop_to_itself(tmp_path: Path) -> None:
    path = build(tmp_path / "a.qcow2", backing="x.qcow2", writes=())
    rename_backing(path, "a.qcow2")
    with refused(path, "backing chain loops back to"):
        ChainView.open(str(path))


def test_backing_loop_through_a_symlink_and_absolute_path(tmp_path: Path) -> None:
    """Loops are found by inode, not by name."""
    a = build(tmp_path / "a.qcow2", backing="alias.qcow2", writes=())
    (tmp_path / "alias.qcow2").symlink_to("b.qcow2")
    build(tmp_path / "b.qcow2", backing=str(a), writes=())
    with refused(a, f"backing chain loops back to {re.escape(str(a))}"):
        ChainView.open(str(a))


def _tiny_chain(directory: Path, n: int) -> Path:
    """n tiny images l0000 -> l0001 -> ... -> l{n-1} (the last has no backing).

    One image is made with our writer; the others are copies of its bytes
    with the (same-length) backing name changed: 1000 images in well under
    a second, no fsync each.
    """
    template = directory / "template.qcow2"
    Qcow2Writer(str(template), 64 * KiB, 512, backing_file="l0001.qcow2", backing_format="qcow2").commit()
    with_backing = template.read_bytes()
    template.unlink()
    Qcow2Writer(str(template), 64 * KiB, 512).commit()
    last = template.read_bytes()
    template.unlink()
    for i in range(n):
        data = last if i == n - 1 else with_backing.replace(b"l0001.qcow2", f"l{i + 1:04d}.qcow2".encode())
        (directory / f"l{i:04d}.qcow2").write_bytes(data)
    return directory / "l0000.qcow2"


@pytest.mark.parametrize("depth", [1, 5])
def test_chain_depth_limit_parameter(tmp_path: Path, depth: int) -> None:
    tip = _tiny_chain(tmp_path, depth + 1)
    assert len(open_chain(str(tip), max_depth=depth + 1)) == depth + 1
    with refused(tip, f"backing chain is deeper than {depth} images"):
        open_chain(str(tip), max_depth=depth)


def test_chain_of_1000_opens_and_1001_is_refused(tmp_path: Path) -> None:
    assert MAX_CHAIN_DEPTH == 1000
    tip = _tiny_chain(tmp_path, 1001)
    before = open_fds()
    t0 = time.monotonic()
    with refused(tip, "backing chain is deeper than 1000 images"):
        ChainView.open(str(tip))
    assert open_fds() == before
    # Exactly 1000 is fine: make l0999 the bottom.
    (tmp_path / "l0999.qcow2").write_bytes((tmp_path / "l1000.qcow2").read_bytes())
    with ChainView.open(str(tip)) as view:
        assert view.depth == 1000
        assert view.read(0, view.size) == bytes(64 * KiB)
        assert [e.depth for e in view.map()] == [999]
    assert time.monotonic() - t0 < 30


def test_missing_backing_file(tmp_path: Path) -> None:
    tip = build(tmp_path / "tip.qcow2", backing="gone.qcow2", writes=())
    with refused(tip, r"backing file 'gone.qcow2' not found"):
        ChainView.open(str(tip))


def test_backing_name_that_is_a_symlink_loop(tmp_path: Path) -> None:
    """Named for what it is, not as missing: the file is there, twice."""
    os.symlink("loop2.qcow2", tmp_path / "loop1.qcow2")
    os.symlink("loop1.qcow2", tmp_path / "loop2.qcow2")
    tip = build(tmp_path / "tip.qcow2", backing="loop1.qcow2", writes=())
    with refused(tip, r"backing file 'loop1.qcow2' \(.*loop1.qcow2\): Too many levels of symbolic links"):
        ChainView.open(str(tip))


@pytest.mark.parametrize(
    "name",
    [
        "nbd://host/x",
        "nbd+unix:///x?socket=/tmp/s",
        "http://example.com/disk.img",
        'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}',
    ],
)
def test_backing_protocols_are_refused(tmp_path: Path, name: str) -> None:
    tip = build(tmp_path / "tip.qcow2", backing=name, backing_fmt="raw", writes=())
    with refused(tip, "protocol; backupfs follows plain file paths only"):
        ChainView.open(str(tip))


def test_file_protocol_is_a_plain_path(tmp_path: Path) -> None:
    build(tmp_path / "base.qcow2")
    tip = build(tmp_path / "tip.qcow2", backing="file:base.qcow2", writes=())
    with ChainView.open(str(tip)) as view:
        assert view.depth == 2 and view.read(0, 4) == b"\x11" * 4


def test_unsupported_backing_format(tmp_path: Path) -> None:
    build(tmp_path / "base.qcow2")
    tip = build(tmp_path / "tip.qcow2", backing="base.qcow2", backing_fmt="vmdk", writes=())
    with refused(tip, "backing file format 'vmdk' is not supported"):
        ChainView.open(str(tip))


@pytest.mark.parametrize("fmt", ["raw", "qcow2", None])
def test_backing_file_is_a_directory(tmp_path: Path, fmt: str | None) -> None:
    (tmp_path / "dir").mkdir()
    tip = build(tmp_path / "tip.qcow2", backing="dir", backing_fmt=fmt or "raw", writes=())
    if fmt is None:  # no backing format extension: probed
        Img(tip).put(">I", 112, 0)  # turn the extension into the end marker
        assert Img(tip).header.backing_format is None
    # Named by the image that points there: the directory alone said
    # nothing of which chain it was in.
    with refused(tip, r"backing file 'dir' \(.*/dir\) is a directory"):
        open_and_read(tip)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_backing_file_is_a_fifo_does_not_hang(tmp_path: Path, fmt: str) -> None:
    os.mkfifo(tmp_path / "fifo")
    tip = build(tmp_path / "tip.qcow2", backing="fifo", backing_fmt=fmt, writes=())
    with refused(tmp_path / "fifo", "not a regular file or block device"):
        open_and_read(tip)


def test_tip_is_a_directory_or_missing(tmp_path: Path) -> None:
    with refused(tmp_path, "is a directory"):
        ChainView.open(str(tmp_path))
    with refused(tmp_path, "is a directory"):
        check_image(str(tmp_path))
    with refused(tmp_path / "nope", "no such file"):
        ChainView.open(str(tmp_path / "nope"))
    with refused(tmp_path / "nope", "no such file"):
        check_image(str(tmp_path / "nope"))
